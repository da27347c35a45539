"""Configs as plain dataclasses, and the named presets.

The presets follow the paper's Table 1 as a chain: each row is the previous row plus one
change, so the ablation reads as one-line differences (`_derive`). Constants of the recipe
(latent scale, null class) live here and nowhere else.

Command-line overrides are `section.field=value` (`apply_overrides`), parsed by the field's
type; an unknown preset or key is an error naming it, with close matches first.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field

LATENT_SCALE = 0.3099  # INVAE latents are multiplied by this for training (SPEC 1), no shift
NULL_CLASS = 1000  # index of the null label in the 1001-row label table (SPEC 2)
TIME_SHIFT_BASE = 4096  # s = sqrt(C*H*W / 4096) of the latent (SPEC 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the teachers' input normalisation (DINOv2, KDD's DINOv2-L)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_PATCH = {"vitb14": 14, "vitl14": 14, "tiny": 2}  # patch side of each DINOv2 teacher arch
# Derived settings: left at their sentinel they follow other settings, also after overrides of
# those (Config.__post_init__): at AUTO, train.time_shift and sample.time_shift = sqrt(C*H*W /
# 4096) of the latent and data.teacher_resolution = the model's grid x the teacher's patch (16 x 14
# = 224 at 256 px); at SAME_AS_GUIDANCE, sample.cls_guidance_scale = sample.guidance_scale.
AUTO = 0
SAME_AS_GUIDANCE = -1.0
DERIVED = {"train.time_shift": AUTO, "sample.time_shift": AUTO, "data.teacher_resolution": AUTO,
           "sample.cls_guidance_scale": SAME_AS_GUIDANCE}

NORMS = ("rmsnorm", "layernorm")
MLP_ACTS = ("gelu_tanh", "swiglu", "relu2", "xielu", "lopsided_relu2")
KERNELS = ("eager", "triton")
ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "fa3", "fa4", "xformers", "eager")
PREDICTIONS = ("v", "x0")
OPTIMIZERS = ("adamw", "muon", "prodigy")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
SAMPLERS = ("sde", "euler", "heun")
GUIDANCES = ("none", "cfg", "pdg")

# hidden, depth, heads of the SiT sizes (SiT/DiT naming); `model.size=L` on the command line
# sets all three.
MODEL_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


# Field metadata of the settings a resumed run may change: cadences and bookkeeping, where the
# data and the evaluation files live, and how the same math is run (kernels, attention backend,
# compile, graphs: equal up to rounding, so a bit-exact resume then ends). Every other field
# must equal the stored config.yaml (srdit.train).
RESUMABLE = {"resumable": True}


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key and the fix."""


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


