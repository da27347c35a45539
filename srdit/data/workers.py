"""Data worker processes (DataLoader's, DALI's) and the stop signals that reach a whole job.

Ctrl-C, `kill -- -PGID`, SLURM's preemption and time limit signal every process of the job, the
loaders' workers too. The trainer answers SIGTERM and SIGINT by finishing its step and
checkpointing (srdit.train), which needs its data until it is done: a worker that died of the
signal crashed it instead. So workers ignore both signals, and end only when their parent (the
training process) ends them, as DataLoader, DALI and multiprocessing's exit do with SIGTERM.
Ignoring SIGTERM outright would not do: multiprocessing's exit terminates and then joins its
daemonic workers, and would wait for ever.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_shielded_pid = None


def shield_from_stop_signals(*_) -> None:
    """In a data worker process, before it starts threads of its own (or started with the
    signals blocked: stop_signals_blocked): SIGINT and SIGTERM are ignored unless the parent
    sends SIGTERM, which ends the process at once. Python's handlers cannot see who sent a
    signal, so both are blocked in every thread (threads inherit the mask) and one thread takes
    them with sigwaitinfo, which can. DataLoader calls it as its worker_init_fn."""
    global _shielded_pid
    if _shielded_pid == os.getpid():
        return
    _shielded_pid = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    parent = os.getppid()

    def take_signals():
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_signals, name="srdit-stop-signals", daemon=True).start()


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGINT and SIGTERM blocked in this thread for the block, so that worker processes started
    in it begin with them blocked (a signal mask survives fork and exec), in the threads their
    imports start too, before shield_from_stop_signals runs (a spawned DALI worker imports torch
    first). A signal that reaches this process meanwhile goes to another of its threads or waits
    for the block's end: it is not lost."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # its first start unblocks both signals in the thread that starts it
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
