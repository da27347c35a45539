"""Configs, presets and command-line overrides."""
import math

import pytest

from srdit.config import (LATENT_SCALE, MODEL_SIZES, PRESETS, ConfigError, apply_overrides, from_dict, preset)


def test_presets_are_the_table1_chain_plus_512_and_quickstart():
    assert PRESETS == ("reg-invae-b1-256", "sprint-b1-256", "rmsnorm-b1-256", "rope-b1-256", "qknorm-b1-256",
                       "valres-b1-256", "cfm-b1-256", "timeshift-b1-256", "sr-dit-b1-256", "sr-dit-b1-512",
                       "quickstart")
    chain = [preset(n) for n in PRESETS[:9]]
    m = [c.model for c in chain]
    assert (m[0].norm, m[0].sprint, m[0].rope, m[0].qk_norm, m[0].value_residual) == ("layernorm", False, False, False, False)
    assert m[1].sprint and m[2].norm == "rmsnorm" and m[3].rope and m[4].qk_norm and m[5].value_residual
    assert chain[5].train.cfm_weight == 0 and chain[6].train.cfm_weight == 0.05
    assert chain[6].train.time_shift == 1.0 and math.isclose(chain[7].train.time_shift, math.sqrt(2))
    assert not chain[7].sample.balanced_labels and chain[8].sample.balanced_labels
    final = preset("sr-dit-b1-256")
    assert (final.train.repa_weight, final.train.cls_weight, final.train.cfm_weight) == (0.5, 0.03, 0.05)
    assert (final.train.lr, final.train.global_batch, final.train.ema_decay) == (1e-4, 256, 0.9999)
    assert final.data.latent_scale == LATENT_SCALE == 0.3099
    big = preset("sr-dit-b1-512")
    assert big.model.num_tokens == 1025 and math.isclose(big.train.time_shift, math.sqrt(8))
    assert big.data.teacher_resolution == 448


def test_preset_returns_an_independent_copy():
    a = preset("sr-dit-b1-256")
    a.model.hidden = 1
    assert preset("sr-dit-b1-256").model.hidden == 768


