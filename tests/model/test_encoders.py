"""Frozen encoders: DINOv2 teacher (srdit.model.dinov2) and the INVAE tokenizer (srdit.model.invae).

Layouts are checked against tests/data/*.json (copies of shared/layouts/) (the reference modules' state_dict order).
Files "in the original format" are random tensors shaped from those JSONs. Error-path files use
stride-0 expanded scalars (torch.save keeps the view), so they cost bytes, not hundreds of MB.
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srdit.config import LATENT_SCALE
from srdit.model.dinov2 import (
    ARCHS,
    DINOv2,
    DINOv2Arch,
    build_dinov2,
    load_dinov2,
    repa_targets,
    resample_pos_embed,
)
from srdit.model.invae import AttnBlock, build_invae, load_invae, pixels_from_uint8, to_uint8

LAYOUTS = Path(__file__).resolve().parents[1] / "data"  # copies of shared/layouts/*.json


def layout(name: str) -> list[tuple[str, list[int], str]]:
    return [tuple(e) for e in json.loads((LAYOUTS / f"{name}.json").read_text())]


def as_layout(sd: dict) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype)) for k, v in sd.items()]


def random_sd(name: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape, _ in layout(name)}


def cheap_sd(name: str) -> dict:
    """Right keys and shapes, no memory: every tensor a stride-0 view of one scalar."""
    return {k: torch.zeros(()).expand(shape) for k, shape, _ in layout(name)}


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------
def test_invae_layout_matches_json():
    assert as_layout(build_invae().state_dict()) == layout("invae_f16d32")


def test_dinov2_vitb14_layout_matches_json():
    assert as_layout(build_dinov2("vitb14", 224).state_dict()) == layout("dinov2_vitb14")


def test_dinov2_vitl14_layout_matches_json():
    with torch.device("meta"):
        model = build_dinov2("vitl14", 224)
    assert as_layout(model.state_dict()) == layout("dinov2_vitl14")


def test_dinov2_tiny_layout():
    sd = build_dinov2("tiny", 16).state_dict()
    assert sd["pos_embed"].shape == (1, 65, 64)
    assert sd["patch_embed.proj.weight"].shape == (64, 3, 2, 2)
    assert sum(k.endswith("ls1.gamma") for k in sd) == 2


# ------------------------------------------------------------------------------------------
# DINOv2 loading
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vitb14_file(tmp_path_factory):
    sd = random_sd("dinov2_vitb14", seed=1)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitb14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def vitb14_loaded(vitb14_file):
    return load_dinov2("vitb14", vitb14_file[0], 224)


def test_load_dinov2_original_format(vitb14_file, vitb14_loaded):
    _, sd = vitb14_file
    model = vitb14_loaded
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_dinov2_timm_layout_and_wrapper(tmp_path):
    sd = {k: v for k, v in build_dinov2("tiny", 16).state_dict().items()}
    timm_sd = {k: v for k, v in sd.items() if k != "mask_token"}
    torch.save({"model": timm_sd}, tmp_path / "wrapped.pth")
    model = load_dinov2("tiny", tmp_path / "wrapped.pth", 16)
    for k, v in timm_sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.save({"state_dict": sd}, tmp_path / "wrapped2.pth")
    load_dinov2("tiny", tmp_path / "wrapped2.pth", 16)


def test_load_dinov2_missing_key(tmp_path):
    sd = cheap_sd("dinov2_vitb14")
    del sd["blocks.3.attn.qkv.bias"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_dinov2("vitb14", path, 224)
    msg = str(err.value)
    assert str(path) in msg and "blocks.3.attn.qkv.bias" in msg and "dinov2_vitb14_pretrain.pth" in msg


def test_load_dinov2_wrong_shape_and_extra_key(tmp_path):
    sd = cheap_sd("dinov2_vitb14")
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(()).expand(10, 768)
    sd["register_tokens"] = torch.zeros(1, 4, 768)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_dinov2("vitb14", path, 224)
    msg = str(err.value)
    assert str(path) in msg and "blocks.0.mlp.fc1.weight" in msg and "register_tokens" in msg


@pytest.mark.parametrize("arch", ["vitb14", "vitl14"])
def test_load_dinov2_missing_file(tmp_path, arch):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_dinov2(arch, path, 224)
    assert str(path) in str(err.value) and f"dinov2_{arch}_pretrain.pth" in str(err.value)


# ------------------------------------------------------------------------------------------
# DINOv2 position embedding
# ------------------------------------------------------------------------------------------
def test_pos_embed_is_original_dinov2_interpolation(vitb14_file, vitb14_loaded):
    stored = vitb14_file[1]["pos_embed"]  # [1, 1370, 768]
    patch = stored[:, 1:].reshape(1, 37, 37, 768).permute(0, 3, 1, 2)
    resized = F.interpolate(patch, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    expected = torch.cat([stored[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 256, 768)], dim=1)
    assert vitb14_loaded.pos_grid_embed.shape == (1, 257, 768)
    torch.testing.assert_close(vitb14_loaded.pos_grid_embed, expected, rtol=0, atol=0)
    # the stored table itself is untouched (1370 rows) and stays the state_dict entry
    assert torch.equal(vitb14_loaded.state_dict()["pos_embed"], stored)


def test_pos_embed_differs_from_timm_resampling_and_timm_mode_matches_it(vitb14_file, vitb14_loaded):
    timm_pos = pytest.importorskip("timm.layers").resample_abs_pos_embed
    stored = vitb14_file[1]["pos_embed"]
    theirs = timm_pos(stored, [16, 16])  # antialias=True, no +0.1 offset
    ours = vitb14_loaded.pos_grid_embed
    assert torch.equal(ours[:, 0], theirs[:, 0])  # class row kept by both
    assert (ours[:, 1:] - theirs[:, 1:]).abs().max() > 0.1  # not a rounding difference
    # the release's REPA teacher (timm-resampled table) is available as pos_interp="timm"
    torch.testing.assert_close(resample_pos_embed(stored, 16, "timm"), theirs, rtol=0, atol=0)
    torch.testing.assert_close(resample_pos_embed(stored, 32, "timm"), timm_pos(stored, [32, 32]), rtol=0, atol=0)


def test_pos_embed_512px_grid_and_native_grid():
    stored = torch.randn(1, 1370, 8)
    assert resample_pos_embed(stored, 32, "dinov2").shape == (1, 1025, 8)  # 448 px
    for method in ("dinov2", "timm"):  # at 518 px both use the table as stored
        assert torch.equal(resample_pos_embed(stored, 37, method), stored)


def test_pos_embed_refreshed_after_load_state_dict_also_as_submodule():
    torch.manual_seed(0)
    teacher = DINOv2(DINOv2Arch(32, 1, 2, 2, 8, None), img_size=8)  # grid 4 from a stored 8x8
    parent = torch.nn.Module()
    parent.teacher = teacher
    sd = parent.state_dict()
    sd["teacher.pos_embed"] = torch.randn(1, 65, 32)
    parent.load_state_dict(sd)
    expected = resample_pos_embed(sd["teacher.pos_embed"], 4, "dinov2")
    torch.testing.assert_close(teacher.pos_grid_embed, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# DINOv2 forward
# ------------------------------------------------------------------------------------------
def test_dinov2_vitb14_forward_shapes(vitb14_loaded):
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        cls, patches = vitb14_loaded(images)
    assert cls.shape == (1, 768) and patches.shape == (1, 256, 768)
    assert torch.isfinite(cls).all() and torch.isfinite(patches).all()
    z = repa_targets(cls, patches)
    assert z.shape == (1, 257, 768)
    assert torch.equal(z[:, 0], cls) and torch.equal(z[:, 1:], patches)


def test_dinov2_tiny_forward_and_determinism():
    torch.manual_seed(3)
    a = build_dinov2("tiny", 16)
    torch.manual_seed(3)
    b = build_dinov2("tiny", 16)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        cls, patches = a(images)
    assert cls.shape == (2, 64) and patches.shape == (2, 64, 64)  # 8x8 grid of patch 2


def test_dinov2_forward_features_rejects_wrong_size():
    model = build_dinov2("tiny", 16)
    with pytest.raises(ValueError, match="16 px"):
        model.forward_features(torch.zeros(1, 3, 32, 32))


def test_dinov2_preprocessing_equals_manual():
    model = build_dinov2("tiny", 16).eval()
    images = torch.randint(0, 256, (2, 3, 27, 27), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = images.float() / 255
    # release order (REPA preprocess_raw_image): normalise, then bicubic resize
    release = F.interpolate((x - mean) / std, size=16, mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.preprocess(images), release, rtol=0, atol=0)
    # resize first, then normalise: the same up to rounding (bicubic weights sum to one)
    other = (F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False) - mean) / std
    torch.testing.assert_close(model.preprocess(images), other, rtol=0, atol=1e-5)
    # already at img_size: no resize
    same = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(model.preprocess(same), (same.float() / 255 - mean) / std, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images)[1], model.forward_features(release)[1], rtol=0, atol=0)


def test_dinov2_matches_timm_vision_transformer():
    """Independent reference for the block math: timm's DINOv2 ViT (reduced depth) fed the same
    weights and our resampled table must give the same normed tokens."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = DINOv2(DINOv2Arch(768, 2, 12, 14, 37, None), img_size=224).eval()
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0, depth=2)
    ref.eval()
    sd = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    sd["pos_embed"] = ours.pos_grid_embed.clone()
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cls, patches = ours.forward_features(x)
        tokens = ref.forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches, tokens[:, 1:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# DINOv2 as the training step runs it (online teacher under bf16 autocast)
# ------------------------------------------------------------------------------------------
def trained_like(model: DINOv2, seed: int = 1) -> DINOv2:
    """Norm weights and biases and LayerScale away from their init (1, 0, 1), as in a trained
    teacher, so that a norm or gamma left out or mixed up changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("gamma"):
                p.copy_(0.5 * torch.rand(p.shape, generator=g))
    return model


def run_counting_casts(model, images, autocast=True):
    """(cls, patches) under CPU bf16 autocast and no grad, and how many dtype casts (_to_copy) ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Casts.n += func.overloadpacket is torch.ops.aten._to_copy
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), Casts():
        out = model(images)
    return out, Casts.n


