"""What `srdit.data.prepare` reads: an ImageNet-style folder or the release's preprocessed
layout, listed in a fixed order, and one source sample loaded and cropped (in a worker).

ImageNet-style folder: one subfolder per class (synset); labels are the positions of the
subfolder names in sorted order; files are the images of each subfolder, sorted by name.

Release layout: what the SR-DiT release (SwayStar123/SpeedrunDiT) trains on, written by its
preprocessing/dataset_tools.py (`convert`, then `encode`) and read by its dataset.py:
    images/00000/img00000000.png ...              ADM centre crops (`--transform
                                                   center-crop-dhariwal`), uncompressed PNG
    images/dataset.json                            {"labels": [["00000/img00000000.png", 0], ...]}
    vae-in/00000/img-latents-00000000.npy ...     float32 [1, 32, r/16, r/16]: ONE INVAE posterior
                                                   sample (mean + std * eps, drawn once by `encode`),
                                                   NOT scaled (0.3099 is applied at load)
    vae-in/dataset.json                            {"labels": [["00000/img-latents-00000000.npy", 0], ...]}
Samples pair the i-th image with the i-th latent, both lists in sorted path order (as the
release's dataset.py does: the numbers in the names need not agree, since `encode` numbers the
latents by position in the sorted image listing while `convert` keeps the source index, which
has gaps where an image failed); the label is the latent's, from vae-in/dataset.json. The latent
is stored as it is (no re-sampling). With `--latents encode`, or without vae-in/, the images are
encoded with --vae (labels from vae-in/dataset.json if present, else images/dataset.json).

No version of the release wrote INVAE (mean, std) moments as .npy files, so srdit reads none:
its git history before the INVAE change (the REG code it forked) wrote
`vae-sd/*/img-mean-std-*.npy` moments of the SD-VAE (sd-vae-ft-mse, [8, r/8, r/8]), another
tokenizer; REPA-E's cache_latents.py writes INVAE moments [64, r/16, r/16] under those names
inside one HDF5 file, not as a folder of .npy files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from srdit.data.crop import center_crop_dhariwal
from srdit.data.shards import IMAGE_FORMATS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
JPEG_QUALITY = 95  # JPEG quality of the stored crops, 4:4:4 chroma (no subsampling), baseline


class SourceError(ValueError):
    """A source folder that cannot be listed as a dataset; names the path and the fix."""


@dataclass
class Source:
    root: str
    layout: str  # "imagenet" | "release"
    files: list[str]  # image paths relative to image_root
    labels: np.ndarray  # int64 [N]
    classes: list[str]  # names only (printable), for the index
    latents: list[str] | None = None  # release vae-in/ latent files (relative to it), paired by position, or None

    @property
    def image_root(self) -> str:
        return os.path.join(self.root, "images") if self.layout == "release" else self.root

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        listing = hashlib.sha256()
        for path, label in zip(self.files, self.labels.tolist()):
            listing.update(os.fsencode(path) + f"\t{label}\n".encode())  # a name's own bytes, UTF-8 or not
        return {"path": printable(os.path.abspath(self.root)), "layout": self.layout, "files": len(self.files),
                "listing_sha256": listing.hexdigest(),
                "latents": "release vae-in sampled latents" if self.latents else "encoded"}


def printable(text: str) -> str:
    """`text` as valid Unicode: the bytes of a file name that are not UTF-8, which os.listdir hands
    over as lone surrogates, shown as \\xNN (as `ls -b` does); other text is returned as it is.
    UTF-8 cannot encode a lone surrogate (printing one to a log fails) and JSON holds one only as
    an escape that other readers reject, so names are stored and printed through this; files are
    opened by their own names."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte: not from the file system
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found += [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names
                  if not n.startswith(".") and n.lower().endswith(extensions)]
    return sorted(found)


