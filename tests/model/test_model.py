"""SR-DiT model: layout, parameter counts, release equivalence, SPRINT, RoPE, value residual."""
import argparse
import math

import pytest
import torch

from release_oracle import release_forward
from srdit.config import PRESETS, apply_overrides, preset
from srdit.kernels import reference as ref
from srdit.model import build_model, count_params, load_release_weights, select_tokens, sit

# Every switch of the real model at a size a CPU test can afford: 4x4 latent grid of 4
# channels -> 16 patches + REG token = 17 tokens, 4 kept when routed; 6 blocks = 2 + 2 + 2.
SMALL = ["model.hidden=64", "model.heads=4", "model.depth=6", "model.projector_dim=48", "model.teacher_dim=32",
         "model.in_channels=4", "model.input_size=4", "model.num_classes=10"]


def small_model(name="sr-dit-b1-256", *extra, dtype=torch.float64):
    cfg = apply_overrides(preset(name), SMALL + list(extra))
    return build_model(cfg).to(dtype), cfg


def randomize_(model):
    """Non-zero everywhere (adaLN, output layers, [MASK] and lambdas start at 0 or 0.5), so every
    path of the network shows in the output and in every gradient. Fixed tables stay."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.7 / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def inputs(cfg, B=3, dtype=torch.float64):
    m = cfg.model
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, dtype=dtype)
    t = torch.rand(B, dtype=dtype)
    y = torch.randint(0, m.num_classes + 1, (B,))
    cls = torch.randn(B, m.teacher_dim, dtype=dtype)
    return x, t, y, cls


def assert_close(a, b, tol=1e-10):
    err = (a - b).norm() / b.norm().clamp_min(1e-30)
    assert err < tol, f"relative error {err:.3e}"


# --------------------------------------------------------------------------- layout, counts


def test_sr_dit_has_the_release_parameter_count():
    with torch.device("meta"):
        for name in ("sr-dit-b1-256", "sr-dit-b1-512"):
            assert count_params(build_model(preset(name))) == 140_037_675


@pytest.mark.parametrize("name,resolution", [("sr-dit-b1-256", 256), ("sr-dit-b1-512", 512)])
def test_state_dict_equals_release_layout(layout, name, resolution):
    with torch.device("meta"):
        sd = build_model(preset(name)).state_dict()
    expected = layout(f"release_state_dict_{resolution}")
    assert list(sd) == [k for k, _, _ in expected]
    for key, shape, dtype in expected:
        assert list(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == dtype, key


def test_table1_parameter_deltas():
    with torch.device("meta"):
        counts = {name: count_params(build_model(preset(name))) for name in PRESETS}
    D, depth, Dh = 768, 12, 64
    assert counts["sprint-b1-256"] - counts["reg-invae-b1-256"] == (2 * D * D + D) + D  # fusion_proj + [MASK]
    assert counts["rmsnorm-b1-256"] == counts["rope-b1-256"] == counts["sprint-b1-256"]  # no affine, fixed tables
    assert counts["qknorm-b1-256"] - counts["rope-b1-256"] == depth * 2 * Dh
    assert counts["valres-b1-256"] - counts["qknorm-b1-256"] == depth - 1  # one lambda per block after the first
    assert counts["sr-dit-b1-256"] == counts["valres-b1-256"]


def test_release_checkpoint_file_loads_strictly(layout, tmp_path):
    """A release training checkpoint {model, ema, opt, args, steps} (args an argparse.Namespace)
    loads with weights_only=True; the EMA is taken; pos_embed comes from the file."""
    ema_sd = {k: torch.randn(s) for k, s, _ in layout("release_state_dict_256")}
    model_sd = {"mask_token": torch.ones(1, 1, 768)}  # the raw weights: must not be the ones taken
    path = tmp_path / "0400000.pt"
    torch.save({"model": model_sd, "ema": ema_sd, "opt": {}, "args": argparse.Namespace(lr=1e-4), "steps": 400_000}, path)
    model = build_model(preset("sr-dit-b1-256"))
    model.load_state_dict(load_release_weights(path), strict=True)
    assert torch.equal(model.pos_embed, ema_sd["pos_embed"])
    assert torch.equal(model.blocks[3].attn.qkv.weight, ema_sd["blocks.3.attn.qkv.weight"])

    bare = tmp_path / "bare.pt"  # a bare state dict saved from a DDP-wrapped, compiled model
    torch.save({f"module._orig_mod.{k}": v for k, v in ema_sd.items()}, bare)
    del ema_sd
    sd = load_release_weights(bare)
    assert sorted(sd) == sorted(model.state_dict())


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_release_weights(tmp_path / "nothere.pt")


# --------------------------------------------------------------------------- every preset runs


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_forward_backward_and_reaches_every_parameter(name):
    if name == "quickstart":  # already small
        cfg = preset(name)
        model = build_model(cfg)
    else:
        model, cfg = small_model(name, dtype=torch.float32)
    randomize_(model).train()
    x, t, y, cls = inputs(cfg, B=2, dtype=torch.float32)
    out = model(x, t, y, cls)
    assert out.v.shape == x.shape
    assert out.v_cls.shape == cls.shape
    assert out.repa.shape == (2, cfg.model.num_tokens, cfg.model.teacher_dim)
    (out.v.square().mean() + out.v_cls.square().mean() + out.repa.square().mean()).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_full_size_sr_dit_forward_backward_on_cpu():
    cfg = preset("sr-dit-b1-256")
    model = build_model(cfg).train()
    x, t, y, cls = inputs(cfg, B=1, dtype=torch.float32)
    out = model(x, t, y, cls, generator=torch.Generator().manual_seed(0))
    assert out.v.shape == (1, 32, 16, 16) and out.v_cls.shape == (1, 768) and out.repa.shape == (1, 257, 768)
    out.repa.square().mean().backward()
    assert model.projectors[0][0].weight.grad is not None


@pytest.mark.parametrize("mlp_act", ["swiglu", "relu2", "xielu", "lopsided_relu2"])
def test_mlp_activations(mlp_act):
    model, cfg = small_model("sr-dit-b1-256", f"model.mlp_act={mlp_act}", dtype=torch.float32)
    randomize_(model)
    out = model(*inputs(cfg, dtype=torch.float32))
    out.v.square().mean().backward()
    assert torch.isfinite(out.v).all()
    x = torch.linspace(-3, 3, 13)
    act = model.blocks[0].mlp.act
    if mlp_act == "relu2":
        assert torch.equal(act(x), torch.relu(x) ** 2)
    if mlp_act == "lopsided_relu2":
        assert torch.allclose(act(x), torch.where(x > 0, x**2, 0.01 * x))
    if mlp_act == "swiglu":  # 2/3-width hidden layer keeps the parameter count of the 4x MLP
        assert model.blocks[0].mlp.fc1.weight.shape == (2 * int(2 * 64 * 4 / 3), 64)


# --------------------------------------------------------------------------- release equivalence


@pytest.fixture
def release_pair():
    model, cfg = small_model()
    randomize_(model)
    return model, cfg, {k: v.clone() for k, v in model.state_dict().items()}


def _oracle(sd, cfg, *args, **kw):
    return release_forward(sd, *args, heads=cfg.model.heads, depth=cfg.model.depth, **kw)


@pytest.mark.parametrize("path_drop", [False, True], ids=["conditional", "path-dropped"])
def test_inference_equals_release_in_float64(release_pair, path_drop):
    model, cfg, sd = release_pair
    model.eval()
    x, t, y, cls = inputs(cfg)
    if path_drop:
        y = torch.full_like(y, cfg.model.num_classes)  # the unconditional pass of guidance
    with torch.no_grad():
        out = model(x, t, y, cls, path_drop=path_drop)
        v, v_cls, z = _oracle(sd, cfg, x, t, y, cls, path_drop=path_drop)
    assert_close(out.v, v)
    assert_close(out.v_cls, v_cls)
    assert_close(out.repa, z)


@pytest.mark.parametrize("path_drop", [False, True], ids=["routed", "routed-path-dropped"])
def test_training_forward_and_gradients_equal_release_in_float64(release_pair, path_drop):
    model, cfg, sd = release_pair
    model.train()
    x, t, y, cls = inputs(cfg)
    K, T = cfg.model.num_kept, cfg.model.num_tokens
    with_cls = torch.cat([torch.tensor([0]), 1 + torch.randperm(T - 1)[: K - 1]])[torch.randperm(K)]
    without_cls = 1 + torch.randperm(T - 1)[:K]
    ids = torch.stack([with_cls, without_cls, torch.randperm(T)[:K]])  # a kept class token rotates as (0, 0): Q1

    out = model(x, t, y, cls, keep_ids=ids, path_drop=path_drop)
    loss = out.v.square().sum() + out.v_cls.square().sum() + out.repa.square().sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    leaves = {k: v.clone().requires_grad_(v.is_floating_point() and "rope" not in k and k != "pos_embed")
              for k, v in sd.items()}
    v, v_cls, z = _oracle(leaves, cfg, x, t, y, cls, ids_keep=ids, path_drop=path_drop)
    assert_close(out.v, v)
    assert_close(out.v_cls, v_cls)
    assert_close(out.repa, z)
    ref_loss = v.square().sum() + v_cls.square().sum() + z.square().sum()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref_loss, [leaves[n] for n in names], allow_unused=True)
    for name, g, rg in zip(names, grads, ref_grads):
        assert g is not None, name
        if rg is None or not rg.any():
            assert not g.any(), name  # the routed blocks under path drop: zero, not None
        else:
            assert_close(g, rg, 1e-9)


def test_full_size_conditional_pass_equals_release_in_float64():
    model = randomize_(build_model(preset("sr-dit-b1-256")).double()).eval()
    cfg = preset("sr-dit-b1-256")
    sd = model.state_dict()
    x, t, y, cls = inputs(cfg, B=1)
    with torch.no_grad():
        out = model(x, t, y, cls)
        v, v_cls, z = _oracle(sd, cfg, x, t, y, cls)
    assert_close(out.v, v)
    assert_close(out.v_cls, v_cls)


# --------------------------------------------------------------------------- SPRINT


def _record_block_inputs(model):
    calls = {}

    def hook(index):
        def record(module, args):
            calls.setdefault(index, []).append(args)
        return record

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(hook(i))
    return calls


def test_routed_blocks_see_int_quarter_of_tokens_and_dense_blocks_all():
    model, cfg = small_model()
    calls = _record_block_inputs(model.train())
    x, t, y, cls = inputs(cfg, B=5)
    model(x, t, y, cls, generator=torch.Generator().manual_seed(1))
    T, K = cfg.model.num_tokens, int(0.25 * cfg.model.num_tokens)
    assert cfg.model.num_kept == K == 4
    for i in range(6):
        expected = K if 2 <= i < 4 else T
        assert calls[i][0][0].shape == (5, expected, 64), i
    assert preset("sr-dit-b1-256").model.num_kept == 64 and preset("sr-dit-b1-512").model.num_kept == 256


def test_select_tokens_is_a_uniform_subset_in_random_order():
    ids = select_tokens(4000, 257, 64, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4000, 64)
    assert all(len(set(row.tolist())) == 64 for row in ids[:50])
    # Q2 (default): the class token is kept like any token, with probability 64/257
    kept_cls = (ids == 0).any(1).float().mean().item()
    assert abs(kept_cls - 64 / 257) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    assert not torch.equal(ids[:, :8].sort(1).values, ids[:, :8])  # not sorted: random order
    fixed = select_tokens(100, 257, 64, keep_first=True, generator=torch.Generator().manual_seed(0))
    assert (fixed[:, 0] == 0).all() and (fixed[:, 1:] > 0).all()
    assert all(len(set(row.tolist())) == 64 for row in fixed)


def test_same_generator_gives_same_routing():
    model, cfg = small_model()
    randomize_(model).train()
    args = inputs(cfg)
    a = model(*args, generator=torch.Generator().manual_seed(7)).v
    b = model(*args, generator=torch.Generator().manual_seed(7)).v
    c = model(*args, generator=torch.Generator().manual_seed(8)).v
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pad_puts_mask_at_dropped_positions_and_fuses_encoder_first():
    B, T, D, K = 2, 9, 5, 3
    x_enc, g = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, K, D, dtype=torch.float64)
    mask = torch.randn(1, 1, D, dtype=torch.float64)
    ids = torch.stack([torch.randperm(T)[:K] for _ in range(B)])
    eye, zero = torch.eye(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    bias = torch.zeros(D, dtype=torch.float64)
    padded = ref.sprint_fuse(x_enc, g, ids, mask, torch.cat([zero, eye], 1), bias)
    for b in range(B):
        for pos in range(T):
            where = (ids[b] == pos).nonzero()
            expected = g[b, where[0, 0]] if len(where) else mask[0, 0]
            assert torch.equal(padded[b, pos], expected)
    assert torch.equal(ref.sprint_fuse(x_enc, g, ids, mask, torch.cat([eye, zero], 1), bias), x_enc)
    dropped = ref.sprint_fuse(x_enc, None, None, mask, torch.cat([zero, eye], 1), bias)
    assert torch.equal(dropped, mask.expand(B, T, D))


def test_inference_does_not_route():
    model, cfg = small_model()
    randomize_(model)
    args = inputs(cfg)
    calls = _record_block_inputs(model.eval())
    with torch.no_grad():
        eval_out = model(*args).v
        assert all(calls[i][0][0].shape[1] == cfg.model.num_tokens for i in range(6))
        model.train()
        assert torch.equal(model(*args, route=False).v, eval_out)
        assert not torch.equal(model(*args).v, eval_out)  # training mode routes by default
        model.eval()
        assert not torch.equal(model(*args, route=True, generator=torch.Generator().manual_seed(0)).v, eval_out)


def test_path_drop_does_not_compute_routed_blocks():
    model, cfg = small_model()
    calls = _record_block_inputs(model.train())
    model(*inputs(cfg), path_drop=True)
    assert sorted(calls) == [0, 1, 4, 5]


# --------------------------------------------------------------------------- the stream between blocks


@pytest.mark.parametrize("name,kw", [("sr-dit-b1-256", {"keep_ids": True}), ("sr-dit-b1-256", {"path_drop": True}),
                                     ("reg-invae-b1-256", {})], ids=["routed", "path-dropped", "dense-layernorm"])
def test_mlp_add_fused_into_the_next_norm_is_the_same_function_bit_for_bit(monkeypatch, name, kw):
    """Each block's MLP residual add is left to the next norm (norm1 of the next block, norm_final)
    except where the stream is used: the same bits, outputs and gradients, as every block adding
    its own branch (the code before the fusion), and one fused norm per block boundary inside a
    segment. reg-invae-b1-256: no SPRINT, LayerNorm, the REPA tap inside the stack (block 3)."""
    model, cfg = small_model(name, dtype=torch.float32)
    randomize_(model).train()
    args = inputs(cfg, dtype=torch.float32)
    if kw.get("keep_ids"):
        kw = {"keep_ids": torch.stack([torch.randperm(17)[:4] for _ in range(3)])}
    calls = []
    for op in ("rmsnorm_modulate", "residual_rmsnorm_modulate", "layernorm_modulate"):
        fn = getattr(model.ops, op)
        monkeypatch.setattr(model.ops, op, lambda *a, _fn=fn, _op=op: calls.append(_op) or _fn(*a))

    def run():
        calls.clear()
        out = model(*args, **kw)
        loss = out.v.square().sum() + out.v_cls.square().sum() + out.repa.square().sum()
        return out, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]), list(calls)

    fused, fused_grads, fused_calls = run()
    block_forward = sit.SiTBlock.forward

    def adding_its_own_branch(self, *a, **k):
        x, branch, v_raw = block_forward(self, *a, **k)
        return sit.add_branch(x, branch), None, v_raw

    monkeypatch.setattr(sit.SiTBlock, "forward", adding_its_own_branch)
    unfused, unfused_grads, unfused_calls = run()
    for field in ("v", "v_cls", "repa"):
        assert torch.equal(getattr(fused, field), getattr(unfused, field)), field
    for g, u in zip(fused_grads, unfused_grads):
        assert torch.equal(g, u)
    if name == "sr-dit-b1-256":  # (fused, plain) norms: blocks 0|1 2|3 4|5 (path drop: 0|1 4|5) + final
        # fused, never across the tap and gather (after block 1) or the fusion (before block 4)
        blocks = 4 if kw.get("path_drop") else 6
        fused_norm1 = blocks // 2
        assert (fused_calls.count("residual_rmsnorm_modulate"), fused_calls.count("rmsnorm_modulate")) == (
            blocks + fused_norm1 + 1, blocks - fused_norm1)
        assert (unfused_calls.count("residual_rmsnorm_modulate"), unfused_calls.count("rmsnorm_modulate")) == (
            blocks, blocks + 1)
    else:  # LayerNorm adds in NormModulate.residual; every norm still runs once
        assert fused_calls == unfused_calls == ["layernorm_modulate"] * 13


# --------------------------------------------------------------------------- RoPE, value residual


def test_rope_ids_and_v0_follow_tokens_through_routing():
    for quirk in (True, False):
        model, cfg = small_model("sr-dit-b1-256", f"model.quirk_rotate_routed_cls={quirk}")
        calls = _record_block_inputs(model.train())
        v0_out = []
        model.blocks[0].register_forward_hook(lambda m, a, out: v0_out.append(out[2]))
        ids = torch.tensor([[0, 5, 3, 16], [7, 1, 2, 9]])
        model(*inputs(cfg, B=2), keep_ids=ids)
        full = torch.arange(-1, 16).expand(2, -1)
        assert torch.equal(calls[0][0][3], full)  # dense: class token at -1 (not rotated)
        for i in (2, 3):
            x, c, rope, rope_ids, v0, _ = calls[i][0]
            expected = full.gather(1, ids)
            expected = expected.clamp(min=0) if quirk else expected
            assert torch.equal(rope_ids, expected)
            assert rope_ids[0, 0] == (0 if quirk else -1)  # Q1: kept class token rotates as (0, 0)
            assert torch.equal(v0, ref.gather_tokens(v0_out[0], ids))  # block 0's v at the kept tokens
        assert calls[2][0][4] is calls[3][0][4]  # gathered once for the routed blocks
        assert calls[4][0][4] is v0_out[0]  # decoder: full v0


def test_value_residual_mixes_block0_v_gathered_at_kept_ids():
    B, T, K, H, Dh = 2, 7, 3, 2, 4
    qkv = torch.randn(B, K, 3 * H * Dh, dtype=torch.float64)
    v0 = torch.randn(B, T, H, Dh, dtype=torch.float64)
    ids = torch.tensor([[4, 0, 2], [6, 5, 1]])
    lam = torch.tensor(0.3, dtype=torch.float64)
    _, _, v, v_raw = ref.attention_prologue(qkv, H, v0=v0, v0_ids=ids, lam=lam)
    own = qkv.view(B, K, 3, H, Dh)[:, :, 2]
    assert torch.equal(v_raw, own)
    for b in range(B):
        for j in range(K):
            expected = 0.3 * v0[b, ids[b, j]] + 0.7 * own[b, j]
            assert torch.allclose(v.transpose(1, 2)[b, j], expected, rtol=0, atol=1e-15)


def test_apply_rope_rotates_pairs_by_table_rows_and_skips_negative_ids():
    B, N, H, Dh, P = 2, 5, 3, 8, 6
    x = torch.randn(B, N, H, Dh, dtype=torch.float64)
    angles = torch.rand(P, Dh // 2, dtype=torch.float64) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    ids = torch.tensor([[-1, 0, 3, 5, 3], [2, -1, 1, 1, 4]])
    out = ref.apply_rope(x, cos, sin, ids)
    z = torch.view_as_complex(x.reshape(B, N, H, Dh // 2, 2).contiguous())
    for b in range(B):
        for n in range(N):
            if ids[b, n] < 0:
                assert torch.equal(out[b, n], x[b, n])
            else:
                rot = z[b, n] * torch.exp(1j * angles[ids[b, n]])
                assert torch.allclose(torch.view_as_real(rot).reshape(H, Dh), out[b, n], atol=1e-14)


def test_rope_tables_and_pos_embed_closed_forms():
    model, cfg = small_model("sr-dit-b1-256", dtype=torch.float32)
    S, Dh, D = 4, 16, 64
    cos = model.feat_rope.freqs_cos.double()
    for h in range(S):
        for w in range(S):
            for d in range(Dh):
                axis, k = (h, (d % (Dh // 2)) // 2) if d < Dh // 2 else (w, (d % (Dh // 2)) // 2)
                assert abs(cos[h * S + w, d] - math.cos(axis * 10000 ** (-k / (Dh // 4)))) < 1e-6
    pos = model.pos_embed[0].double()
    assert torch.equal(pos[0], torch.zeros(D, dtype=torch.float64))
    for h, w in [(0, 1), (2, 3), (3, 0)]:
        row = pos[1 + h * S + w]
        for k in range(D // 4):
            omega = 10000 ** (-k / (D / 4))
            assert abs(row[k] - math.sin(w * omega)) < 1e-6 and abs(row[D // 4 + k] - math.cos(w * omega)) < 1e-6
            assert abs(row[D // 2 + k] - math.sin(h * omega)) < 1e-6
            assert abs(row[3 * D // 4 + k] - math.cos(h * omega)) < 1e-6


def test_timestep_sinusoid_is_computed_in_float32():
    from srdit.model.sit import TimestepEmbedder

    t = torch.tensor([0.123456789012345, 0.9], dtype=torch.float64)
    emb = TimestepEmbedder.sinusoid(t, 256)
    assert emb.dtype == torch.float64
    assert torch.equal(emb, TimestepEmbedder.sinusoid(t.float(), 256).double())


def test_qk_norm_uses_torch_default_eps():
    assert ref.default_rms_eps(torch.bfloat16) == ref.default_rms_eps(torch.float32) == torch.finfo(torch.float32).eps
    assert ref.default_rms_eps(torch.float64) == torch.finfo(torch.float64).eps
    B, N, H, Dh = 1, 3, 2, 4
    qkv = torch.randn(B, N, 3 * H * Dh, dtype=torch.float64) * 1e-8  # tiny, so eps matters
    w = torch.rand(Dh, dtype=torch.float64) + 0.5
    q, _, _, _ = ref.attention_prologue(qkv, H, w, w)
    raw = qkv.view(B, N, 3, H, Dh)[:, :, 0]
    manual = raw / torch.sqrt(raw.square().mean(-1, keepdim=True) + torch.finfo(torch.float64).eps) * w
    assert torch.allclose(q.transpose(1, 2), manual, rtol=1e-12, atol=0)


def test_rmsnorm_modulate_formula():
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    shift, scale, w = (torch.randn(2, 7, dtype=torch.float64) for _ in range(3))
    y = ref.rmsnorm_modulate(x, shift, scale, w[0], eps=1e-6)
    manual = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w[0] * (1 + scale[:, None]) + shift[:, None]
    assert torch.allclose(y, manual, rtol=1e-13, atol=1e-13)


def test_model_without_reg_token_or_value_residual():
    model, cfg = small_model("sr-dit-b1-256", "model.reg_token=false", "model.value_residual=false",
                             dtype=torch.float32)
    randomize_(model).train()
    x, t, y, _ = inputs(cfg, dtype=torch.float32)
    out = model(x, t, y, None)
    assert out.v_cls is None and out.repa.shape == (3, 16, 32)  # patches only
    assert cfg.model.num_tokens == 16 and cfg.model.num_kept == 4
    (out.v.square().mean() + out.repa.square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("path_drop", [False, True])
def test_batched_adaln_computes_the_same_function_and_gradients(path_drop):
    model, cfg = small_model()
    randomize_(model).train()
    batched, _ = small_model("sr-dit-b1-256", "model.batched_adaln=true")
    batched.load_state_dict(model.state_dict())
    batched.train()
    ids = torch.stack([torch.randperm(17)[:4] for _ in range(3)])
    args = inputs(cfg)
    results = []
    for m in (model, batched):
        out = m(*args, keep_ids=ids, path_drop=path_drop)
        loss = out.v.square().sum() + out.v_cls.square().sum() + out.repa.square().sum()
        results.append((out, torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])))
    (a, ga), (b, gb) = results
    assert_close(b.v, a.v, 1e-12)
    for x, y in zip(gb, ga):
        assert (x - y).abs().max() <= 1e-12 * max(1.0, y.abs().max().item())


def test_a_checkpoint_a_safe_load_refuses_says_why_without_suggesting_an_unsafe_load(tmp_path):
    import decimal

    # a pickled object of a class torch's safe load does not allow
    torch.save({"ema": {"x": decimal.Decimal(1)}}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="a safe \\(weights_only\\) load refuses") as caught:
        load_release_weights(tmp_path / "pickled.pt")
    assert "weights_only=False" not in str(caught.value) and "trust" not in str(caught.value)
