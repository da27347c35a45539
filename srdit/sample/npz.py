"""ADM-style .npz files written and read in pieces, so that 50K images never sit in RAM.

An .npz is a zip archive of .npy members (`arr_0.npy`, ...). `NpzWriter` writes one member at a
time: the .npy header first (shape and dtype are known up front), then the rows in as many
chunks as the caller likes, straight into the zip stream (stored, not compressed, zip64 forced:
a 50K x 256 x 256 x 3 member is 9.8 GB, over zip's 4 GB limit). Every member gets the fixed
timestamp 1980-01-01, so the same content always gives the same bytes (runs compare with a file
hash). `np.load` reads the result like any `np.savez` file.

`NpzRows` reads one member back in batches of rows from the zip stream (stored or deflated);
memory is one batch. Small members (labels, statistics) are best read with `np.load(path)[key]`,
which already loads one member at a time.
"""
from __future__ import annotations

import zipfile

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: fixed, so equal content gives equal bytes


class _MemberWriter:
    """File-like sink of one .npy member; `write(rows)` appends C-ordered rows of the declared
    dtype and trailing shape; the row count must add up to the declared shape at close."""

    def __init__(self, stream, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.stream, self.name, self.shape, self.dtype = stream, name, tuple(shape), np.dtype(dtype)
        self.rows = 0
        np.lib.format.write_array_header_1_0(
            stream, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.dtype != self.dtype or rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.name}: rows {rows.dtype} {rows.shape} do not fit {self.dtype} {self.shape}")
        if self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.name}: more than the declared {self.shape[0]} rows")
        self.stream.write(np.ascontiguousarray(rows).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.stream.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.name}: {self.rows} rows written, {self.shape[0]} declared")


class NpzWriter:
    """`with NpzWriter(path) as w:` then `m = w.member("arr_0", shape, dtype)`, `m.write(rows)`
    repeatedly, `m.close()`; or `w.add("arr_1", array)` for a whole array. One member at a time."""

    def __init__(self, path_or_file):
        self.zip = zipfile.ZipFile(path_or_file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def member(self, name: str, shape, dtype) -> _MemberWriter:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        return _MemberWriter(self.zip.open(info, "w", force_zip64=True), name, shape, dtype)

    def add(self, name: str, array) -> None:
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"{name}: object arrays need pickle; store strings as a unicode array")
        m = self.member(name, array.shape, array.dtype)
        if array.ndim == 0:  # a scalar, e.g. the settings JSON string: its bytes, no rows
            m.stream.write(array.tobytes())
            m.stream.close()
            return
        m.write(array)
        m.close()

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def npz_members(path: str) -> set[str]:
    """The array names of an .npz, read from the zip directory (no array is loaded); a file that
    is not a zip archive is a ValueError naming it (np.load would suggest unpickling it)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file (a zip archive of .npy arrays, as numpy.savez writes)")
    with zipfile.ZipFile(path) as z:
        return {n[:-4] for n in z.namelist() if n.endswith(".npy")}


def read_arrays(path: str, names) -> dict[str, np.ndarray]:
    """The arrays `names` of an existing .npz, each read whole, so that zip checks every member's
    CRC: a truncated, damaged or foreign file, or a missing array, is a ValueError naming the
    file and what is wrong with it, in one line."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is unreadable (not a zip archive: truncated or overwritten?)")
    try:
        with np.load(path, allow_pickle=False) as f:
            present = f.files
            arrays = {n: f[n] for n in names if n in present}
    except Exception as error:  # noqa: BLE001 - whatever a damaged file makes zipfile, numpy or the OS raise
        why = str(error).replace("\n", " ")
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {why})") from error
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"{path} has no array {', '.join(missing)} (it has: {', '.join(present) or 'none'})")
    return arrays


class NpzRows:
    """Row batches of one member of an .npz without loading it whole:

        with NpzRows(path, "arr_0") as rows:
            rows.shape, rows.dtype
            for batch in rows.batches(250): ...   # arrays of <= 250 rows, in order
    """

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = path, key
        npz_members(path)  # a clear error for a file that is not an .npz
        self.zip = zipfile.ZipFile(path)
        name = f"{key}.npy"
        if name not in self.zip.namelist():
            members = ", ".join(n[:-4] for n in self.zip.namelist() if n.endswith(".npy"))
            self.zip.close()
            raise KeyError(f"{path} has no array {key!r} (it has: {members})")
        self.stream = self.zip.open(name)
        version = np.lib.format.read_magic(self.stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}:{name}: unsupported .npy format version {version}")
        self.shape, fortran, self.dtype = read_header(self.stream)
        if fortran and len(self.shape) > 1:
            raise ValueError(f"{path}:{name} is stored in Fortran order; rows cannot be streamed")
        if self.dtype.hasobject:
            raise ValueError(f"{path}:{name} holds Python objects (pickle); refusing to load it")
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch: int):
        for start in range(0, self.shape[0], batch):
            n = min(batch, self.shape[0] - start)
            rows = np.empty((n, *self.shape[1:]), dtype=self.dtype)  # writable, filled in place
            view, filled = memoryview(rows.reshape(-1).view(np.uint8)), 0
            while filled < len(view):
                got = self.stream.readinto(view[filled:])
                if not got:
                    raise ValueError(f"{self.path}:{self.key} is truncated at row {start + filled // self.row_bytes}")
                filled += got
            yield rows

    def close(self) -> None:
        self.stream.close()
        self.zip.close()

    def __enter__(self) -> NpzRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
