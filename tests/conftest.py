"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported,
so it is set here, at the top of the first file pytest loads (TOOLCHAIN.md)."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# the repository root, so that the tests import the benchmarks as the package they are (bench.traffic)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Published layouts (key, shape, dtype) of the release model and the pretrained networks,
# copied from shared/ so the suite runs from a plain clone.
LAYOUTS = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def layout():
    """layout(name) -> [[key, shape, dtype], ...] of tests/data/<name>.json, in state_dict order."""
    import json

    def load(name: str) -> list:
        with open(os.path.join(LAYOUTS, f"{name}.json")) as f:
            return json.load(f)

    return load
