"""srdit.train with one rank made faulty, for tests/train/test_cluster.py, launched as torchrun
launches srdit.train: `python -m torch.distributed.run ... faulty_rank.py FAULT [srdit.train args]`.

Faults (rank 0 is left as it is):
  own-out          every other rank works in a folder of its own under --out (a node-local disk)
  own-checkpoints  every other rank reads checkpoints from a folder of its own, CHECKPOINTS-node<R>
                   (a checkpoints/ that is a link to a node-local disk)
  stall            rank 1 stops answering before its third step (a hung rank)
"""
import os
import signal
import sys
import time

from srdit.train import main as train

rank = int(os.environ["RANK"])
fault, argv = sys.argv[1], sys.argv[2:]
if fault == "own-out" and rank:
    at = argv.index("--out") + 1
    argv[at] = os.path.join(argv[at], f"node{rank}")
elif fault == "own-checkpoints" and rank:
    shared = train.checkpoint_dir
    train.checkpoint_dir = lambda out: f"{shared(out)}-node{rank}"
elif fault == "stall" and rank == 1:
    one_step = train.train_one_step

    def stalling(run, micro_batches):
        if run.state.step == 2:  # hung for good: only torchrun's SIGTERM, once rank 0 has failed, ends it
            signal.signal(signal.SIGTERM, lambda *_: os._exit(1))
            time.sleep(600)
        one_step(run, micro_batches)

    train.train_one_step = stalling
elif fault not in ("own-out", "own-checkpoints", "stall"):
    sys.exit(f"faulty_rank.py: unknown fault {fault!r}")
sys.exit(train.main(argv))
