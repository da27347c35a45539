"""Nothing lost on a cluster: several ranks (gloo, launched by torchrun as srdit.train is) agree on
when to stop, on what to resume and on the folder they share; a rank that stops answering ends
the job after train.process_group_timeout; the SLURM script the docs show parses."""
import glob
import os
import re
import signal
import subprocess
import time

from test_train import losses, run, spawn, wait_for_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULTY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faulty_rank.py")


def children(pid: int) -> list[int]:
    return [int(c) for path in glob.glob(f"/proc/{pid}/task/*/children") for c in open(path).read().split()]


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (from its environment)."""
    for pid in children(launcher):
        if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            return pid
    raise AssertionError(f"no rank {rank} under torchrun {launcher}")


def finish(proc, timeout=120) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the job did not end in {timeout} s: {proc.communicate()[0][-3000:]}") from None


def test_a_signal_to_one_rank_and_its_data_workers_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """As SLURM signals a job: every process of one node (here rank 1 and its DataLoader workers,
    SIGINT too) a step or more before the other node (here never): both ranks stop at the same
    step, checkpoint, and exit 0."""
    proc = spawn(tmp_path, "train.max_steps=100000", "train.ckpt_every=100000", "data.num_workers=2", nproc=2)
    wait_for_step(tmp_path, 2, proc)
    rank1 = rank_pid(proc.pid, 1)
    workers = children(rank1)
    assert len(workers) == 2, workers  # rank 1's DataLoader workers
    for pid in workers:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    os.kill(rank1, signal.SIGTERM)
    output = finish(proc)
    assert proc.returncode == 0, output
    saved = os.listdir(tmp_path / "checkpoints")
    assert len(saved) == 1 and f"stopped by signal at step {int(saved[0][5:14])} (loss" in output, output
    assert max(losses(tmp_path)) == int(saved[0][5:14])


def test_ranks_that_see_different_run_folders_stop_at_once_naming_them(tmp_path):
    # a node-local --out: rank 1 does not see the lock rank 0 holds
    proc = spawn(tmp_path / "local", "train.max_steps=2", nproc=2, program=(FAULTY, "own-out"))
    output = finish(proc)
    assert proc.returncode != 0 and "rank(s) 1 do not see" in output and "not a node-local disk" in output, output
    # checkpoints only rank 1 sees (written by 1 rank x 2 micro-batches: 2 ranks resume it exactly):
    # rank 0 would start a new run while rank 1 resumed step 2
    shared = tmp_path / "shared"
    assert run(shared, "train.max_steps=2", "train.ckpt_every=2", "train.grad_accum=2") == 0
    os.rename(shared / "checkpoints", shared / "checkpoints-node1")
    proc = spawn(shared, "train.max_steps=4", nproc=2, program=(FAULTY, "own-checkpoints"))
    output = finish(proc)
    assert proc.returncode != 0, output
    assert "the ranks do not resume the same state" in output and "rank 0: new run; rank 1: checkpoint " \
        "step_000000002.pt" in output and "--out must be on storage that every node shares" in output, output


def test_a_rank_that_stops_answering_ends_the_job_after_the_timeout(tmp_path):
    began = time.time()
    proc = spawn(tmp_path, "train.max_steps=100", "train.process_group_timeout=10", nproc=2,
                 program=(FAULTY, "stall"))
    output = finish(proc)
    assert proc.returncode != 0 and time.time() - began < 100
    error = [line for line in output.splitlines() if line.startswith("srdit.train: error: rank 0 of 2")]
    assert error and "within the process-group timeout (10 s)" in error[0], output
    # torch's own words: gloo says "Timed out ..." from a blocking collective and "Application
    # timeout caused pair closure" from an async one's wait (the sharded weights' all-gather)
    said = error[0].split("(torch: ", 1)[1]
    assert "(train.process_group_timeout)" in error[0] and re.match(r"(Timed out|Application timeout)", said), error


def test_the_slurm_script_is_the_one_the_docs_show_and_parses():
    script = open(os.path.join(ROOT, "scripts", "slurm_train.sbatch")).read()
    assert script.strip() in open(os.path.join(ROOT, "docs", "training.md")).read()
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "slurm_train.sbatch")], check=True)
    for needed in ("--signal=TERM@", "--cpus-per-task", "SRUN_CPUS_PER_TASK", "--max-restarts",
                   "train.process_group_timeout", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        assert needed in script, needed
