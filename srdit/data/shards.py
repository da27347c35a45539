"""Prepared shards on disk, their index, and `ShardDataset`, the map-style reader.

A prepared directory (written by `python -m srdit.data.prepare`):

    index.json                 what the directory holds (below); written last, so a directory
                               without it is an unfinished preparation
    shard-000000.safetensors   a few thousand samples (see the shard layout below)
    ...
    parts/shard-000000.json    per-shard completion record (count, bytes, sha256, skipped files)
    prepare.json               the preparation's settings; a resumed run must match them
    skipped.txt                unreadable source images: source index, path, error
    .verified.json             stat cache of verified checksums (size, mtime_ns, sha256 per shard)

One shard is one file in the safetensors layout (8-byte little-endian header length, a JSON
header, then the tensors back to back), so any safetensors reader opens it, and numpy maps every
tensor in place (`np.memmap`, no parsing, no copy): random access to sample i is a slice.

    tensor          dtype  shape                 per sample (256 px)
    image_offsets   I64    [n + 1]               8 B: sample i's image is image_bytes[o[i]:o[i+1]]
                                                 (png and jpeg only)
    source_index    I64    [n]                   8 B: position in the sorted source listing
    label           I64    [n]                   8 B
    latent          F32    [n, 32, r/16, r/16]   32,768 B: one posterior sample, NOT scaled
    teacher         F16    [n, 1+(r/16)^2, D]    394,752 B (cached teacher only)
    image           U8     [n, 3, r, r]          196,608 B: the crop as it is, CHW (format "raw",
                                                 the default: a batch is a gather, no decode)
    image_bytes     U8     [sum of image sizes]  the crop as PNG (lossless) or JPEG q95 4:4:4
                                                 (formats "png", "jpeg")

No image tensor when the teacher is cached. Every tensor's byte size is a multiple of 8 except
image_bytes, which is last, so every tensor starts 8-byte aligned (3 r^2 is a multiple of 8 for
any r that is a multiple of 16). The latent scale (config.LATENT_SCALE = 0.3099) is applied when
reading.

Versions: 2 added format "raw" (the `image` tensor) and the release's sampled latents as a
source; version 1 directories (JPEG or PNG only) are read as they are.

index.json: format, version, resolution, latent shape/dtype/scale, image format ("image":
{"format": "raw" | "png" | "jpeg", ...} or null), teacher and tokenizer identities (file name,
sha256, settings), seed, crop, source description, classes, sample and skipped counts, and per
shard: file, samples, bytes, sha256, source range.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import struct

import numpy as np
import torch

from srdit.config import LATENT_SCALE
from srdit.io import atomic_write, sha256_file, write_json

FORMAT = "srdit-shards"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 is version 2 without format "raw"
IMAGE_FORMATS = ("raw", "png", "jpeg")
EXACT_FORMATS = ("raw", "png")  # the teacher sees the crop's own pixels, as in the release
INDEX = "index.json"
PARTS = "parts"
VERIFIED = ".verified.json"
SHARD_RE = re.compile(r"^shard-(\d{6})\.safetensors$")
VERIFY_MODES = ("auto", "full", "size")

# numpy dtype <-> safetensors dtype name
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
              np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class ShardError(ValueError):
    """A prepared directory that cannot be used as is; the one-line message names the file and
    the fix. (A ValueError, so the trainer reports it as a clean error.)"""


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------
def write_shard(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[int, str]:
    """Write `arrays` (in the given order) as one safetensors file: to a temporary name, fsynced,
    then renamed. Returns (bytes, sha256 of the file)."""
    header, offset = {}, 0
    for name, a in arrays.items():
        if a.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned
    digest = hashlib.sha256()
    with atomic_write(path) as f:
        for block in (struct.pack("<Q", len(text)), text, *(np.ascontiguousarray(a).data for a in arrays.values())):
            digest.update(block)
            f.write(block)
    return 8 + len(text) + offset, digest.hexdigest()


def read_header(path: str) -> tuple[dict, dict, int]:
    """(tensors {name: (dtype, shape, begin, end)}, metadata, data start) of one shard file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ShardError(f"{path} is not a shard file (bad header length); delete it and rerun prepare")
        try:
            header = json.loads(f.read(n))
        except ValueError as error:
            raise ShardError(f"{path}: unreadable shard header ({error}); delete it and rerun prepare") from None
    metadata = header.pop("__metadata__", {})
    tensors = {name: (_NP_DTYPES[t["dtype"]], tuple(t["shape"]), *t["data_offsets"]) for name, t in header.items()}
    end = max((t[3] for t in tensors.values()), default=0)
    if 8 + n + end != size:
        raise ShardError(f"{path} is {size} bytes, its header describes {8 + n + end} (truncated?); "
                         f"delete it and rerun prepare")
    return tensors, metadata, 8 + n