# The range of every numeric setting, as an interval, checked when a section is built (a NaN is
# outside every range); the error names the key, the value, the range and what 0 means where 0 is
# special. DERIVED settings may also hold their sentinel until Config fills them in.
_POSITIVE, _COUNT, _NATURAL, _PROBABILITY = "(0, inf)", "[1, inf)", "[0, inf)", "[0, 1)"
RANGES = {
    **{f"model.{k}": _COUNT for k in ("in_channels", "input_size", "patch_size", "hidden", "depth", "heads",
                                       "num_classes", "teacher_dim", "projector_dim")},
    "model.mlp_ratio": _POSITIVE, "model.rope_theta": _POSITIVE, "model.sprint_drop_ratio": "(0, 1)",
    "model.sprint_encoder_depth": _NATURAL, "model.sprint_decoder_depth": _NATURAL,
    "data.latent_scale": _POSITIVE, "data.teacher_resolution": _COUNT, "data.num_workers": _NATURAL,
    "train.max_steps": _NATURAL, "train.global_batch": _COUNT, "train.grad_accum": _COUNT, "train.lr": _POSITIVE,
    "train.lr_decay_steps": _NATURAL,
    "train.beta1": _PROBABILITY, "train.beta2": _PROBABILITY, "train.adam_eps": _POSITIVE,
    "train.weight_decay": _NATURAL, "train.grad_clip": _NATURAL, "train.ema_decay": _PROBABILITY,
    "train.label_dropout": _PROBABILITY, "train.path_drop_prob": _PROBABILITY, "train.x0_t_min": "(0, 1)",
    "train.repa_weight": _NATURAL, "train.cls_weight": _NATURAL, "train.cfm_weight": _NATURAL,
    "train.dispersive_weight": _NATURAL, "train.dispersive_tau": _POSITIVE, "train.time_shift": _POSITIVE,
    "train.seed": _NATURAL, "train.log_every": _COUNT, "train.ckpt_every": _COUNT, "train.sample_every": _NATURAL,
    "train.eval_every": _NATURAL, "train.eval_samples": _COUNT, "train.keep_checkpoints": _COUNT,
    "train.max_bad_steps": _COUNT, "train.process_group_timeout": _POSITIVE,
    "sample.num_steps": _COUNT, "sample.t_min": "(0, 1)", "sample.time_shift": _POSITIVE,
    "sample.guidance_scale": _NATURAL, "sample.cls_guidance_scale": _NATURAL,
    "sample.guidance_low": "[0, 1]", "sample.guidance_high": "[0, 1]",
    "sample.num_samples": _COUNT, "sample.batch": _COUNT, "sample.seed": _NATURAL,
    "eval.batch": _COUNT,
}
ZERO_MEANS = {"train.grad_clip": "0 turns clipping off", "train.sample_every": "0 = no sample grids",
              "train.eval_every": "0 = no quick evaluation", "train.time_shift": "0 = from the latent size",
              "sample.time_shift": "0 = from the latent size", "data.teacher_resolution": "0 = grid x patch",
              "data.num_workers": "0 = in the training process",
              "sample.cls_guidance_scale": "0 = the conditional class-token drift, as the release's --cls-cfg-scale 0; "
                                           "-1 = sample.guidance_scale"}


def _check_ranges(section: str, obj) -> None:
    for f in dataclasses.fields(obj):
        key, value = f"{section}.{f.name}", getattr(obj, f.name)
        if key not in RANGES or (key in DERIVED and value == DERIVED[key]):
            continue
        interval = RANGES[key]
        low, high = (float(x) for x in interval[1:-1].split(","))
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):  # also false for NaN
            note = f" ({ZERO_MEANS[key]})" if key in ZERO_MEANS else ""
            raise ConfigError(f"{key}={value!r} is outside {interval}{note}")