GEMM_MODULES = (torch.nn.Linear, torch.nn.Conv2d)


def test_precast_gemm_weights_is_bit_identical_under_autocast():
    """Autocast casts the frozen GEMM weights and biases to bf16 at every call; stored in bf16
    once, the same bits come out and those casts are gone (2 per Linear or conv), nothing else."""
    teacher = trained_like(build_dinov2("tiny", 16).freeze())
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    before, casts_before = run_counting_casts(teacher, images)
    assert teacher.precast_gemm_weights(torch.bfloat16) is teacher
    after, casts_after = run_counting_casts(teacher, images)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    gemms = [m for m in teacher.modules() if isinstance(m, GEMM_MODULES)]
    assert len(gemms) == 4 * 2 + 1 and casts_before - casts_after == 2 * len(gemms)
    bf16 = {id(p) for m in gemms for p in m.parameters()}
    for name, p in teacher.named_parameters():  # norms, LayerScale, tokens, pos_embed stay fp32
        assert p.dtype == (torch.bfloat16 if id(p) in bf16 else torch.float32), name
    assert teacher.pos_grid_embed.dtype == torch.float32


def test_precast_teacher_keeps_the_checkpoint_layout_and_loads():
    """state_dict() keeps the original file's layout (fp32, bf16-rounded values for the GEMM
    weights); loading an fp32 state dict into a precast teacher rounds as precasting does, and
    still refreshes the position table."""
    with torch.device("meta"):
        assert as_layout(build_dinov2("vitb14", 224).precast_gemm_weights().state_dict()) == layout("dinov2_vitb14")
    teacher = trained_like(build_dinov2("tiny", 16).freeze())
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    saved = teacher.precast_gemm_weights().state_dict()
    assert as_layout(saved) == as_layout(original)
    gemm_keys = {f"{n}.{p}" for n, m in teacher.named_modules() if isinstance(m, GEMM_MODULES)
                 for p in ("weight", "bias")}
    for k, v in saved.items():
        assert torch.equal(v, original[k].bfloat16().float() if k in gemm_keys else original[k]), k
    other = build_dinov2("tiny", 16).freeze().precast_gemm_weights()
    original["pos_embed"] = torch.randn_like(original["pos_embed"])
    other.load_state_dict(original)
    for k, v in other.state_dict().items():
        assert torch.equal(v, original[k].bfloat16().float() if k in gemm_keys else original[k]), k
    torch.testing.assert_close(other.pos_grid_embed, resample_pos_embed(original["pos_embed"], 8, "dinov2"),
                               rtol=0, atol=0)
    build_dinov2("tiny", 16).load_state_dict(saved, strict=True)  # what it saves loads anywhere


