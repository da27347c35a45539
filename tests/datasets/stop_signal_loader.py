"""A loader with worker processes that outlives a stop signal to its whole process group, for
tests/datasets/test_data_signals.py: `python stop_signal_loader.py torch|dali`. Prints "ready"
after its first step; once SIGINT and SIGTERM have come (handled here as srdit.train handles
them), it takes 3 more steps, prints "survived", closes the loader and exits 0."""
import signal
import sys
import time

import numpy as np

heard = []


class InMemory:
    """Shards' reading interface over arrays (no files): 64 samples of cached teacher targets."""

    kind, image_format = "teacher", None

    def __len__(self):
        return 64

    def read(self, idx):
        idx = np.asarray(idx)
        return {"teacher": np.ones((len(idx), 2, 4), np.float16) * idx[:, None, None].astype(np.float16),
                "latent": np.zeros((len(idx), 1, 2, 2), np.float32) + idx[:, None, None, None].astype(np.float32),
                "label": idx.astype(np.int64)}

    def batch(self, idx):
        import torch

        return {k: torch.from_numpy(v) for k, v in self.read(idx).items()}


if __name__ == "__main__":
    from srdit.data import make_batches

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: heard.append(signal.Signals(signum).name))
    loader = make_batches(InMemory(), 8, backend=sys.argv[1], device="cpu", workers=2)
    loader.next_step()
    print("ready", flush=True)
    deadline = time.time() + 60
    while len(heard) < 2 and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(3):
        loader.next_step()
    print("survived", *sorted(heard), flush=True)
    loader.close()
