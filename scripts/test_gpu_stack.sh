#!/usr/bin/env bash
# The test suite on the GPU machines' package stack (torch 2.11, triton 3.6; TOOLCHAIN.md), run on
# the CPU under the Triton interpreter: catches API drift between that stack and the CI one
# (torch 2.14, triton 3.8) before scarce GPU time is spent on it. Not part of CI: a second,
# ~3 GB install. numpy stays below 2.3 here because triton 3.6's interpreter turns 1-element
# arrays into loop bounds with int(), which numpy 2.4 refuses (2.2 accepts).
#   bash scripts/test_gpu_stack.sh [pytest args]     (SRDIT_GPU_STACK_VENV: the venv's folder)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SRDIT_GPU_STACK_VENV:-$ROOT/.venv-gpu-stack}"
PINS=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.3")
if [ ! -f "$VENV/.srdit-installed-v1" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "${PINS[@]}"
    "$VENV/bin/pip" install -q -e "$ROOT[test]" "${PINS[@]}"  # the pins again: the extras must not move them
    touch "$VENV/.srdit-installed-v1"
fi
cd "$ROOT"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
