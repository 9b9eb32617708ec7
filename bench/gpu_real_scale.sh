#!/usr/bin/env bash
# Speed at the scale users serve, in one device call (<= 8 minutes on one H100/H200):
#   bash bench/gpu_real_scale.sh OUTDIR            (from the repo root, on the GPU machine)
#   DITSERVE_REAL_SCALE_TINY=1 bash bench/gpu_real_scale.sh OUTDIR    (CPU, the tiny preset: what the suite runs)
# Installs what it needs (wheels in .whl/ when present, ditserve from this checkout, into /tmp/site; never
# the system site-packages), writes the FLUX.1-dev random-weights folder (configs only: each service builds
# its weights on the GPU at load), then measures through `ditserve bench real_scale` (a: four services vs
# FluxPipeline in-process, f: memory per service, d: step caching, e: continuous batching, b: attention
# backends, c: compile and fp8), then, with the time left, Wan2.1-T2V-1.3B at 480x832 x 33 frames, 10 steps
# (g: four services vs WanPipeline in-process, h: attention backends), and writes OUTDIR/gpu-real-scale.json.
# Sections past --budget-s are skipped and listed in summary.skipped.
set -euo pipefail

OUTDIR=${1:?usage: bash bench/gpu_real_scale.sh OUTDIR}
log() { echo "[$(date +%H:%M:%S)] $*"; }
mkdir -p "$OUTDIR"

if [ -n "${DITSERVE_REAL_SCALE_TINY:-}" ]; then
    PY=${PYTHON:-python3}
    ARGS=(--preset tiny-flux --device cpu --dtype fp32 --size 64 --steps 4 --batch-size 64 --clients 1,2
          --repeats 1 --no-compile --budget-s "${DITSERVE_REAL_SCALE_BUDGET_S:-600}"
          --wan-preset tiny-wan --wan-size 64x64 --wan-frames 5 --wan-steps 2)
else
    PY=python3
    SITE=/tmp/site
    mkdir -p "$SITE"
    if [ -d .whl ]; then
        log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
        $PY -m pip install -q --upgrade --no-index --no-deps --target "$SITE" .whl/*.whl
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # setup.py maps ditserve -> protos/ditserve, ditserve.services -> services: a plain PYTHONPATH cannot.
    log "installing ditserve from $(pwd) into $SITE"
    $PY -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target "$SITE" .
    export PATH="$SITE/bin:$PATH"
    ARGS=(--preset flux.1-dev --device cuda --dtype bf16 --size 1024 --steps 28 --batch-size 512 --clients 1,4,8
          --budget-s "${DITSERVE_REAL_SCALE_BUDGET_S:-390}")
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

OUT="$OUTDIR/gpu-real-scale.json"
log "writing $OUT"
PYTHONUNBUFFERED=1 $PY -m ditserve.client.cli bench real_scale --out "$OUT" "${ARGS[@]}"
$PY - "$OUT" <<'PYEOF'
import json
import sys

document = json.load(open(sys.argv[1]))
for row in document["rows"]:
    value = row.get("seconds_per_image", row.get("step_seconds", row.get("images_per_second")))
    print(f"{row['section']}  {row['what']:<40} {value:10.4f}")
print({key: value for key, value in document["summary"].items() if key != "memory_bytes"})
PYEOF
log "done: $OUT"