def test_overrides_are_type_checked():
    cfg = apply_overrides(preset("quickstart"), ["train.max_steps=10", "model.rope=false", "train.lr=3e-4",
                                                 "model.size=L", "model.kernels=eager"])
    assert cfg.train.max_steps == 10 and cfg.model.rope is False and cfg.train.lr == 3e-4
    assert (cfg.model.hidden, cfg.model.depth, cfg.model.heads) == MODEL_SIZES["L"]
    with pytest.raises(ConfigError, match="train.max_steps expects an integer"):
        apply_overrides(cfg, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="boolean"):
        apply_overrides(cfg, ["model.rope=maybe"])
    with pytest.raises(ConfigError, match="model.norm='batchnorm' is not one of"):
        apply_overrides(cfg, ["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(cfg, ["train.max_steps"])


def test_unknown_names_list_close_matches_first():
    with pytest.raises(ConfigError) as err:
        apply_overrides(preset("quickstart"), ["train.max_step=3"])
    msg = str(err.value)
    assert "'train.max_step'" in msg and msg.split("valid: ")[1].startswith("train.max_steps")
    with pytest.raises(ConfigError) as err:
        preset("sr-dit-b1-265")
    assert err.value.args[0].split("valid: ")[1].split(",")[0] in ("sr-dit-b1-256", "sr-dit-b1-512")


def test_cross_field_checks_name_the_fix():
    with pytest.raises(ConfigError, match="divisible by model.heads"):
        apply_overrides(preset("sr-dit-b1-256"), ["model.heads=5"])
    with pytest.raises(ConfigError, match="repa_depth"):
        apply_overrides(preset("sr-dit-b1-256"), ["model.repa_depth=4"])
    with pytest.raises(ConfigError, match="SPRINT needs routed blocks"):
        apply_overrides(preset("sr-dit-b1-256"), ["model.depth=4"])


def test_dict_round_trip():
    cfg = apply_overrides(preset("sr-dit-b1-512"), ["train.seed=7"])
    assert from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["train"]["nonsense"] = 1
    with pytest.raises(ConfigError, match="train.nonsense"):
        from_dict(bad)


def test_derived_settings_follow_the_model_unless_set():
    base = preset("sr-dit-b1-256")
    assert math.isclose(base.train.time_shift, math.sqrt(2)) and base.data.teacher_resolution == 224
    big = apply_overrides(base, ["model.input_size=32"])  # 512 px latents: every derived number follows
    assert math.isclose(big.train.time_shift, math.sqrt(8)) and math.isclose(big.sample.time_shift, math.sqrt(8))
    assert big.data.teacher_resolution == 448
    assert apply_overrides(big, ["model.input_size=16"]).to_dict() == base.to_dict()
    pinned = apply_overrides(base, ["train.time_shift=1.5", "data.teacher_resolution=112", "model.input_size=32"])
    assert pinned.train.time_shift == 1.5 and pinned.data.teacher_resolution == 112  # set: kept
    assert math.isclose(pinned.sample.time_shift, math.sqrt(8))  # not set: derived
    auto = apply_overrides(preset("cfm-b1-256"), ["train.time_shift=0"])  # 0 (AUTO) asks for the derived value
    assert math.isclose(auto.train.time_shift, math.sqrt(2)) and auto.sample.time_shift == 1.0
    assert from_dict(big.to_dict()).to_dict() == big.to_dict()  # config.yaml stores the numbers


@pytest.mark.parametrize("override,message", [
    ("train.grad_clip=-1", r"train.grad_clip=-1.0 is outside \[0, inf\) \(0 turns clipping off\)"),
    ("train.ema_decay=2", r"train.ema_decay=2.0 is outside \[0, 1\)"),
    ("train.lr=-1", r"train.lr=-1.0 is outside \(0, inf\)"),
    ("train.lr=nan", r"train.lr=nan is outside"),
    ("train.beta2=1", r"train.beta2=1.0 is outside \[0, 1\)"),
    ("train.sample_every=-1", r"train.sample_every=-1 is outside \[0, inf\) \(0 = no sample grids\)"),
    ("model.heads=0", r"model.heads=0 is outside \[1, inf\)"),
    ("data.latent_scale=0", r"data.latent_scale=0.0 is outside"),
    ("sample.t_min=1", r"sample.t_min=1.0 is outside \(0, 1\)"),
    ("sample.num_steps=1", "the SDE sampler needs >= 2"),
    ("eval.batch=0", r"eval.batch=0 is outside"),
    ("train.grad_accum=3", "train.global_batch=64 is not divisible by train.grad_accum=3"),
])
def test_numeric_settings_out_of_range_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("quickstart"), [override])
    guidance = apply_overrides(preset("quickstart"), ["sample.guidance_high=0.5"])
    with pytest.raises(ConfigError, match="guidance interval is empty"):
        apply_overrides(guidance, ["sample.guidance_low=0.6"])


def test_the_class_token_guidance_scale_follows_the_image_scale_unless_set():
    base = preset("sr-dit-b1-256")
    assert base.sample.cls_guidance_scale == base.sample.guidance_scale == 1.0
    guided = apply_overrides(base, ["sample.guidance=pdg", "sample.guidance_scale=2.5"])
    assert guided.sample.cls_guidance_scale == 2.5  # today's behaviour: one scale for both
    own = apply_overrides(guided, ["sample.cls_guidance_scale=1.5", "sample.guidance_scale=3"])
    assert (own.sample.guidance_scale, own.sample.cls_guidance_scale) == (3.0, 1.5)
    assert base.sample.state_precision == "fp64" and base.train.ema_update == "release"  # as the release
