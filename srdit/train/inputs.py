"""What a training step reads: the training set (checked against the preset), the frozen DINOv2
teacher for the REPA/REG targets, and the synthetic batches that benchmarks and tests feed the
same step with.
"""
from __future__ import annotations

import torch

from srdit.config import Config, ConfigError


def build_dataset(cfg: Config):
    """The training set, checked against the preset (latent shape, label range, what it holds)."""
    if cfg.data.path:
        from srdit.data import ShardDataset  # prepared ImageNet shards (srdit.data.prepare)

        # checks the index, shard sizes and checksums, and every label against the model's classes
        dataset = ShardDataset(cfg.data.path, num_classes=cfg.model.num_classes, latent_scale=cfg.data.latent_scale)
    else:
        if cfg.model.in_channels != 1 or cfg.model.input_size != 16:
            raise ConfigError("only the quickstart preset trains without --data (embedded 1x16x16 digits); "
                              "give --data DIR with shards made by `python -m srdit.data.prepare`")
        from srdit.data.digits import DigitsDataset

        dataset = DigitsDataset(resolution=16, latent_scale=cfg.data.latent_scale)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data.path or 'the dataset'} holds no samples")
    has_targets = getattr(dataset, "kind", "image") == "teacher"
    if has_targets != cfg.data.cached_teacher:  # else REPA/REG would silently lose their targets
        raise ConfigError(f"{cfg.data.path or 'the embedded dataset'} holds "
                          f"{'cached teacher targets' if has_targets else 'images'} but data.cached_teacher="
                          f"{cfg.data.cached_teacher}; set data.cached_teacher={str(has_targets).lower()}")
    m = cfg.model
    expected = (m.in_channels, m.input_size, m.input_size)
    if tuple(dataset[0]["latent"].shape) != expected:
        raise ValueError(f"{cfg.data.path or 'dataset'}: latents are {tuple(dataset[0]['latent'].shape)}, the preset "
                         f"expects {expected} (resolution {cfg.data.resolution}); prepare data at that resolution")
    if dataset.num_classes > m.num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes, model.num_classes is {m.num_classes}")
    return dataset


def build_teacher(cfg: Config, device: torch.device, *, random_init: bool = False):
    """(frozen DINOv2 on `device`, a description) for REPA/REG targets; (None, ...) when the
    targets are cached in the data. Weights come from data.teacher; `random_init` (benchmarks,
    tests) or the quickstart's tiny teacher without a file get random weights of the same
    architecture, and the description says so. Its norms run as model.kernels says (the fused
    Triton LayerNorms with "triton": srdit/model/dinov2.py)."""
    if cfg.data.cached_teacher:
        return None, "cached teacher targets"
    from srdit.model.dinov2 import build_dinov2, load_dinov2

    d = cfg.data
    if d.teacher and not random_init:
        teacher = load_dinov2(d.teacher_arch, d.teacher, d.teacher_resolution, d.teacher_pos_interp,
                              cfg.model.kernels, cfg.model.fused_mlp)
        note = f"DINOv2 {d.teacher_arch} from {d.teacher}"
    else:
        if d.teacher_arch != "tiny" and not random_init:
            raise ConfigError(f"data.teacher is empty: give the path of the {d.teacher_arch} weights "
                              f"(dinov2_{d.teacher_arch}_pretrain.pth); only the quickstart's tiny teacher may be random")
        teacher = build_dinov2(d.teacher_arch, d.teacher_resolution, d.teacher_pos_interp, cfg.model.kernels,
                               cfg.model.fused_mlp).freeze()
        note = (f"DINOv2 {d.teacher_arch}-style ViT, RANDOM INIT (no pretrained weights: REPA/REG align to random "
                "features)")
    if teacher.embed_dim != cfg.model.teacher_dim:
        raise ConfigError(f"the teacher's width {teacher.embed_dim} != model.teacher_dim {cfg.model.teacher_dim}")
    return teacher.to(device), note


def synthetic_batch(cfg: Config, batch: int, device, cached: bool, generator: torch.Generator | None = None) -> dict:
    """A loader's micro-batch of random data with the real shapes and dtypes: latents, labels, and
    fp16 teacher targets (cached) or uint8 images (online teacher)."""
    m = cfg.model
    kw = dict(device=device, generator=generator)
    out = {"latent": torch.randn(batch, m.in_channels, m.input_size, m.input_size, **kw),
           "label": torch.randint(0, m.num_classes, (batch,), **kw)}
    if cached:
        out["teacher"] = torch.randn(batch, m.num_tokens, m.teacher_dim, dtype=torch.float16, **kw)
    else:
        r = cfg.data.resolution
        out["image"] = torch.randint(0, 256, (batch, 3, r, r), dtype=torch.uint8, **kw)
    return out