@dataclass
class ModelConfig:
    # input: latent channels and side (32 x 16 x 16 INVAE latents at 256 px)
    in_channels: int = 32
    input_size: int = 16
    patch_size: int = 1
    # transformer (SiT-B)
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    mlp_act: str = "gelu_tanh"
    num_classes: int = 1000
    # the Table-1 switches
    norm: str = "rmsnorm"
    rope: bool = True
    rope_theta: float = 10000.0
    qk_norm: bool = True
    value_residual: bool = True
    # REG class token (noisy teacher class embedding prepended at index 0) and REPA
    reg_token: bool = True
    teacher_dim: int = 768  # DINOv2-B/14 embedding width: REG token and REPA target size
    repa_depth: int = 2  # projector taps the output of this many blocks
    projector_dim: int = 2048
    # SPRINT: dense encoder, routed middle, dense decoder
    sprint: bool = True
    sprint_drop_ratio: float = 0.75
    sprint_encoder_depth: int = 2
    sprint_decoder_depth: int = 2
    # Release quirks kept as defaults (SPEC "Known quirks"); False selects the fix.
    quirk_rotate_routed_cls: bool = True  # Q1: a kept class token is rotated as grid (0, 0)
    quirk_cls_may_drop: bool = True  # Q2: the class token competes with patches to be kept
    # how it runs (results do not depend on these beyond rounding)
    kernels: str = field(default="eager", metadata=RESUMABLE)
    attention_backend: str = field(default="sdpa", metadata=RESUMABLE)
    batched_adaln: bool = field(default=False, metadata=RESUMABLE)  # every adaLN modulation in one GEMM
    # with kernels=triton: GELU inside the MLP's fc1 GEMM, srdit's Triton GEMM (student and teacher);
    # False: cuBLAS and the separate GELU passes (srdit/kernels/mlp.py)
    fused_mlp: bool = field(default=True, metadata=RESUMABLE)

    def __post_init__(self):
        _check_ranges("model", self)
        _one_of("model.norm", self.norm, NORMS)
        _one_of("model.mlp_act", self.mlp_act, MLP_ACTS)
        _one_of("model.kernels", self.kernels, KERNELS)
        _one_of("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.hidden % self.heads:
            raise ConfigError(f"model.hidden={self.hidden} is not divisible by model.heads={self.heads}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"model.input_size={self.input_size} is not divisible by model.patch_size={self.patch_size}")
        if self.rope and self.head_dim % 4:
            raise ConfigError(f"2D RoPE needs a head dim divisible by 4 (two axes of rotated pairs); got {self.head_dim}")
        if self.sprint:
            if self.routed_depth < 1:
                raise ConfigError(
                    f"SPRINT needs routed blocks: depth {self.depth} <= encoder {self.sprint_encoder_depth}"
                    f" + decoder {self.sprint_decoder_depth}; lower the dense depths or set model.sprint=false")
            if self.repa_depth > self.sprint_encoder_depth:
                raise ConfigError(
                    f"model.repa_depth={self.repa_depth} taps a routed block, which sees only the kept tokens;"
                    f" use repa_depth <= model.sprint_encoder_depth={self.sprint_encoder_depth}")
        if not 1 <= self.repa_depth <= self.depth:
            raise ConfigError(f"model.repa_depth={self.repa_depth} must lie in [1, model.depth={self.depth}]")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.reg_token)

    @property
    def num_kept(self) -> int:
        """Tokens each sample keeps in the routed blocks: int(0.25 * 257) = 64 at 256 px."""
        return max(1, int(self.num_tokens * (1.0 - self.sprint_drop_ratio)))

    @property
    def routed_depth(self) -> int:
        return self.depth - self.sprint_encoder_depth - self.sprint_decoder_depth


@dataclass
class DataConfig:
    resolution: int = 256
    # prepared shards (srdit.data.prepare); empty = the embedded quickstart data
    path: str = field(default="", metadata=RESUMABLE)
    latent_scale: float = LATENT_SCALE
    invae: str = ""  # e2e-invae-400k.pt, for decoding samples
    teacher: str = ""  # dinov2_vitb14_pretrain.pth; empty = random init (quickstart only)
    teacher_arch: str = "vitb14"
    # How the teacher's 37x37 position table is resampled to its grid: "timm" (antialiased
    # bicubic) is what the release's REPA teacher does (utils.load_encoders), so it produced
    # the published targets; "dinov2" is the hub model's own interpolation (+0.1 offset).
    teacher_pos_interp: str = "timm"
    teacher_resolution: int = AUTO  # the teacher's input side; AUTO: grid x patch (224 at 256 px, 448 at 512)
    cached_teacher: bool = False
    num_workers: int = field(default=4, metadata=RESUMABLE)

    def __post_init__(self):
        _check_ranges("data", self)
        _one_of("data.resolution", self.resolution, (16, 256, 512))
        _one_of("data.teacher_arch", self.teacher_arch, tuple(TEACHER_PATCH))
        _one_of("data.teacher_pos_interp", self.teacher_pos_interp, ("timm", "dinov2"))


@dataclass
class TrainConfig:
    max_steps: int = field(default=400_000, metadata=RESUMABLE)
    global_batch: int = 256
    # resumable: the math is defined by the micro-batch, global_batch / (world size x grad_accum),
    # which a resume on another number of ranks keeps by changing this (srdit.train.resume)
    grad_accum: int = field(default=1, metadata=RESUMABLE)
    optimizer: str = "adamw"
    lr: float = 1e-4
    # 0: constant lr (the release); N: the lr falls linearly to ~0 over the last N steps of max_steps
    lr_decay_steps: int = field(default=0, metadata=RESUMABLE)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # "release": ema = ema * decay + p * (1 - decay) in fp32, as the release's update_ema: the two
    # fp32 coefficients sum to 1 - 1.7e-8, so the average settles ~1.7e-4 (relative) below the
    # weights (quirk Q5); "lerp": the exact weighted average ema + (1 - decay) (p - ema)
    ema_update: str = "release"
    label_dropout: float = 0.1
    path_drop_prob: float = 0.05
    # losses (SPEC 3): L = vel + 0.5 REPA + 0.03 cls + 0.05 CFM
    prediction: str = "v"
    x0_t_min: float = 0.05  # x0-prediction: v = (x_t - x0) / max(t, this)
    repa_weight: float = 0.5
    cls_weight: float = 0.03
    cfm_weight: float = 0.05
    cfm_time_weighted: bool = False  # appendix: CFM term times t (used with weight 0.10)
    dispersive_weight: float = 0.0  # appendix: dispersive loss on the REPA-tap hidden state
    dispersive_tau: float = 0.5
    time_shift: float = 1.0  # s of t' = s t / (1 + (s - 1) t); 1 = no shift; AUTO (0): from the latent size
    # cadence and bookkeeping
    seed: int = 0
    log_every: int = field(default=100, metadata=RESUMABLE)
    ckpt_every: int = field(default=10_000, metadata=RESUMABLE)
    sample_every: int = field(default=2_000, metadata=RESUMABLE)
    # quick FID-10K + KDD of the EMA model (srdit.eval.quick) every N steps; 0 = off
    eval_every: int = field(default=0, metadata=RESUMABLE)
    eval_samples: int = field(default=10_000, metadata=RESUMABLE)
    keep_checkpoints: int = field(default=3, metadata=RESUMABLE)
    max_bad_steps: int = field(default=10, metadata=RESUMABLE)
    # seconds any collective waits for the other ranks before the run stops with an error naming
    # this setting (a rank that died or hangs); the longest a rank works alone (rank 0 writing a
    # checkpoint or drawing the sample grid) must fit in it
    process_group_timeout: float = field(default=300.0, metadata=RESUMABLE)
    # a resume whose micro-batch differs from the checkpoint's (another world size with the same
    # grad_accum) changes the math: refused unless this is true (then a warning in the log)
    allow_micro_batch_change: bool = field(default=False, metadata=RESUMABLE)
    compile: bool = field(default=False, metadata=RESUMABLE)
    # torch.compile mode when train.compile: "reduce-overhead" and "max-autotune" capture CUDA
    # graphs of the model on a GPU
    compile_mode: str = field(default="default", metadata=RESUMABLE)
    # the whole step (forward, backward, gradient reduction, optimizer, EMA) replayed as CUDA graphs,
    # on every rank; AdamW (srdit/train/graphs.py)
    cuda_graphs: bool = field(default=False, metadata=RESUMABLE)
    # the dtype of the cross-rank gradient sum (srdit/train/reduce.py): fp32 is DDP's arithmetic;
    # bf16 halves the bytes on the wire at a rounding of 2^-8 (relative to the summed magnitudes)
    grad_reduce_dtype: str = "fp32"
    # the order of the gradient and norm sums (srdit/train/fixed_sum.py): library = the collectives'
    # own (fastest); fixed = one pairwise tree over the global batch's micro-batches, the same for
    # any number of ranks: a resume on other ranks with the same micro-batch is bit for bit (when
    # grad_accum is a power of two); costs an all-to-all in place of the reduce-scatter and a
    # gradient-sized receive buffer (docs/training.md)
    reduce_order: str = field(default="library", metadata=RESUMABLE)
    # each rank updates 1/world of the weights (AdamW and EMA sharded, ZeRO-1; srdit/train/reduce.py):
    # auto = with several ranks and AdamW; the same math (the clip's norm summed in another order)
    shard_optimizer: str = field(default="auto", metadata=RESUMABLE)
    precision: str = "bf16"  # bf16 autocast on GPU; CPU always runs fp32
    wandb_mode: str = field(default="disabled", metadata=RESUMABLE)  # online | offline | disabled
    wandb_project: str = field(default="srdit", metadata=RESUMABLE)
    wandb_name: str = field(default="", metadata=RESUMABLE)

    def __post_init__(self):
        _check_ranges("train", self)
        _one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("train.prediction", self.prediction, PREDICTIONS)
        _one_of("train.precision", self.precision, ("bf16", "fp32"))
        _one_of("train.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        _one_of("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _one_of("train.ema_update", self.ema_update, ("release", "lerp"))
        _one_of("train.grad_reduce_dtype", self.grad_reduce_dtype, ("fp32", "bf16"))
        _one_of("train.reduce_order", self.reduce_order, ("library", "fixed"))
        if self.reduce_order == "fixed" and self.grad_reduce_dtype != "fp32":
            raise ConfigError("train.reduce_order=fixed sums in fp32 (a bf16 rounding of each rank's partial sum "
                              "depends on the split): set train.grad_reduce_dtype=fp32")
        _one_of("train.shard_optimizer", self.shard_optimizer, ("auto", "true", "false"))
        if self.shard_optimizer == "true" and self.optimizer != "adamw":
            raise ConfigError(f"train.shard_optimizer=true shards AdamW; train.optimizer={self.optimizer} is not "
                              "sharded (use train.shard_optimizer=auto or false)")
        if self.cuda_graphs and self.optimizer != "adamw":
            raise ConfigError(f"train.cuda_graphs needs train.optimizer=adamw (not {self.optimizer!r}): the other "
                              "optimizers read the non-finite-step flag on the host")
        if self.cuda_graphs and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"train.cuda_graphs already captures the step; train.compile_mode={self.compile_mode} "
                              "captures graphs of its own: use default or max-autotune-no-cudagraphs with it")
        if self.global_batch % self.grad_accum:
            raise ConfigError(f"train.global_batch={self.global_batch} is not divisible by "
                              f"train.grad_accum={self.grad_accum}")


@dataclass
class SampleConfig:
    sampler: str = "sde"
    num_steps: int = 250
    t_min: float = 0.04
    time_shift: float = 1.0  # as train.time_shift: 1 = no shift; AUTO (0): from the latent size
    guidance: str = "none"
    guidance_scale: float = 1.0
    # the class token's drift gets its own scale, as the release's --cls-cfg-scale; <= 0 there (0
    # here) means its conditional drift alone; SAME_AS_GUIDANCE (-1): sample.guidance_scale
    cls_guidance_scale: float = SAME_AS_GUIDANCE
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    balanced_labels: bool = False
    num_samples: int = 50_000
    batch: int = 125
    seed: int = 0
    precision: str = "fp32"  # what the model computes in; the paper evaluated in fp32
    # the sampler's state (latent, class token) between model calls; the release integrates in
    # float64 and feeds the model fp32
    state_precision: str = "fp64"

    def __post_init__(self):
        _check_ranges("sample", self)
        _one_of("sample.sampler", self.sampler, SAMPLERS)
        _one_of("sample.guidance", self.guidance, GUIDANCES)
        _one_of("sample.precision", self.precision, ("bf16", "fp32"))
        _one_of("sample.state_precision", self.state_precision, ("fp64", "fp32"))
        if self.sampler == "sde" and self.num_steps < 2:
            raise ConfigError(f"sample.num_steps={self.num_steps}: the SDE sampler needs >= 2 (a stochastic step and "
                              "the final step)")
        if self.guidance_low > self.guidance_high:
            raise ConfigError(f"sample.guidance_low={self.guidance_low} > sample.guidance_high={self.guidance_high}: "
                              "the guidance interval is empty")


@dataclass
class EvalConfig:
    reference: str = field(default="", metadata=RESUMABLE)  # VIRTUAL_imagenet256_labeled.npz
    inception: str = field(default="", metadata=RESUMABLE)  # pt_inception-2015-12-05-6726825d.pth
    kdd_teacher: str = field(default="", metadata=RESUMABLE)  # dinov2_vitl14_pretrain.pth
    batch: int = field(default=250, metadata=RESUMABLE)

    def __post_init__(self):
        _check_ranges("eval", self)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # Settings left at their sentinel are filled in (DERIVED); `derived` remembers which, so that
        # a later override (`_derive`) derives them again instead of keeping stale numbers.
        derived = set()
        for key, value in _derived_values(self).items():
            section, name = key.split(".")
            if getattr(getattr(self, section), name) == DERIVED[key]:
                setattr(self, section, dataclasses.replace(getattr(self, section), **{name: value}))
                derived.add(key)
        self.derived = frozenset(derived)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resumable_keys() -> frozenset[str]:
    """`section.field` of every setting marked RESUMABLE."""
    return frozenset(f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                     for f in dataclasses.fields(typing.get_type_hints(Config)[s.name]) if f.metadata.get("resumable"))


def auto_time_shift(model: ModelConfig) -> float:
    """s = sqrt(C*H*W / 4096) of the latent: sqrt 2 at 256 px, sqrt 8 at 512 px (SPEC 3)."""
    return math.sqrt(model.in_channels * model.input_size**2 / TIME_SHIFT_BASE)


def _derived_values(cfg: Config) -> dict[str, float]:
    """What the DERIVED settings become for cfg."""
    shift = auto_time_shift(cfg.model)
    values = {"train.time_shift": shift, "sample.time_shift": shift,
              "data.teacher_resolution": cfg.model.grid * TEACHER_PATCH[cfg.data.teacher_arch],
              "sample.cls_guidance_scale": cfg.sample.guidance_scale}
    assert set(values) == set(DERIVED)
    return values


def _derive(base: Config, **sections) -> Config:
    """A copy of `base` with some fields of some sections replaced: `model=dict(rope=True)`.
    Settings base derived (DERIVED) and not set here are derived again."""
    sections = {name: dict(changes) for name, changes in sections.items()}
    for key in base.derived:
        section, name = key.split(".")
        sections.setdefault(section, {}).setdefault(name, DERIVED[key])
    replaced = {name: dataclasses.replace(getattr(base, name), **changes) for name, changes in sections.items()}
    return dataclasses.replace(base, **replaced)


def _build_presets() -> dict[str, Config]:
    p: dict[str, Config] = {}
    # Table 1, cumulative. Row 1: REG on INVAE latents with the SiT-B/1 of the REG/REPA code:
    # LayerNorm, no RoPE/QK-norm/value residual, every block dense, REPA tapping block 4 (the
    # encoder_depth of the release's SiT-B configs; SPRINT rows tap the 2-block dense encoder).
    p["reg-invae-b1-256"] = _derive(
        Config(),
        model=dict(norm="layernorm", rope=False, qk_norm=False, value_residual=False, sprint=False, repa_depth=4),
        train=dict(cfm_weight=0.0),
    )
    p["sprint-b1-256"] = _derive(p["reg-invae-b1-256"], model=dict(sprint=True, repa_depth=2))
    p["rmsnorm-b1-256"] = _derive(p["sprint-b1-256"], model=dict(norm="rmsnorm"))
    p["rope-b1-256"] = _derive(p["rmsnorm-b1-256"], model=dict(rope=True))
    p["qknorm-b1-256"] = _derive(p["rope-b1-256"], model=dict(qk_norm=True))
    p["valres-b1-256"] = _derive(p["qknorm-b1-256"], model=dict(value_residual=True))
    p["cfm-b1-256"] = _derive(p["valres-b1-256"], train=dict(cfm_weight=0.05))
    # s = sqrt(C*H*W / 4096) from here on: sqrt 2 at 256 px, sqrt 8 at 512 px (AUTO follows the model)
    p["timeshift-b1-256"] = _derive(p["cfm-b1-256"], train=dict(time_shift=AUTO), sample=dict(time_shift=AUTO))
    p["sr-dit-b1-256"] = _derive(p["timeshift-b1-256"], sample=dict(balanced_labels=True))
    p["sr-dit-b1-512"] = _derive(p["sr-dit-b1-256"], model=dict(input_size=32), data=dict(resolution=512))
    # A small SR-DiT with every part of the recipe, for CPUs: 1 x 16 x 16 pixel-space digits
    # (identity tokenizer), patch 2 -> 64 patches + REG token = 65 tokens, 16 kept when routed;
    # a tiny ViT teacher of the DINOv2 code path (width 64).
    quick_model = dict(
        in_channels=1, input_size=16, patch_size=2, hidden=128, depth=6, heads=4, num_classes=10,
        teacher_dim=64, projector_dim=256,
    )
    p["quickstart"] = _derive(
        p["sr-dit-b1-256"],
        model=quick_model,
        data=dict(resolution=16, teacher_arch="tiny", latent_scale=1.0, num_workers=0),
        # tuned for time on 2 cores (issue 15): 700 steps at a high lr that decays over the second
        # half reach what 1,500 at a constant 1e-3 did; the grid uses CFG 2.0 (label dropout
        # trains the unconditional model), which a young model needs to draw every class clearly
        train=dict(max_steps=700, global_batch=64, lr=3e-3, lr_decay_steps=350, ema_decay=0.99, log_every=50,
                   ckpt_every=350, sample_every=700),
        sample=dict(num_steps=25, num_samples=100, batch=100, guidance="cfg", guidance_scale=2.0),
    )
    return p


_PRESETS = _build_presets()
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def _unknown(kind: str, name: str, valid) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=len(valid), cutoff=0.5)
    ordered = close + [v for v in valid if v not in close]
    return ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(ordered)}")


