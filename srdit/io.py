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
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


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
