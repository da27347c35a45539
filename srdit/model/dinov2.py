"""DINOv2 ViT backbone (frozen teacher): REPA/REG targets (SPEC 3) and KDD features (SPEC 5).

Written from the DINOv2 paper and its published checkpoint layout. The state_dict equals the
original torch-hub file (`dinov2_vitb14_pretrain.pth`, `dinov2_vitl14_pretrain.pth`) key for key,
shape for shape and in the same order (see shared/layouts/dinov2_vit{b,l}14.json):

    cls_token [1,1,D], pos_embed [1,1370,D] (37*37+1 rows, the 518/14 training grid),
    mask_token [1,D] (unused here, kept so the original file loads strictly),
    patch_embed.proj.{weight [D,3,14,14], bias}, blocks.{i}.{norm1, attn.qkv [3D,D],
    attn.proj, ls1.gamma, norm2, mlp.fc1 [4D,D], mlp.fc2 [D,4D], ls2.gamma}, norm.{weight,bias}

Math (eval mode, no drop path):
    x = patch_embed(img)                  # [B, g*g, D], conv k = s = 14
    x = cat(cls, x) + pos                 # [B, 1+g*g, D]
    x = x + ls1 * attn(LN1(x))            # per block; LN eps 1e-6, qkv with bias, SDPA
    x = x + ls2 * fc2(gelu(fc1(LN2(x))))  # exact (erf) GELU
    out = LN(x) -> (out[:, 0], out[:, 1:])   (DINOv2's x_norm_clstoken, x_norm_patchtokens)

Position embedding for the grid g = img_size // 14 (computed once, a non-persistent buffer,
refreshed by a load_state_dict post-hook). Two resamplings exist and they do NOT agree:

  * "dinov2": the original hub model's `interpolate_pos_encoding`: the 37x37 patch grid is
    resized with F.interpolate(bicubic, antialias=False, scale_factor=((g+0.1)/37,)*2) in
    float32; when g == 37 the stored table is used as is. This is what a stock hub model fed
    224 px does (e.g. DINOv2-L/14 features for KDD, SPEC 5, if computed with the hub model).
  * "timm": timm's `resample_abs_pos_embed` (bicubic to size (g, g), antialias=True, no +0.1
    offset). This is what the SR-DiT release does for its REPA/REG teacher: its
    `utils.load_encoders` (inherited from REPA) overwrites `encoder.pos_embed.data` with
    `timm.layers.pos_embed.resample_abs_pos_embed(pos_embed, [16, 16])` (32 at 512 px), after
    which the hub model sees npatch == N and skips its own interpolation. With antialias the
    37 -> 16 downsample low-passes the table, so the two differ by far more than rounding.
    Re-implemented here from the math (timm is only a test dependency).

The default is "dinov2"; a teacher meant to reproduce the release's REPA/REG targets must be
built with pos_interp="timm" (the stored pos_embed, and so the file, is the same either way).

How it runs, for the online teacher of a training step (same math; neither changes the file):
  * kernels="triton" (model.kernels, passed by srdit.train.inputs.build_teacher): each
    LayerNorm runs fused with the residual add and LayerScale before it and with autocast's cast
    to the GEMM's dtype after it (srdit/kernels/layernorm.py, forward only), one launch per norm
    instead of four; each MLP's exact GELU runs in fc1's GEMM (srdit/kernels/mlp.py), one
    pass over the hidden layer fewer. Not bit-identical to "eager" (the norm's and the GEMM's
    reduction orders), which is kept exactly as written above: the reference.
  * precast_gemm_weights(bf16): the patch embedding's and the Linears' weights and biases are
    stored in bf16 once, so bf16 autocast stops casting them at every call (bit-identical).

Both keep the class row unchanged. Preprocessing of uint8 images is inside `forward`:
x / 255, ImageNet mean/std, bicubic resize (align_corners=False, no antialias) to img_size,
in the release's order (normalise, then resize; the two orders agree up to rounding because
bicubic weights sum to one).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from srdit.config import IMAGENET_MEAN, IMAGENET_STD, KERNELS, TEACHER_PATCH, ConfigError
from srdit.kernels.autocast import autocast_gemm_dtype, gemm_dtype
from srdit.model.weights import describe_mismatch, load_state_file

POS_INTERPS = ("dinov2", "timm")


@dataclass(frozen=True)
class DINOv2Arch:
    embed_dim: int
    depth: int
    heads: int
    patch: int
    pos_grid: int  # side of the stored pos_embed grid (37 = 518 / 14 for the hub files)
    file_name: str | None  # the original checkpoint's file name, for error messages


ARCHS = {
    "vitb14": DINOv2Arch(768, 12, 12, TEACHER_PATCH["vitb14"], 37, "dinov2_vitb14_pretrain.pth"),
    "vitl14": DINOv2Arch(1024, 24, 16, TEACHER_PATCH["vitl14"], 37, "dinov2_vitl14_pretrain.pth"),
    # CPU quickstart teacher: same code path, random init, stored grid 8x8 (img_size 16).
    "tiny": DINOv2Arch(64, 2, 2, TEACHER_PATCH["tiny"], 8, None),
}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def resample_pos_embed(pos_embed: torch.Tensor, grid: int, method: str) -> torch.Tensor:
    """[1, 1+M*M, D] stored table -> [1, 1+grid*grid, D] for a grid x grid patch layout.

    Computed in float32, returned in pos_embed's dtype; the class row (index 0) is kept.
    method "dinov2": original hub interpolation (scale_factor (g+0.1)/M, antialias off; the
    table itself when g == M). method "timm": timm resample_abs_pos_embed (size (g, g),
    antialias on; the table itself when g == M).
    """
    if method not in POS_INTERPS:
        raise ValueError(f"pos_interp={method!r} is not one of {POS_INTERPS}")
    n = pos_embed.shape[1] - 1
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch rows, not a square grid")
    if grid == m:  # both methods return the stored table unchanged at the native grid
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    cls_row, patch = table[:, :1], table[:, 1:]  # [1,1,D], [1,M*M,D]
    patch = patch.reshape(1, m, m, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if method == "dinov2":
        scale = (grid + 0.1) / m
        patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise RuntimeError(f"pos_embed resampled to {tuple(patch.shape[-2:])}, expected {(grid, grid)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)  # [1, g*g, D]
    return torch.cat([cls_row, patch], dim=1).to(pos_embed.dtype)  # [1, 1+g*g, D]


def repa_targets(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """REPA/REG target z = concat(class token, patch tokens): [B, D], [B, N, D] -> [B, 1+N, D]."""
    return torch.cat([cls.unsqueeze(1), patches], dim=1)


def _refresh_after_load(module: "DINOv2", _incompatible_keys) -> None:
    module.refresh_pos_embed()


def _checkpoint_dtypes(module: "DINOv2", state_dict: dict, prefix: str, _local_metadata) -> None:
    """state_dict() in the checkpoint's dtype (the class token's, fp32) also after
    precast_gemm_weights: what is saved keeps the original file's layout (bf16 -> fp32 is exact)."""
    dtype = module.cls_token.dtype
    for name, _ in module.named_parameters():
        key = prefix + name
        if key in state_dict and state_dict[key].dtype != dtype:
            state_dict[key] = state_dict[key].to(dtype)


