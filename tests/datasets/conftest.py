"""Shared material of the data tests: random-init weights in the original layouts, a tiny
ImageNet-style folder of JPEGs (3 classes x 4 images of odd sizes, one grayscale, plus a
truncated and a garbage file), and prepared directories made once per session by the real
command (`srdit.data.prepare.main`) at 64 px (latents 32 x 4 x 4, teacher at 56 px = 4 x 4
patches), small enough to encode in seconds on 2 CPU cores."""
import contextlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from srdit.data.prepare import main as prepare_main

RES = 64  # 16x smaller latents than ImageNet-256's, the same code path
SIZES = [(75, 51), (97, 131), (64, 64), (300, 260)]  # (W, H): upsampled, portrait, exact, halved twice
CLASSES = ["n03000000", "n01000000", "n02000000"]  # unsorted on purpose: labels follow sorted names


def smooth_image(rng, w, h, mode="RGB"):
    """A photo-like test image: low-frequency noise, bicubic-upsampled."""
    channels = 3 if mode == "RGB" else 1
    small = (rng.random((h // 8 + 2, w // 8 + 2, channels)) * 255).astype(np.uint8)
    image = Image.fromarray(small[..., 0] if mode == "L" else small, mode)
    return image.resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """{"vae": INVAE file, "teacher": DINOv2 ViT-B/14 file}, random init, original key layouts."""
    from srdit.model.dinov2 import build_dinov2
    from srdit.model.invae import build_invae

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(build_invae().state_dict(), root / "e2e-invae-400k.pt")
    torch.save(build_dinov2("vitb14", 224).state_dict(), root / "dinov2_vitb14_pretrain.pth")
    return {"vae": str(root / "e2e-invae-400k.pt"), "teacher": str(root / "dinov2_vitb14_pretrain.pth")}


@pytest.fixture(scope="session")
def imagenet_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for j, (w, h) in enumerate(SIZES):
            mode = "L" if (c, j) == (1, 2) else "RGB"
            smooth_image(rng, w, h, mode).save(root / name / f"img_{j}.JPEG", quality=90)
    (root / CLASSES[2] / "bad_garbage.JPEG").write_bytes(b"this is not an image")
    good = (root / CLASSES[0] / "img_1.JPEG").read_bytes()
    (root / CLASSES[0] / "img_9_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / CLASSES[0] / "notes.txt").write_text("not an image extension: ignored")
    return root


def _run_prepare(*argv) -> tuple[int, str]:
    """The real command in-process: (exit code, stdout + stderr)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = prepare_main([str(a) for a in argv])
    return code, buffer.getvalue()


@pytest.fixture(scope="session")
def run_prepare():
    return _run_prepare


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, imagenet_src, weights):
    """Images (the default format, raw) + latents, 4 samples per shard: (directory, command output)."""
    out = tmp_path_factory.mktemp("prepared") / "in64"
    code, text = _run_prepare("--src", imagenet_src, "--out", out, "--resolution", RES, "--vae", weights["vae"],
                             "--batch", 5, "--shard-size", 4, "--workers", 0)
    assert code == 0, text
    return out, text


@pytest.fixture(scope="session")
def prepared_jpeg(tmp_path_factory, imagenet_src, weights):
    """As `prepared`, with the images stored as JPEG q95 4:4:4 (--image-format jpeg)."""
    out = tmp_path_factory.mktemp("prepared") / "in64-jpeg"
    code, text = _run_prepare("--src", imagenet_src, "--out", out, "--resolution", RES, "--vae", weights["vae"],
                             "--batch", 5, "--shard-size", 4, "--workers", 0, "--image-format", "jpeg")
    assert code == 0, text
    return out, text


@pytest.fixture(scope="session")
def prepared_teacher(tmp_path_factory, imagenet_src, weights):
    """Latents + cached DINOv2 targets [17, 768] fp16 (no images)."""
    out = tmp_path_factory.mktemp("prepared") / "in64-teacher"
    code, text = _run_prepare("--src", imagenet_src, "--out", out, "--resolution", RES, "--vae", weights["vae"],
                             "--teacher", weights["teacher"], "--cache-teacher", "--batch", 8, "--workers", 0)
    assert code == 0, text
    return out, text
