"""File writing that survives a crash, file hashes, and the "same settings" check of resumable
commands, once for every command of srdit (train, sample, eval, data.prepare, bench).

Atomic write: the content goes to `<path>.tmp.<pid>` beside the target, is flushed and fsynced,
renamed over the target, and the directory is fsynced so the rename itself survives a power
cut. A reader (or a kill at any moment) sees the old file or the new one, never half of one;
on an error the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

TEMP_MARK = ".tmp."  # <target>.tmp.<pid>: what atomic_write leaves behind only if killed


def temp_path(path: str) -> str:
    return f"{path}{TEMP_MARK}{os.getpid()}"


def fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """`with atomic_write(path) as f: f.write(...)`: f is a temporary file that replaces `path`
    when the block ends without an error (module docstring)."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):
            raise_naming(error, path)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def raise_naming(error: OSError, path) -> None:
    """Raise `error`; where it names no file (a failed write() or flush() does not: "No space left
    on device" alone), as the same error naming `path`, so that describe_error's line says where."""
    if error.errno is None or error.filename is not None:
        raise error
    raise OSError(error.errno, error.strerror, os.fspath(path)) from error


def write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str, obj, indent: int | None = 1) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)  # releases the GIL: threads hash files in parallel
    return digest.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def settings_diff(old: dict, new: dict, *, ignore=()) -> list[str]:
    """`key.sub: old -> new` for every (nested, dot-joined) key whose value differs, in key order;
    keys in `ignore` do not count."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}"
            for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def check_same_settings(old: dict, new: dict, *, what: str, fix: str, error: type[Exception] = ValueError,
                        ignore=(), limit: int = 6) -> None:
    """A resumed command must have the settings its output was begun with: raise
    `error("<what> (<differing keys>); <fix>")` when it has not."""
    changed = settings_diff(old, new, ignore=ignore)
    if changed:
        more = f"; +{len(changed) - limit} more" if len(changed) > limit else ""
        raise error(f"{what} ({'; '.join(changed[:limit])}{more}); {fix}")


def remove_stale_temporaries(directory: str, prefix: str = "") -> list[str]:
    """Delete the `<name>.tmp.<pid>` files atomic_write left in `directory` (those of names
    starting with `prefix`) when a process was killed mid-write. Call it only while holding the
    OutputLock of what they belong to: then no live process of srdit writes them, so every such
    file is stale. Returns the paths removed."""
    removed = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            head, mark, pid = name.rpartition(TEMP_MARK)
            if mark and head.startswith(prefix) and head and pid.isdigit():
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    return removed


class OutputInUse(RuntimeError):
    """Another srdit process holds the lock of this output."""


class OutputLock:
    """An exclusive lock on one output (a run folder, a samples file, a prepared folder), taken by
    the rank-0 process of a command for as long as it runs, so that two commands never write the
    same output: the second fails at once, naming the holder's pid and host. It is an flock on a
    small file (`path`), which the OS releases when the holder dies, also on kill -9; the file is
    removed when the lock is released normally."""

    def __init__(self, path: str, what: str):
        self.path, self.what, self.fd = os.fspath(path), what, None

    def __enter__(self) -> "OutputLock":
        import fcntl
        import socket
        import time

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputInUse(f"{self.what} is in use by {holder} (lock file {self.path}); wait for that "
                                  "command to finish or stop it, or choose another output") from None
            try:  # the holder may have removed the file between our open and flock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:  # fsynced: the other ranks of a command read it (srdit.distributed.check_shared)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            raise_naming(error, self.path)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None


def describe_error(error: BaseException) -> str:
    """One line for a command's error message; an OS error names its cause, errno and path
    ("No space left on device (ENOSPC): /runs/b1/checkpoints/step_000010000.pt")."""
    import errno as errno_names

    if isinstance(error, OSError) and error.errno is not None:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        name = errno_names.errorcode.get(error.errno, str(error.errno))
        return f"{error.strerror or error} ({name})" + (f": {paths}" if paths else "")
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    import torch

    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite_weights(state: dict, path: str, consequence: str) -> None:
    """A ValueError naming `path` and its tensors that hold NaN or Inf, ending with `consequence`:
    such weights load without complaint and every output they compute is NaN or garbage."""
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or Inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); {consequence}")


def describe_load_error(error: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one line, without torch's advice to load the
    file unsafely (srdit never does: a checkpoint could run code)."""
    if isinstance(error, OSError) and error.errno is not None:
        return describe_error(error)
    text = str(error)
    if "WeightsUnpickler error:" in text:
        refused = text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
        return f"it holds Python objects that a safe (weights_only) load refuses: {refused}"
    first = text.strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
