"""A stop signal to a whole process group (Ctrl-C, `kill -- -PGID`, SLURM) reaches the loaders'
worker processes too: they must outlive it, so that the trainer can finish its step and
checkpoint (srdit.train), and still end when their loader is done with them."""
import os
import signal
import subprocess
import sys

import pytest

from srdit.data import dali_available

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stop_signal_loader.py")


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed"))])
def test_loader_workers_outlive_a_stop_signal_to_the_process_group(backend):
    proc = subprocess.Popen([sys.executable, SCRIPT, backend], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "survived SIGINT SIGTERM" in output, output