def fused_ops(kernels: str, fused_mlp: bool = True) -> SimpleNamespace | None:
    """The teacher's fused ops for model.kernels: None for "eager" (Block.forward as written, the
    reference); srdit.kernels' fused LayerNorms and fc1 + GELU for "triton" (a ConfigError now,
    not at the first step, where triton is missing); fc1 + GELU eager when not fused_mlp."""
    if kernels not in KERNELS:
        raise ConfigError(f"kernels={kernels!r} is not one of {', '.join(map(repr, KERNELS))}")
    if kernels == "eager":
        return None
    import srdit.kernels
    from srdit.kernels import reference

    try:
        return SimpleNamespace(layer_norm=srdit.kernels.layer_norm,
                               residual_layer_norm=srdit.kernels.residual_layer_norm,
                               linear_gelu=srdit.kernels.linear_gelu if fused_mlp else reference.linear_gelu)
    except ImportError as error:
        raise ConfigError(f"the teacher with kernels='triton' needs the triton package ({error}); "
                          "use model.kernels=eager") from None


# ------------------------------------------------------------------------------------------
# modules (attribute names are the checkpoint's key names)
# ------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, g, g]
        return x.flatten(2).transpose(1, 2)  # [B, g*g, D]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # [B, N, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd], scale hd^-0.5
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, as nn.GELU()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))  # [B, N, D]
        return x + self.ls2(self.mlp(self.norm2(x)))  # [B, N, D]