def test_precast_teacher_refuses_to_run_without_its_autocast():
    teacher = build_dinov2("tiny", 16).freeze().precast_gemm_weights()
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"stored in torch.bfloat16 .*autocast"):
        run_counting_casts(teacher, images, autocast=False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (tests/kernels/checks.py's measure)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def targets_of(model, images, autocast):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return repa_targets(*model(images))


@pytest.fixture(scope="module")
def teachers():
    """(eager, fused) ViT-B-width teachers of 2 blocks with the same weights, fed 56 px (17
    tokens), and images: every kind of norm (first, residual, final) at D = 768."""
    torch.manual_seed(0)
    arch = DINOv2Arch(768, 2, 12, 14, 37, None)
    eager = trained_like(DINOv2(arch, img_size=56).freeze())
    fused = DINOv2(arch, img_size=56, kernels="triton").freeze()
    fused.load_state_dict(eager.state_dict())
    return eager, fused, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)


def test_fused_teacher_matches_eager_in_fp32(teachers):
    """kernels="triton": the same math; in fp32 only the norms' summation order differs."""
    eager, fused, images = teachers
    want, got = targets_of(eager, images, False), targets_of(fused, images, False)
    assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-5


def test_fused_teacher_under_bf16_autocast(teachers):
    """Under bf16 autocast the fused norms write the GEMMs' bf16 themselves: the targets stay fp32
    and are as close to the float64 teacher as the eager ones are (the two differ by bf16
    rounding; the interpreter's bf16 stores truncate, which a GPU's do not, hence the 25%)."""
    eager, fused, images = teachers
    want, got = targets_of(eager, images, True), targets_of(fused, images, True)
    exact = targets_of(copy.deepcopy(eager).double(), images, False)
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) <= 1e-2
    assert rel_err(got, exact) <= 1.25 * rel_err(want, exact)


