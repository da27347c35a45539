"""Features of uint8 images for the metrics, and the reference set with its on-disk cache.

  * Inception (srdit.eval.inception): pool [N, 2048] (FID, P/R), spatial [N, 2023] (sFID),
    logits [N, 1008] (IS), in fp32 with TF32 off (`strict_fp32`).
  * KDD (SPEC 5): DINOv2 ViT-L/14 class token after the final LayerNorm [N, 1024], of images
    resized to 224 x 224 with PIL's bicubic filter (on the uint8 images, as torchvision's Resize on
    PIL images does: antialiased when shrinking, rounded back to uint8), then x / 255 and ImageNet
    mean/std. The network is built with pos_interp="dinov2" at 224 px, i.e. what the hub model fed
    224 px computes (its +0.1-offset position interpolation).

Images arrive as batches (numpy or torch, NHWC or NCHW uint8); only the features are kept.

Reference features are cached as .npz files, by default in `.srdit_eval_cache/` beside the
reference file (else ~/.cache/srdit/eval), named after the SHA-256 of the image file, of the
network's weights and of the preprocessing settings, so a changed file, network or setting never
reuses a stale cache. Writes are atomic (temporary file, rename); an entry that does not read
back whole (a damaged or truncated file) is computed again and replaced, with a line saying so.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from srdit.config import IMAGENET_MEAN, IMAGENET_STD
from srdit.eval import inception as inception_module
from srdit.eval.metrics import feature_stats, require_finite
from srdit.io import atomic_write, sha256_file
from srdit.sample.npz import NpzRows, npz_members, read_arrays

KDD_ARCH = "vitl14"
KDD_SIZE = 224
KDD_WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"


# ----------------------------------------------------------------------------- precision


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for the feature networks (ADM-comparable fp32), restored afterwards."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _nhwc_numpy(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.dim() == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.permute(0, 2, 3, 1)
        images = images.cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3] images, got {images.dtype} {images.shape}")
    return images


# ----------------------------------------------------------------------------- extractors


@torch.no_grad()
def inception_features(model, batches, device=None, name: str = "images") -> dict[str, np.ndarray]:
    """{"pool", "spatial", "logits"} float32 arrays over all images of `batches` (an iterable of
    uint8 image batches), computed on the model's device; non-finite features are an error
    naming `name` and the batch."""
    device = device or model.fc.weight.device
    out: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    with strict_fp32():
        for i, images in enumerate(batches):
            x = torch.as_tensor(images).to(device)
            feats = model(x)
            for key in out:
                out[key].append(feats[key].float().cpu().numpy())
                require_finite(f"the Inception {key} features of {name} (batch {i})", out[key][-1])
    if not out["pool"]:
        raise ValueError("no images")
    return {key: np.concatenate(parts) for key, parts in out.items()}


def kdd_inputs(images, size: int = KDD_SIZE, threads: int = 8) -> torch.Tensor:
    """uint8 images -> float32 [B, 3, size, size]: PIL bicubic resize, / 255, ImageNet mean/std."""
    from PIL import Image

    images = _nhwc_numpy(images)
    if images.shape[1:3] != (size, size):
        def resize(img: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))

        with ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:  # PIL drops the GIL
            images = np.stack(list(pool.map(resize, images)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, S, S]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def kdd_features(teacher, batches, device=None, name: str = "images") -> np.ndarray:
    """DINOv2 class tokens (after the final norm) [N, D] float32 of all images of `batches`;
    non-finite features are an error naming `name` and the batch."""
    device = device or teacher.cls_token.device
    out = []
    with strict_fp32():
        for i, images in enumerate(batches):
            cls, _ = teacher.forward_features(kdd_inputs(images, teacher.img_size).to(device))
            out.append(cls.float().cpu().numpy())
            require_finite(f"the KDD (DINOv2) features of {name} (batch {i})", out[-1])
    if not out:
        raise ValueError("no images")
    return np.concatenate(out)


def load_kdd_teacher(path: str, device=None):
    """DINOv2 ViT-L/14 from `dinov2_vitl14_pretrain.pth`, built as the hub model fed 224 px."""
    from srdit.model.dinov2 import load_dinov2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"KDD network weights not found at {path!r}: expected {KDD_WEIGHTS_FILE} "
                                "(DINOv2 ViT-L/14, ~1.2 GB, from the DINOv2 release). Nothing is downloaded.")
    return load_dinov2(KDD_ARCH, path, KDD_SIZE, pos_interp="dinov2").to(device or "cpu")


# ----------------------------------------------------------------------------- images on disk


def _image_rows(rows: NpzRows) -> NpzRows:
    if rows.dtype != np.uint8 or len(rows.shape) != 4 or rows.shape[-1] != 3:
        raise ValueError(f"{rows.path}: arr_0 must be uint8 [N, H, W, 3], found {rows.dtype} {rows.shape}")
    return rows


def npz_images(path: str, batch: int):
    """uint8 image batches of `arr_0` of an .npz, streamed (one batch in RAM)."""
    with NpzRows(path, "arr_0") as rows:
        yield from _image_rows(rows).batches(batch)


def npz_image_shape(path: str) -> tuple[int, int, int, int]:
    """(N, H, W, 3) of the images `arr_0` of an .npz, from its header (no image is read); a file
    without them, or not uint8 [N, H, W, 3], is an error naming it."""
    with NpzRows(path, "arr_0") as rows:
        return tuple(_image_rows(rows).shape)


# ----------------------------------------------------------------------------- identities and cache

_FILE_HASHES: dict[tuple, str] = {}
_MODULE_HASHES: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def file_sha256(path: str) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the life of the process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def module_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a network's state (names and values); remembered per module object."""
    if module not in _MODULE_HASHES:
        h = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        _MODULE_HASHES[module] = h.hexdigest()
    return _MODULE_HASHES[module]