def preset(name: str) -> Config:
    """A fresh copy of the named preset (see PRESETS)."""
    if name not in _PRESETS:
        raise _unknown("preset", name, PRESETS)
    return copy.deepcopy(_PRESETS[name])


def _field_type(section, name: str):
    hints = typing.get_type_hints(type(section))
    return hints[name]


def _parse_value(key: str, text: str, kind):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects a boolean (true/false), got {text!r}")
    if kind is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} expects an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {text!r}") from None
    if kind is str:
        return text
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        raise ConfigError(f"{key}: union-typed fields cannot be set from the command line")
    raise ConfigError(f"{key}: fields of type {kind} cannot be set from the command line")


def _all_keys(cfg: Config) -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """A new Config with `section.field=value` overrides applied, type-checked, re-validated.

    `model.size=S|B|L|XL` sets model.hidden, model.depth and model.heads together.
    """
    changes: dict[str, dict] = {}
    valid = _all_keys(cfg) + ["model.size"]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key == "model.size":
            if text not in MODEL_SIZES:
                raise _unknown("model size", text, MODEL_SIZES)
            hidden, depth, heads = MODEL_SIZES[text]
            changes.setdefault("model", {}).update(hidden=hidden, depth=depth, heads=heads)
            continue
        if key not in valid:
            raise _unknown("config key", key, valid)
        section_name, name = key.split(".", 1)
        section = getattr(cfg, section_name)
        changes.setdefault(section_name, {})[name] = _parse_value(key, text.strip(), _field_type(section, name))
    return _derive(cfg, **changes)


def from_dict(d: dict) -> Config:
    """Inverse of Config.to_dict (for config.yaml and checkpoints); unknown keys are errors."""
    sections = {}
    for f in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[f.name]
        values = dict(d.get(f.name, {}))
        known = {g.name for g in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise _unknown("config key", f"{f.name}.{key}", [f"{f.name}.{k}" for k in known])
        sections[f.name] = cls(**values)
    return Config(**sections)