class DINOv2(nn.Module):
    """DINOv2 backbone fed `img_size` px images (grid g = img_size // patch per side).

    Parameters are registered in the checkpoint's order (cls_token, pos_embed, mask_token,
    patch_embed, blocks, norm), so state_dict() lists them as the original file does.
    `pos_interp` picks the resampling of the stored table to the g x g grid; `kernels` and
    `fused_mlp` how the norms and the MLPs run (module docstring).
    """

    def __init__(self, arch: DINOv2Arch, img_size: int, pos_interp: str = "dinov2", kernels: str = "eager",
                 fused_mlp: bool = True):
        super().__init__()
        if img_size % arch.patch:
            raise ValueError(f"img_size={img_size} is not a multiple of the patch size {arch.patch}")
        if pos_interp not in POS_INTERPS:
            raise ValueError(f"pos_interp={pos_interp!r} is not one of {POS_INTERPS}")
        d = arch.embed_dim
        self.arch = arch
        self.img_size = img_size
        self.grid = img_size // arch.patch
        self.pos_interp = pos_interp
        self.fused = fused_ops(kernels, fused_mlp)
        self.embed_dim = d
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.pos_grid**2 + 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(arch.patch, d)
        self.blocks = nn.ModuleList(Block(d, arch.heads) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pos_grid_embed", torch.zeros(1, self.grid**2 + 1, d), persistent=False)
        self.initialize_weights()
        # Any load (also as a submodule of a larger model) refreshes the resampled table.
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.register_state_dict_post_hook(_checkpoint_dtypes)

    def initialize_weights(self) -> None:
        """DINOv2's init: trunc-normal(0.02) pos/linears, cls N(0, 1e-6), LayerScale 1.0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.refresh_pos_embed()

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        """Recompute the g x g position table from the stored pos_embed (after init / load)."""
        table = resample_pos_embed(self.pos_embed.detach(), self.grid, self.pos_interp)
        # clone: at the native grid `table` is the parameter itself; keep the buffer separate
        self.pos_grid_embed = table.to(self.pos_grid_embed.device, self.pos_grid_embed.dtype).clone()

    def freeze(self) -> DINOv2:
        """Eval mode, no gradients: the teacher is never trained."""
        self.eval()
        self.requires_grad_(False)
        return self

    @torch.no_grad()
    def precast_gemm_weights(self, dtype: torch.dtype = torch.bfloat16) -> DINOv2:
        """Store the patch embedding's and every Linear's weight and bias in `dtype`, once, for a
        teacher that runs under autocast to `dtype` (the training step's bf16): autocast casts
        them to `dtype` anyway, at every call, because a frozen weight is not in its cast cache
        (98 copies per teacher forward for ViT-B). Stored, they are not cast, and the outputs are
        bit-identical. LayerNorm and LayerScale parameters, the tokens and position tables stay
        fp32. state_dict() still gives the checkpoint's dtypes, and load_state_dict() rounds a
        file's weights to `dtype` as this does. Afterwards the teacher runs only under that
        autocast (forward_features refuses to run without it)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.to(dtype)
        return self

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> normalised float [B,3,img_size,img_size] (release order)."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
        x = images_uint8.float() / 255.0  # [B, 3, H, W] in [0, 1]
        x = (x - self.mean) / self.std  # ImageNet mean/std
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return x  # [B, 3, S, S]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float [B,3,S,S] (S = img_size) -> (cls [B,D], patches [B,g*g,D]), both after
        the final LayerNorm."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"DINOv2 built for {self.img_size} px got {tuple(x.shape[-2:])}; rebuild with that "
                "img_size or call forward() on uint8 images (it resizes)"
            )
        stored = self.patch_embed.proj.weight.dtype
        if stored != self.cls_token.dtype and autocast_gemm_dtype(x) != stored:
            raise RuntimeError(f"this teacher's GEMM weights are stored in {stored} (precast_gemm_weights): run it "
                               f"under torch.autocast(dtype={stored}), got autocast dtype {autocast_gemm_dtype(x)}")
        x = self.patch_embed(x)  # [B, g*g, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+g*g, D] (cat promotes dtypes, as the hub model)
        pos = self.pos_grid_embed
        if self.grid != self.arch.pos_grid and self.pos_interp == "dinov2":
            pos = pos.to(x.dtype)  # the hub model casts its interpolated table to x's dtype
        x = x + pos  # [B, 1+g*g, D]
        if self.fused is not None:
            x = self._fused_blocks(x)  # [B, 1+g*g, D]
        else:
            for block in self.blocks:
                x = block(x)  # [B, 1+g*g, D]
            x = self.norm(x)  # [B, 1+g*g, D]
        return x[:, 0], x[:, 1:]  # [B, D], [B, g*g, D]

    def _fused_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks and the final norm, Block.forward's math, with each LayerNorm fused with the
        residual add and LayerScale before it (x_new = x + f * gamma, stored in x's dtype as the
        unfused add stores it) and written in the dtype of the GEMM that reads it: a norm2, or
        the next block's norm1, after each residual branch. The final norm, the targets, keeps
        the stream's dtype, as LayerNorm gives it (fp32: under autocast too). The MLP's GELU runs
        in fc1's GEMM (srdit.kernels.linear_gelu, on fc1's stored output as the unfused gelu)."""
        ops = self.fused
        gemm = gemm_dtype(x)
        first = self.blocks[0].norm1
        y = ops.layer_norm(x, first.weight, first.bias, first.eps, gemm)  # [B, N, D] in the GEMM's dtype
        for i, block in enumerate(self.blocks):
            last = i + 1 == len(self.blocks)
            after = self.norm if last else self.blocks[i + 1].norm1
            n2 = block.norm2
            x, y = ops.residual_layer_norm(x, block.attn(y), block.ls1.gamma, n2.weight, n2.bias, n2.eps, gemm)
            mlp = block.mlp
            f = F.linear(ops.linear_gelu(y, mlp.fc1.weight, mlp.fc1.bias), mlp.fc2.weight, mlp.fc2.bias)
            x, y = ops.residual_layer_norm(x, f, block.ls2.gamma, after.weight, after.bias, after.eps,
                                           x.dtype if last else gemm)
        return y  # [B, N, D]

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,3,H,W] -> (cls [B,D], patches [B,g*g,D])."""
        return self.forward_features(self.preprocess(images_uint8))