def test_fused_teacher_compiles_and_precasts(teachers):
    """torch.compile(fullgraph=True) traces the fused teacher under autocast (custom ops and
    their fakes, the autocast query) into the same ops (backend "eager": AOT autograd would
    decompose the GEMMs, which changes the eager teacher's bits as much); precasting the fused
    teacher is bit-identical."""
    _, fused, images = teachers
    fused = copy.deepcopy(fused)
    torch._dynamo.reset()
    want = targets_of(fused, images, True)
    assert torch.equal(targets_of(torch.compile(fused, fullgraph=True, backend="eager"), images, True), want)
    assert torch.equal(targets_of(fused.precast_gemm_weights(), images, True), want)


def test_build_teacher_runs_the_model_kernels():
    from srdit.config import KERNELS, apply_overrides, preset
    from srdit.train.inputs import build_teacher

    for kernels in KERNELS:
        cfg = apply_overrides(preset("quickstart"), [f"model.kernels={kernels}", "data.cached_teacher=false"])
        teacher, _ = build_teacher(cfg, torch.device("cpu"), random_init=True)
        assert (teacher.fused is None) == (kernels == "eager"), kernels
    with pytest.raises(ValueError, match="kernels='cuda'"):
        build_dinov2("tiny", 16, kernels="cuda")


# ------------------------------------------------------------------------------------------
# INVAE loading
# ------------------------------------------------------------------------------------------
def test_load_invae_original_format(tmp_path):
    sd = random_sd("invae_f16d32", seed=2)
    path = tmp_path / "e2e-invae-400k.pt"
    torch.save(sd, path)
    model = load_invae(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_invae_wrapped(tmp_path):
    for wrapper in ("vae", "state_dict"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: cheap_sd("invae_f16d32")}, path)
        load_invae(path)


def test_load_invae_missing_key(tmp_path):
    sd = cheap_sd("invae_f16d32")
    del sd["decoder.up.4.attn.2.proj_out.bias"]
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_invae(path)
    msg = str(err.value)
    assert str(path) in msg and "decoder.up.4.attn.2.proj_out.bias" in msg and "e2e-invae-400k.pt" in msg


