#!/usr/bin/env bash
# The attention bench on a GPU box, in one command (<= 8 minutes, nothing fetched from the network):
#   bash bench/gpu_attention.sh OUTDIR      (from the repo root)
# Expects python3 with torch (CUDA), triton, transformers, numpy, setuptools and wheel. diffusers and the
# rest that box lacks come as wheels in .whl/ when present; ditserve itself is installed from this checkout.
# Both go into /tmp/site, never into the system site-packages. Writes OUTDIR/attention-<card>.json through
# the same add_arguments / run / write_result path as `ditserve bench attention`.
set -euo pipefail

OUTDIR=${1:?usage: bash bench/gpu_attention.sh OUTDIR}
SITE=/tmp/site
log() { echo "[$(date +%H:%M:%S)] $*"; }

mkdir -p "$OUTDIR" "$SITE"
if [ -d .whl ]; then
    log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    python3 -m pip install -q --upgrade --no-index --no-deps --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# setup.py maps ditserve -> protos/ditserve, ditserve.services -> services: a plain PYTHONPATH cannot.
log "installing ditserve from $(pwd) into $SITE"
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target "$SITE" .

GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')
# "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA A100-SXM4-80GB" -> a100: the first word with a digit.
CARD=$(echo "${GPU#NVIDIA }" | tr 'A-Z' 'a-z' | tr -s ' -' '\n\n' | grep -m1 '[0-9]' || echo gpu)
OUT="$OUTDIR/attention-$CARD.json"
log "GPU: $GPU; torch $(python3 -c 'import torch; print(torch.__version__)'); writing $OUT"

python3 - "$OUT" <<'EOF'
import argparse
import logging
import sys

from ditserve.services.tools.bench import attention
from ditserve.services.tools.bench.common import write_result

logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
parser = argparse.ArgumentParser()
attention.add_arguments(parser)
args = parser.parse_args(["--device", "cuda", "--dtype", "bf16", "--flux-step"])
document = attention.run(args)
print(write_result(sys.argv[1], document))
for row in document["rows"]:
    print(f"{row['stage']:>9} {row['backend']:<14} median {row['median_ms']:9.3f} ms"
          f"  max|err| vs sdpa_math {row['max_abs_err_vs_sdpa_math']:.3g}")
print({key: value for key, value in document["summary"].items() if key != "unavailable"})
EOF
log "done: $OUT"