def default_cache_dir(reference: str) -> str:
    """`.srdit_eval_cache` beside the reference file if writable, else ~/.cache/srdit/eval."""
    beside = os.path.join(os.path.dirname(os.path.abspath(reference)), ".srdit_eval_cache")
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    return os.path.join(os.path.expanduser("~"), ".cache", "srdit", "eval")


def cached(cache_dir: str | None, name: str, key_parts: list[str], compute, keys: tuple[str, ...]):
    """compute() -> dict of the arrays `keys`, stored as <cache_dir>/<name>-<hash>.npz; cache_dir
    None: no cache. An entry that cannot be read whole (damaged, truncated, without one of
    `keys`) is a miss: computed again and replaced, with a line saying so."""
    if cache_dir is None:
        return compute()
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"{name}-{key}.npz")
    if os.path.exists(path):
        try:
            return read_arrays(path, keys)
        except ValueError as error:
            print(f"feature cache: {error}; computing it again and replacing it", flush=True)
    value = compute()
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **value)
    return value


class ReferenceSet:
    """A reference .npz (ADM's VIRTUAL_imagenet256_labeled.npz: `arr_0` images, `mu`, `sigma`,
    `mu_s`, `sigma_s`) and features of its images, computed once and cached."""

    def __init__(self, path: str, *, batch: int = 250, cache_dir: str | None = "default"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference batch not found: {path} (e.g. VIRTUAL_imagenet256_labeled.npz "
                                    "from the ADM evaluation suite)")
        self.path, self.batch = path, batch
        self.cache_dir = default_cache_dir(path) if cache_dir == "default" else cache_dir
        self.members = npz_members(path)

    def _key(self, network: torch.nn.Module, settings: str) -> list[str]:
        return [f"file {file_sha256(self.path)}", f"net {module_sha256(network)}", settings]

    def inception(self, model) -> dict[str, np.ndarray]:
        """Inception features of the reference images (pool, spatial, logits)."""
        settings = f"inception v1 size {inception_module.INPUT_SIZE} tf1-bilinear (x-128)/128"
        return cached(self.cache_dir, "inception", self._key(model, settings),
                      lambda: inception_features(model, npz_images(self.path, self.batch), name=self.path),
                      keys=("pool", "spatial", "logits"))

    def stats(self, model) -> tuple[dict[str, np.ndarray], str]:
        """(mu, sigma, mu_s, sigma_s, source): stored in the npz (ADM), else from its images."""
        if {"mu", "sigma", "mu_s", "sigma_s"} <= self.members:
            with np.load(self.path) as f:
                stats = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
            for k, v in stats.items():
                require_finite(f"{self.path}: its stored {k}", v)
            return stats, "stored in the reference npz"
        feats = self.inception(model)
        mu, sigma = feature_stats(feats["pool"])
        mu_s, sigma_s = feature_stats(feats["spatial"])
        return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}, "computed from the reference images"

    def kdd(self, teacher) -> np.ndarray:
        settings = f"kdd v1 size {teacher.img_size} pil-bicubic imagenet-norm cls-after-norm {teacher.pos_interp}"
        return cached(self.cache_dir, "kdd", self._key(teacher, settings),
                      lambda: {"cls": kdd_features(teacher, npz_images(self.path, self.batch),
                                                   name=self.path)}, keys=("cls",))["cls"]