def open_shard(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a shard as a read-only numpy view into one memory map of the file."""
    tensors, _, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: data[start + b:start + e].view(dtype).reshape(shape)
            for name, (dtype, shape, b, e) in tensors.items()}


def read_index(root: str) -> dict:
    path = os.path.join(root, INDEX)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"prepared data directory not found: {root} (make it with python -m srdit.data.prepare)")
    if not os.path.isfile(path):
        raise ShardError(f"{root} has no {INDEX}: not a prepared directory, or its preparation is unfinished "
                         f"(rerun the same `python -m srdit.data.prepare` command: finished shards are kept)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path} is not a readable index ({type(error).__name__}: {error}); rerun the "
                         "same `python -m srdit.data.prepare` command to write it again (finished shards are kept)") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") not in READABLE_VERSIONS:
        index = index if isinstance(index, dict) else {}
        raise ShardError(f"{path} is not a {FORMAT} index of version {' or '.join(map(str, READABLE_VERSIONS))} "
                         f"(format {index.get('format')!r}, version {index.get('version')!r}; a newer srdit wrote it?)")
    image = index.get("image")
    if image is not None and (not isinstance(image, dict) or image.get("format") not in IMAGE_FORMATS):
        raise ShardError(f"{path}: unknown image format {image!r} (expected one of {IMAGE_FORMATS})")
    return index


def check_directory(root: str, index: dict) -> None:
    """Every indexed shard exists with its indexed size, and no shard file is left out of the
    index (both are errors: a silently smaller or larger dataset is a wrong dataset)."""
    listed = {s["file"] for s in index["shards"]}
    present = {name for name in os.listdir(root) if SHARD_RE.match(name)}
    missing = sorted(listed - present)
    if missing:
        raise ShardError(f"{root}: {len(missing)} shard(s) in {INDEX} are missing: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (restore them, or delete them from parts/ and "
                         f"rerun prepare to recreate them)")
    extra = sorted(present - listed)
    if extra:
        raise ShardError(f"{root}: {len(extra)} shard file(s) are not in {INDEX}: {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''} (rerun prepare to rebuild the index, or remove them)")
    for s in index["shards"]:
        size = os.path.getsize(os.path.join(root, s["file"]))
        if size != s["bytes"]:
            raise ShardError(f"{os.path.join(root, s['file'])} is {size:,} bytes, {INDEX} says {s['bytes']:,} "
                             f"(truncated or replaced); delete it and parts/{s['file'][:-12]}.json and rerun prepare")


def verify_checksums(root: str, index: dict, mode: str = "auto", threads: int = 8) -> int:
    """sha256 of every shard against the index. mode "full": hash all; "auto": skip shards whose
    (size, mtime_ns) match the stat cache written when they were last verified (by prepare or a
    previous open); "size": hash nothing (check_directory already compared sizes).
    Returns the number of shards hashed; a mismatch raises ShardError naming the shard."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify={mode!r} is not one of {VERIFY_MODES}")
    if mode == "size":
        return 0
    cache_path = os.path.join(root, VERIFIED)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    todo, stats = [], {}
    for s in index["shards"]:
        st = os.stat(os.path.join(root, s["file"]))
        stats[s["file"]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": s["sha256"]}
        if mode == "full" or cache.get(s["file"]) != stats[s["file"]]:
            todo.append(s)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
        hashes = list(pool.map(lambda s: sha256_file(os.path.join(root, s["file"])), todo))
    for s, digest in zip(todo, hashes):
        if digest != s["sha256"]:
            raise ShardError(f"{os.path.join(root, s['file'])}: sha256 {digest[:16]}... differs from {INDEX}'s "
                             f"{s['sha256'][:16]}... (corrupt or replaced); delete it and parts/{s['file'][:-12]}.json "
                             f"and rerun prepare to recreate it")
    if todo:
        try:  # best effort: a read-only directory just hashes again next time
            write_json(cache_path, {**cache, **{s["file"]: stats[s["file"]] for s in todo}})
        except OSError:
            pass
    return len(todo)


# ------------------------------------------------------------------------------------------
# the reader
# ------------------------------------------------------------------------------------------
def decode_image(data) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 [3, H, W] (CHW). (Format "raw" needs no decoding.)"""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))  # [H, W, 3]
    return pixels.transpose(2, 0, 1)


class ShardDataset:
    """Prepared shards as a map-style dataset (the PyTorch path; the DALI path reads the same
    shards through `read`).

    Item i is {"latent": float32 [32, r/16, r/16] scaled by 0.3099, "label": int, and either
    "image": uint8 [3, r, r] or "teacher": float16 [1 + (r/16)^2, D]}. Samples are numbered
    shard by shard in index order. `image_format` says how the images are stored: "raw" (the
    crop's bytes, read without decoding), "png", "jpeg", or None (cached teacher);
    `exact_images` is True when the teacher sees the crop's own pixels (raw, png), as the
    release's teacher does (it reads lossless PNGs).

    Opening checks the directory against index.json (missing, unindexed or resized shards are
    errors), the shard checksums (`verify`, see verify_checksums), every shard header against
    the index, and, given `num_classes`, that every label lies in [0, num_classes).
    """

    def __init__(self, root, *, num_classes: int | None = None, verify: str = "auto",
                 latent_scale: float = LATENT_SCALE):
        self.root = os.fspath(root)
        self.index = index = read_index(self.root)
        check_directory(self.root, index)
        verify_checksums(self.root, index, verify)
        self.resolution = index["resolution"]
        self.latent_shape = tuple(index["latent_shape"])
        self.teacher_shape = tuple(index["teacher"]["shape"]) if index.get("teacher") else None
        self.image_format = index["image"]["format"] if index.get("image") else None
        self.exact_images = self.image_format in EXACT_FORMATS
        self.kind = "teacher" if self.teacher_shape else "image"
        self.classes = list(index["classes"])
        self.num_classes = len(self.classes)
        self.latent_scale = np.float32(latent_scale)
        self.files = [os.path.join(self.root, s["file"]) for s in index["shards"]]
        self._open: list[dict | None] = [None] * len(self.files)
        labels = []
        for k, s in enumerate(index["shards"]):
            arrays = self._arrays(k)
            n = s["samples"]
            want = {"label": (n,), "latent": (n, *self.latent_shape)}
            if self.kind == "teacher":
                want["teacher"] = (n, *self.teacher_shape)
            elif self.image_format == "raw":
                want["image"] = (n, 3, self.resolution, self.resolution)
            else:
                want["image_offsets"] = (n + 1,)
            for name, shape in want.items():
                got = tuple(arrays[name].shape) if name in arrays else None
                if got != shape:
                    raise ShardError(f"{self.files[k]}: tensor {name!r} is {got}, {INDEX} implies {shape}; "
                                     f"delete the shard and parts/{s['file'][:-12]}.json and rerun prepare")
            labels.append(np.asarray(arrays["label"]))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self._cum = np.concatenate([[0], np.cumsum([s["samples"] for s in index["shards"]])]).astype(np.int64)
        self.check_labels(num_classes)

    # -- bookkeeping ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getstate__(self) -> dict:  # DataLoader / DALI workers reopen the memory maps
        state = dict(self.__dict__)
        state["_open"] = [None] * len(self.files)
        return state

    def _arrays(self, k: int) -> dict:
        if self._open[k] is None:
            self._open[k] = open_shard(self.files[k])
        return self._open[k]

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, index within the shard) of global sample indices."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"sample {bad} is out of range for {self.root} ({len(self)} samples)")
        shard = np.searchsorted(self._cum, idx, side="right") - 1
        return shard, idx - self._cum[shard]

    def check_labels(self, num_classes: int | None) -> None:
        """Every label in [0, num_classes) (the index's class count when None); an error names
        the first offending shard and sample."""
        limit = self.num_classes if num_classes is None else num_classes
        bad = np.nonzero((self.labels < 0) | (self.labels >= limit))[0]
        if bad.size:
            shard, local = self.locate(bad[:1])
            raise ShardError(f"{self.files[shard[0]]}: sample {local[0]} has label {self.labels[bad[0]]}, outside "
                             f"[0, {limit}) (model.num_classes={limit}; the data has {self.num_classes} classes, "
                             f"{bad.size} such samples)")

    # -- reading ---------------------------------------------------------------------------
    def read(self, indices) -> dict:
        """Samples as numpy, images left encoded: {"latent": float32 [B, ...] (scaled),
        "label": int64 [B], and "teacher": float16 [B, T, D], or "image": uint8 [B, 3, r, r]
        (format raw), or "image_bytes": a list of B uint8 arrays (PNG/JPEG, views into the
        mapped shards)}. What every loader is built on."""
        shard, local = self.locate(indices)
        b = len(shard)
        out = {"latent": np.empty((b, *self.latent_shape), np.float32), "label": np.empty(b, np.int64)}
        if self.kind == "teacher":
            out["teacher"] = np.empty((b, *self.teacher_shape), np.float16)
        elif self.image_format == "raw":
            out["image"] = np.empty((b, 3, self.resolution, self.resolution), np.uint8)
        else:
            out["image_bytes"] = [None] * b
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            a, pos = self._arrays(int(k)), local[rows]
            out["latent"][rows] = a["latent"][pos]
            out["label"][rows] = a["label"][pos]
            if self.kind == "teacher":
                out["teacher"][rows] = a["teacher"][pos]
            elif self.image_format == "raw":
                out["image"][rows] = a["image"][pos]  # a copy out of the page cache, no decode
            else:
                offsets = a["image_offsets"]
                for row, p in zip(rows, pos):
                    out["image_bytes"][row] = a["image_bytes"][offsets[p]:offsets[p + 1]]
        out["latent"] *= self.latent_scale  # float32 x float32(0.3099), as torch's `latent * 0.3099`
        return out

    def batch(self, indices) -> dict:
        """Many items at once, stacked as torch tensors (the loader's fast path): "latent",
        "label" (int64) and "image" (uint8 [B, 3, r, r]: raw as read, PNG/JPEG decoded with PIL)
        or "teacher"."""
        raw = self.read(indices)
        out = {"latent": torch.from_numpy(raw["latent"]), "label": torch.from_numpy(raw["label"])}
        if self.kind == "teacher":
            out["teacher"] = torch.from_numpy(raw["teacher"])
        elif self.image_format == "raw":
            out["image"] = torch.from_numpy(raw["image"])
        else:
            r = self.resolution
            images = np.empty((len(raw["label"]), 3, r, r), np.uint8)
            for row, data in enumerate(raw["image_bytes"]):
                images[row] = decode_image(data)
            out["image"] = torch.from_numpy(images)
        return out

    def __getitem__(self, i: int) -> dict:
        item = self.batch([i])
        return {k: (int(v[0]) if k == "label" else v[0]) for k, v in item.items()}