# ------------------------------------------------------------------------------------------
# builders and loader
# ------------------------------------------------------------------------------------------
def _arch(arch: str) -> DINOv2Arch:
    if arch not in ARCHS:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch]


def build_dinov2(arch: str, img_size: int, pos_interp: str = "dinov2", kernels: str = "eager",
                 fused_mlp: bool = True) -> DINOv2:
    """Random-init DINOv2 (deterministic under torch.manual_seed). img_size: the resolution it
    is fed (224 at 256 px, 448 at 512 px, 16 for `tiny`). pos_interp: see the module docstring
    ("timm" reproduces the SR-DiT release's REPA teacher); kernels, fused_mlp: how its norms and
    MLPs run (same)."""
    return DINOv2(_arch(arch), img_size, pos_interp, kernels, fused_mlp)


def load_dinov2(arch: str, path, img_size: int, pos_interp: str = "dinov2", kernels: str = "eager",
                fused_mlp: bool = True) -> DINOv2:
    """Load an original-layout DINOv2 file (or timm's layout, which lacks mask_token), strictly.

    Returns a frozen model in eval mode. Errors name the path, the expected file and the first
    mismatched keys.
    """
    a = _arch(arch)
    expected = a.file_name or f"a state dict saved from build_dinov2({arch!r}, ...)"
    sd = load_state_file(path, expected, ("model", "state_dict"))
    model = DINOv2(a, img_size, pos_interp, kernels, fused_mlp)
    ref = model.state_dict()
    if "mask_token" not in sd:  # timm layout: identical except that mask_token (unused) is dropped
        sd = dict(sd, mask_token=torch.zeros_like(ref["mask_token"]))
    problem = describe_mismatch(sd, ref)
    if problem:
        raise ValueError(f"{os.fspath(path)} does not match DINOv2 {arch} (expected the file {expected}): {problem}")
    model.load_state_dict(sd, strict=True)  # post-hook refreshes pos_grid_embed
    return model.freeze()
