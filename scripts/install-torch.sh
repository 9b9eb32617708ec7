#!/usr/bin/env bash
# Installs torch==$TORCH_VERSION, the build this machine can use, without pulling GBs it cannot:
#   $TORCH_INDEX set            -> from that index too (e.g. https://download.pytorch.org/whl/cu128)
#   an NVIDIA GPU (nvidia-smi)  -> PyPI's default Linux build, which is the CUDA one
#   not Linux                   -> PyPI's build (macOS and Windows wheels there are CPU builds)
#   Linux without a GPU         -> the CPU build: from pip's configured indexes when they resolve
#                                  torch==VERSION to a +cpu build (a local mirror or wheelhouse; asked
#                                  with `pip install --dry-run --report`, which reads metadata only),
#                                  else torch==VERSION+cpu from PyTorch's CPU index ($TORCH_CPU_INDEX).
# Usage: scripts/install-torch.sh PIP [PIP INSTALL OPTIONS...]
#        (DRY_RUN=1 prints the install command instead of running it)
set -euo pipefail
PIP=${1:?usage: install-torch.sh PATH/TO/pip [pip install options]}
shift
VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PY="$(dirname "$PIP")/python"

run() {
    echo "install-torch: $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -n "${TORCH_INDEX:-}" ]; then
    run "$PIP" install -q "$@" "torch==$VERSION" --extra-index-url "$TORCH_INDEX"
    exit 0
fi
installed=$("$PIP" show torch 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "${installed%%+*}" = "$VERSION" ]; then
    echo "install-torch: torch $installed already installed"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    run "$PIP" install -q "$@" "torch==$VERSION"
    exit 0
fi
if [ "$(uname -s)" != Linux ]; then
    run "$PIP" install -q "$@" "torch==$VERSION"
    exit 0
fi
picked=$("$PIP" install --dry-run --no-deps --quiet --report - "torch==$VERSION" 2>/dev/null |
    "$PY" -c 'import json, sys; r = json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' ||
    true)
case "$picked" in
*+cpu) run "$PIP" install -q "$@" "torch==$picked" ;;
*) run "$PIP" install -q "$@" "torch==$VERSION+cpu" --extra-index-url "$CPU_INDEX" ;;
esac
