"""Launching rank_worker.py as torchrun launches srdit.train, and comparing what its ranks saved:
shared by test_ranks.py and test_sharding.py."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


def launch(launches: dict, tmp_path_factory, folders: dict | None = None) -> dict:
    """Run every launch (name: (ranks, scenarios)) at once, each in a folder of its own (into
    `folders` by name, when given: where its files are); name -> every rank's results."""
    outs = {name: tmp_path_factory.mktemp(name) for name in launches}
    if folders is not None:
        folders.update(outs)
    procs = {}
    for name, (ranks, scenarios) in launches.items():
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        procs[name] = subprocess.Popen([*launcher, os.path.join(HERE, "rank_worker.py"), str(outs[name]), *scenarios],
                                       env=ENV, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        results[name] = [torch.load(os.path.join(outs[name], f"rank{r}.pt"), weights_only=False)
                         for r in range(launches[name][0])]
    return results


def assert_state_equal(a: dict, b: dict, **tol) -> None:
    """Model, EMA and optimizer state (as a checkpoint holds them) equal: bit for bit, or to `tol`."""
    tol = tol or dict(rtol=0, atol=0)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], **tol, msg=lambda m: f"{key} {k}: {m}")
    for i, (x, y) in enumerate(zip(a["optimizer"], b["optimizer"], strict=True)):
        for k in x:
            torch.testing.assert_close(x[k], y[k], **tol, msg=lambda m: f"optimizer {i} {k}: {m}")