def test_load_invae_wrong_shape(tmp_path):
    sd = cheap_sd("invae_f16d32")
    sd["quant_conv.weight"] = torch.zeros(()).expand(32, 64, 1, 1)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_invae(path)
    assert str(path) in str(err.value) and "quant_conv.weight" in str(err.value)


def test_load_invae_missing_file(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_invae(path)
    assert str(path) in str(err.value) and "e2e-invae-400k.pt" in str(err.value)


# ------------------------------------------------------------------------------------------
# INVAE behaviour
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def invae():
    torch.manual_seed(0)
    return build_invae().freeze()


@pytest.fixture(scope="module")
def pixels():
    return pixels_from_uint8(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))


def test_invae_shapes(invae, pixels):
    with torch.no_grad():
        mean, logvar = invae.encode_moments(pixels)
        z = invae.encode(pixels, torch.Generator().manual_seed(0))
        out = invae.decode(z)
    assert mean.shape == logvar.shape == z.shape == (1, 32, 2, 2)  # 16x down
    assert out.shape == (1, 3, 32, 32)


def test_invae_sampling_is_seeded(invae, pixels):
    with torch.no_grad():
        a = invae.encode(pixels, torch.Generator().manual_seed(7))
        b = invae.encode(pixels, torch.Generator().manual_seed(7))
        c = invae.encode(pixels, torch.Generator().manual_seed(8))
        mean, logvar = invae.encode_moments(pixels)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        scaled = invae.encode_scaled(pixels, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, mean + torch.exp(0.5 * logvar) * eps, rtol=0, atol=0)
    torch.testing.assert_close(scaled, a * LATENT_SCALE, rtol=0, atol=0)


def test_invae_decode_scaled(invae):
    z = torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(invae.decode_scaled(z), invae.decode(z / LATENT_SCALE), rtol=0, atol=0)


def test_invae_logvar_clamp(pixels):
    torch.manual_seed(0)
    model = build_invae().freeze()
    with torch.no_grad():
        model.quant_conv.bias[32:] = 1e4
        _, high = model.encode_moments(pixels)
        model.quant_conv.bias[32:] = -1e4
        _, low = model.encode_moments(pixels)
        model.quant_conv.bias[:32] = 0
        model.quant_conv.weight[:32] = 0
        z = model.encode(pixels, torch.Generator().manual_seed(0))  # mean 0, std exp(-15)
    assert torch.all(high == 20.0) and torch.all(low == -30.0)
    assert z.abs().max() < 10 * math.exp(-15)


def test_invae_attention_equals_ldm_formula():
    torch.manual_seed(0)
    block = AttnBlock(64)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        h = block.norm(x)
        q = block.q(h).reshape(2, 64, 16).permute(0, 2, 1)  # [B, HW, C]
        k = block.k(h).reshape(2, 64, 16)  # [B, C, HW]
        v = block.v(h).reshape(2, 64, 16)  # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) * 64**-0.5, dim=2)  # [B, HWq, HWk]
        ref = x + block.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 64, 4, 4))
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_pixel_conversions():
    u8 = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    torch.testing.assert_close(pixels_from_uint8(u8), u8.float() / 127.5 - 1, rtol=0, atol=0)
    assert pixels_from_uint8(u8)[0] == -1 and pixels_from_uint8(u8)[-1] == 1
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
    # truncation, not rounding: 255*(x+1)/2 = [-127.5, 0, 0.1275, 127.5, 191.25, 254.87, 255, 510]
    assert to_uint8(x).tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    formula = torch.clamp(255 * (x + 1) / 2, 0, 255).floor().to(torch.uint8)
    assert torch.equal(to_uint8(x), formula)
    assert to_uint8(x).dtype == torch.uint8


def test_arch_table():
    assert (ARCHS["vitb14"].embed_dim, ARCHS["vitb14"].depth, ARCHS["vitb14"].heads) == (768, 12, 12)
    assert (ARCHS["vitl14"].embed_dim, ARCHS["vitl14"].depth, ARCHS["vitl14"].heads) == (1024, 24, 16)
    with pytest.raises(ValueError, match="vitg14"):
        build_dinov2("vitg14", 224)
    with pytest.raises(ValueError, match="multiple"):
        build_dinov2("vitb14", 225)
