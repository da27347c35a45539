# Sourced by the README's commands: creates .venv (Python 3.10+) with the pinned packages once,
# then activates it. torch is pinned with == because a bare `torch` pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SRDIT_VENV:-$ROOT/.venv}"
STAMP="$VENV/.srdit-installed-v2"  # bump when the installed set changes
if [ ! -f "$STAMP" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 triton==3.8.0
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
    touch "$STAMP"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}" HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
cd "$ROOT"