def list_source(root, *, use_latents: bool = True) -> Source:
    """The source folder's samples in their fixed order (see the module docstring)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise SourceError(f"--src {root} is not a directory")
    if os.path.isdir(os.path.join(root, "images")) and (
            os.path.isfile(os.path.join(root, "vae-in", "dataset.json"))
            or os.path.isfile(os.path.join(root, "images", "dataset.json"))):
        return _list_release(root, use_latents)
    return _list_imagenet(root)


def _list_imagenet(root: str) -> Source:
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise SourceError(f"--src {root} has no class subfolders (expected an ImageNet-style folder "
                          f"CLASS/IMAGE.JPEG, or the release layout images/ + vae-in/)")
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(n for n in os.listdir(os.path.join(root, name)) if _is_image(n))
        files += [f"{name}/{n}" for n in names]
        labels += [label] * len(names)
    if not files:
        raise SourceError(f"--src {root}: its {len(classes)} class subfolders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Source(root, "imagenet", files, np.asarray(labels, np.int64), [printable(c) for c in classes])


def _read_labels(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f).get("labels")
        table = {str(p).replace("\\", "/"): int(label) for p, label in labels or ()}
    except (ValueError, TypeError, AttributeError) as error:
        raise SourceError(f"{path} is not a labels file ({type(error).__name__}: {error}); expected "
                          f"{{\"labels\": [[path, label], ...]}}") from None
    if not table:
        raise SourceError(f"{path} holds no labels (expected {{\"labels\": [[path, label], ...]}}; the release's "
                          f"dataset_tools.py writes null when a source image had no label)")
    return table


def _list_release(root: str, use_latents: bool) -> Source:
    files = _walk_files(os.path.join(root, "images"), IMAGE_EXTENSIONS)
    if not files:
        raise SourceError(f"{os.path.join(root, 'images')} holds no images")
    vae_in = os.path.join(root, "vae-in")
    vae_json = os.path.join(vae_in, "dataset.json")
    if os.path.isfile(vae_json):  # labels keyed by the latents' names, latents paired by position
        table, keys = _read_labels(vae_json), _walk_files(vae_in, (".npy",))
        if len(keys) != len(files):
            raise SourceError(f"{root}: images/ holds {len(files):,} images but vae-in/ {len(keys):,} latent files "
                              f"(the release pairs them by sorted position, so the counts must agree)")
        where = vae_json
    else:
        table, keys, where = _read_labels(os.path.join(root, "images", "dataset.json")), files, "images/dataset.json"
    missing = [k for k in keys if k not in table]
    if missing:
        raise SourceError(f"{len(missing):,} sample(s) of {root} have no label in {where}, e.g. {missing[0]} "
                          f"(the folder and its dataset.json do not match)")
    labels = np.asarray([table[k] for k in keys], np.int64)
    if labels.min() < 0:
        raise SourceError(f"{root}: negative label {labels.min()} in {where}")
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    latents = keys if use_latents and os.path.isfile(vae_json) else None
    return Source(root, "release", files, labels, classes, latents)


# ------------------------------------------------------------------------------------------
# one sample (runs in a DataLoader worker)
# ------------------------------------------------------------------------------------------
def encode_image(crop: np.ndarray, image_format: str) -> np.ndarray:
    """uint8 [r, r, 3] -> what a shard stores: "raw" the crop itself as uint8 [3, r, r] (CHW, the
    batch layout: nothing to decode), else encoded bytes as a uint8 array: baseline JPEG q95 with
    4:4:4 chroma, or PNG (zlib level 6, lossless)."""
    if image_format == "raw":
        return np.ascontiguousarray(crop.transpose(2, 0, 1))
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(crop).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(crop).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8)


class SourceSamples:
    """Map-style dataset over source indices: the ADM crop, the image as stored (encode_image)
    and (release layout) the stored latent as its file holds it; any failure is returned as an
    error string, never raised, so one bad file does not stop the run."""

    def __init__(self, source: Source, resolution: int, image_format: str | None):
        self.source, self.resolution, self.image_format = source, resolution, image_format

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        src = self.source
        path = os.path.join(src.image_root, src.files[i])
        try:
            with Image.open(path) as image:
                image.load()
                crop = center_crop_dhariwal(image, self.resolution)  # [r, r, 3] uint8
            item = {"index": i, "error": None, "crop": crop, "encoded": None, "latent": None}
            if self.image_format:
                item["encoded"] = encode_image(crop, self.image_format)
            if src.latents is not None:  # the release's stored sample; its shape is checked by prepare
                item["latent"] = np.load(os.path.join(src.root, "vae-in", src.latents[i]), allow_pickle=False)
            return item
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and logged
            return {"index": i, "error": printable(f"{type(error).__name__}: {error}".replace("\n", " "))}


def as_list(items):
    """DataLoader collate that keeps the samples as a list (they are ragged)."""
    return items
