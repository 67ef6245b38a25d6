#!/usr/bin/env bash
# Set up bnlab in a virtual environment (.venv) on a fresh machine.
#
# PyTorch is installed *before* bnlab, from PyTorch's CPU index: left to itself, pip resolves
# bnlab's `torch` requirement to a multi-GB CUDA build. With a GPU, install the torch build you
# want first (https://pytorch.org/get-started/locally/), or set TORCH_INDEX, e.g.
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
# and this script keeps it. EXTRAS picks bnlab's extras (default: lab,dev; add triton for GPU kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-lab,dev}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION from $TORCH_INDEX (falls back to the configured indexes)"
  # --retries 1: where the PyTorch index is unreachable (an offline mirror), fail over quickly.
  "${PIP[@]}" install -q --retries 1 "torch==$TORCH_VERSION" --extra-index-url "$TORCH_INDEX"
fi
echo "[setup] installing bnlab[$EXTRAS] (editable)"
"${PIP[@]}" install -q -e ".[$EXTRAS]"
# bnlab compiles its CPU kernels at first use (25-30 seconds on 2 cores, once per machine and version):
# done here, the first BatchNorm call does not wait. A failed build is not fatal (the portable backend runs).
"$VENV/bin/python" -c "from bnlab.backends import cpu_build; print('[setup]', cpu_build.status().splitlines()[0])"
"$VENV/bin/python" -c "import bnlab, torch; print(f'[setup] bnlab {bnlab.__version__} with torch {torch.__version__} ready in $VENV')"
