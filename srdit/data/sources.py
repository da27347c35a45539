"""What `srdit.data.prepare` reads: an ImageNet-style folder or the release's preprocessed
layout, listed in a fixed order, and one source sample loaded and cropped (in a worker).

ImageNet-style folder: one subfolder per class (synset); labels are the positions of the
subfolder names in sorted order; files are the images of each subfolder, sorted by name.

Release layout (REPA/REPA-E `dataset_tools`, what the SR-DiT release trains on):
    images/00000/img00000000.png ...            ADM-cropped images
    vae-in/00000/img-mean-std-00000000.npy ...  INVAE posterior (mean, std): [64, r/16, r/16]
    vae-in/dataset.json                          {"labels": [["00000/img-mean-std-00000000.npy", 0], ...]}
Samples are the images in sorted path order, each paired with the .npy of the same number.
With vae-in/ the latent is drawn from those moments (no re-encoding); without it, labels come
from images/dataset.json (keyed by image path) and the images are encoded with --vae.
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
    classes: list[str]
    moments: list[str] | None = None  # release vae-in .npy paths relative to root/vae-in, or None

    @property
    def image_root(self) -> str:
        return os.path.join(self.root, "images") if self.layout == "release" else self.root

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        listing = hashlib.sha256()
        for path, label in zip(self.files, self.labels.tolist()):
            listing.update(f"{path}\t{label}\n".encode())
        return {"path": os.path.abspath(self.root), "layout": self.layout, "files": len(self.files),
                "listing_sha256": listing.hexdigest(), "latents": "vae-in moments" if self.moments else "encoded"}


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str) -> list[str]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found += [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names if _is_image(n)]
    return sorted(found)


def list_source(root, *, use_moments: bool = True) -> Source:
    """The source folder's samples in their fixed order (see the module docstring)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise SourceError(f"--src {root} is not a directory")
    if os.path.isdir(os.path.join(root, "images")) and (
            os.path.isfile(os.path.join(root, "vae-in", "dataset.json"))
            or os.path.isfile(os.path.join(root, "images", "dataset.json"))):
        return _list_release(root, use_moments)
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
    return Source(root, "imagenet", files, np.asarray(labels, np.int64), classes)


def _moments_name(image_path: str) -> str:
    """00000/img00000000.png -> 00000/img-mean-std-00000000.npy (REPA's naming)."""
    folder, name = os.path.split(image_path)
    stem = os.path.splitext(name)[0]
    if stem.startswith("img"):
        stem = "img-mean-std-" + stem[3:]
    return f"{folder}/{stem}.npy" if folder else f"{stem}.npy"


def _read_labels(path: str) -> dict[str, int]:
    with open(path) as f:
        labels = json.load(f).get("labels")
    if not labels:
        raise SourceError(f"{path} holds no labels (expected {{\"labels\": [[path, label], ...]}})")
    return {str(p).replace("\\", "/"): int(label) for p, label in labels}


def _list_release(root: str, use_moments: bool) -> Source:
    files = _walk_images(os.path.join(root, "images"))
    if not files:
        raise SourceError(f"{os.path.join(root, 'images')} holds no images")
    vae_json = os.path.join(root, "vae-in", "dataset.json")
    if os.path.isfile(vae_json):  # labels keyed by the moments' names
        table, keys = _read_labels(vae_json), [_moments_name(p) for p in files]
    else:
        table, keys = _read_labels(os.path.join(root, "images", "dataset.json")), files
    moments = keys if use_moments and os.path.isfile(vae_json) else None
    missing = [k for k in keys if k not in table]
    if missing:
        raise SourceError(f"{len(missing)} sample(s) of {root} have no label, e.g. {missing[0]} "
                          f"(images/ and the dataset.json do not match)")
    labels = np.asarray([table[k] for k in keys], np.int64)
    if labels.min() < 0:
        raise SourceError(f"{root}: negative label {labels.min()} in its dataset.json")
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return Source(root, "release", files, labels, classes, moments)


# ------------------------------------------------------------------------------------------
# one sample (runs in a DataLoader worker)
# ------------------------------------------------------------------------------------------
def encode_image(crop: np.ndarray, image_format: str) -> np.ndarray:
    """uint8 [r, r, 3] -> encoded bytes as a uint8 array: baseline JPEG q95 with 4:4:4 chroma,
    or PNG."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(crop).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(crop).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8)


class SourceSamples:
    """Map-style dataset over source indices: the ADM crop, its encoded bytes and (release
    layout) the moments; any failure is returned as an error string, never raised, so one bad
    file does not stop the run."""

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
            item = {"index": i, "error": None, "crop": crop, "encoded": None, "moments": None}
            if self.image_format:
                item["encoded"] = encode_image(crop, self.image_format)
            if src.moments is not None:
                item["moments"] = np.load(os.path.join(src.root, "vae-in", src.moments[i]))
            return item
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and logged
            return {"index": i, "error": f"{type(error).__name__}: {error}".replace("\n", " ")}


def as_list(items):
    """DataLoader collate that keeps the samples as a list (they are ragged)."""
    return items
