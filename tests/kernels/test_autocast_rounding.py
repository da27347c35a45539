"""Under CUDA's bf16 autocast every fused op's forward rounds where its eager twin
(srdit/kernels/reference.py, the release's operation order) rounds (issue 24): bit for bit where
the twin's rounding is reproducible (elementwise ops), within one bf16 rounding where a summation
order differs (a norm's statistics, a GEMM). The policy is the real one on a GPU and its
emulation on the CPU (bench/cuda_autocast.py: rms_norm, layer_norm and reductions in fp32, the
elementwise ops on what they are given). Inputs have the model's dtypes under autocast: an fp32
residual stream (bf16 after sprint_fuse), bf16 adaLN chunks and branch outputs (autocast GEMMs),
fp32 parameters; a third of the adaLN scales are below 2^-8 in size, where bf16's `1 + scale` is
1 (or, below -2^-9, its neighbour 1 - 2^-8).
The gradients that multiply by a rounded factor (the norm's 1 + scale, the value mix's lam and
1 - lam) use the factor the forward used, as the twin's autograd does.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.cuda_autocast import cuda_autocast_on_cpu
from checks import DEVICE, assert_bits_equal, assert_close, poisoned, rand, within_one_rounding
from srdit.kernels import attention_prologue, layernorm, mlp, reference, rmsnorm, rope, sprint
from srdit.kernels.autocast import gemm_operands

LOW = torch.bfloat16
B, N, D, H = 2, 65, 96, 4
EPS = 1e-6


def cuda_policy():
    """bf16 autocast as CUDA runs it: the real one on a GPU, its emulation on the CPU."""
    return torch.autocast("cuda", dtype=LOW) if DEVICE == "cuda" else cuda_autocast_on_cpu(LOW)


def adaln_chunks():
    """shift, scale, gate [B, D]: bf16 chunks of one adaLN output; every third scale times 2^-10,
    so below 2^-8 (1 + scale rounds to 1, or to 1 - 2^-8)."""
    shift, scale, gate = rand(B, 3 * D, dtype=torch.float32).to(LOW).chunk(3, dim=-1)
    scale[:, ::3] *= 2.0**-10
    assert (scale[:, ::3].abs() < 2.0**-8).float().mean() > 0.9
    return shift, scale, gate


# --------------------------------------------------------------------------- RMSNorm + modulation


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("stream", [torch.float32, LOW], ids=["fp32-stream", "bf16-stream"])
def test_rmsnorm_modulate_rounds_as_the_twin(stream, residual):
    """x_new = x + gate * f bit for bit (gate * f rounded to bf16 first); y bit for bit the twin's
    modulation rms_norm(x) * (1 + scale) + shift of the rows the kernel normalised (with its rstd:
    the mean's summation order differs), and within one rounding of the whole twin."""
    x = rand(B, N, D, dtype=torch.float32).to(stream)
    f = rand(B, N, D, dtype=torch.float32).to(LOW)
    shift, scale, gate = adaln_chunks()
    with cuda_policy():
        if residual:
            x_new, y, rstd = rmsnorm._launch_fwd(x, shift, scale, None, EPS, gate, f, y_dtype=LOW, alloc=poisoned)
            x_new_twin, y_twin = reference.residual_rmsnorm_modulate(x, gate, f, shift, scale, None, EPS)
            assert_bits_equal(x_new, x_new_twin, "x_new")
            assert_bits_equal(rmsnorm.residual_rmsnorm_modulate(x, gate, f, shift, scale, None, EPS)[1], y, "public y")
            normalised = x_new
        else:
            _, y, rstd = rmsnorm._launch_fwd(x, shift, scale, None, EPS, y_dtype=LOW, alloc=poisoned)
            y_twin = reference.rmsnorm_modulate(x, shift, scale, None, EPS)
            assert_bits_equal(rmsnorm.rmsnorm_modulate(x, shift, scale, None, EPS), y, "public y")
            normalised = x
        xhat = normalised.float() * rstd.view(B, N, 1)  # what the twin's rms_norm computes in fp32
        y_of_rstd = xhat * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # the twin's modulation
    assert y_twin.dtype == torch.float32  # the Linear after it casts: y is that cast
    assert_bits_equal(y, y_of_rstd.to(LOW), "y")
    within_one_rounding(y, y_twin, "y vs the twin")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rmsnorm_gradients_as_the_twins_autograd(residual):
    """dx against the twin's autograd to fp32 precision (the twin multiplies dy by the bf16
    1 + scale, so must the kernel: the unrounded factor is off by up to 2^-8 relative, 2^-10 at the
    small scales); the bf16 gradients within checks.py's bf16 tolerance."""
    shift, scale, gate = adaln_chunks()
    inputs = {"x": rand(B, N, D, dtype=torch.float32), "shift": shift, "scale": scale}
    if residual:
        inputs.update(gate=gate, f=rand(B, N, D, dtype=torch.float32).to(LOW))
    dy = rand(B, N, D, dtype=LOW)
    dx_new = rand(B, N, D, dtype=torch.float32)

    def grads(ops):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        with cuda_policy():
            if residual:
                x_new, y = ops.residual_rmsnorm_modulate(weight=None, eps=EPS, **leaves)
                outs, upstream = [x_new, y.to(LOW)], [dx_new, dy]  # y.to: the next Linear's cast
            else:
                outs, upstream = [ops.rmsnorm_modulate(weight=None, eps=EPS, **leaves).to(LOW)], [dy]
        torch.autograd.backward(outs, upstream)
        return {k: v.grad for k, v in leaves.items()}

    got, want = grads(rmsnorm), grads(reference)
    assert_close(got["x"], want["x"], torch.float32, "dx")
    for name in inputs:
        assert got[name].dtype == want[name].dtype, name
        assert_close(got[name], want[name], got[name].dtype, f"d{name}")


def test_rms_norm_of_an_autocast_output_stays_fp32():
    """The REG token: rms_norm of a bf16 Linear output comes out in fp32, as autocast runs
    rms_norm (it joins the fp32 stream unrounded), with the twin's values."""
    token, weight = rand(B, D, dtype=torch.float32).to(LOW), rand(D, dtype=torch.float32)
    with cuda_policy():
        got, want = rmsnorm.rms_norm(token, weight, EPS), reference.rms_norm(token, weight, EPS)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want, torch.float32, "token")


# --------------------------------------------------------------------------- attention prologue, RoPE


def prologue_inputs(norm):
    """qkv and v0 in bf16 (autocast GEMM outputs), fp32 norm weights, tables and lam; lam = 0.3 is
    not a bf16 value, so rounding it to bf16 (as the twin's `lam * v0` does) changes the mix."""
    Dh = D // H
    q_weight, k_weight = (rand(Dh, dtype=torch.float32) if norm else None for _ in range(2))
    return dict(
        qkv=rand(B, N, 3 * D, dtype=torch.float32).to(LOW), heads=H, q_weight=q_weight, k_weight=k_weight,
        cos=rand(N, Dh, dtype=torch.float32), sin=rand(N, Dh, dtype=torch.float32),
        rope_ids=torch.randint(-1, N, (B, N), device=DEVICE), v0=rand(B, N, H, Dh, dtype=torch.float32).to(LOW),
        v0_ids=None, lam=torch.tensor(0.3, device=DEVICE))


@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk-norm+rope"])
def test_attention_prologue_rounds_as_the_twin(norm):
    """v = lam * v0 + (1 - lam) * v bit for bit (two bf16 products, a bf16 sum); q and k bit for
    bit after RoPE alone, within one rounding after the QK-norm (its mean); SDPA casts the twin's
    fp32 q and k to bf16, so that cast is what the kernel's q and k are compared with."""
    inputs = prologue_inputs(norm)
    with cuda_policy():
        got = attention_prologue.attention_prologue(**inputs)
        want = reference.attention_prologue(**inputs)
    assert_bits_equal(got[2], want[2], "v")
    for name, g, w in zip("qk", got[:2], want[:2]):
        if norm:
            within_one_rounding(g, w, name)
        else:
            assert_bits_equal(g, w.to(LOW), name)


def test_value_mix_gradients_use_the_rounded_weights():
    """d v0 = lam * dv and the v part of d qkv = (1 - lam) * dv with the bf16 lam and 1 - lam the
    forward multiplied by (the gradient of the function it computes), bit for bit; d lam within
    bf16's tolerance of the twin's. The twin's mul backward (grad * lam) gives the same on CUDA,
    which loads both operands in the common dtype (bf16); the CPU's kernel reads a 0-dim second
    operand unrounded (its scalar path), so here the rule is written out instead."""
    inputs = prologue_inputs(norm=False)
    dv = rand(B, H, N, D // H, dtype=LOW)

    def grads(fn):
        leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("qkv", "v0", "lam")}
        with cuda_policy():
            v = fn(**{**inputs, **leaves})[2]
        v.backward(dv)
        return leaves["qkv"].grad, leaves["v0"].grad, leaves["lam"].grad

    dqkv, dv0, dlam = grads(attention_prologue.attention_prologue)
    dlam_twin = grads(reference.attention_prologue)[2]
    lam = inputs["lam"]
    dv_tokens = dv.transpose(1, 2)  # [B, N, H, Dh], the layout of v0 and of qkv's v part
    assert_bits_equal(dv0, dv_tokens * lam.to(LOW), "d v0")
    assert_bits_equal(dqkv[..., 2 * D:], (dv_tokens * (1.0 - lam).to(LOW)).reshape(B, N, D), "d qkv (v part)")
    assert_close(dlam, dlam_twin, LOW, "d lam")


def test_apply_rope_rounds_as_the_twin():
    """Each product rounded before the sum (no FMA), the result once to bf16: the twin's bits."""
    x = rand(B, N, H, D // H, dtype=torch.float32).to(LOW)
    cos, sin = rand(N, D // H, dtype=torch.float32), rand(N, D // H, dtype=torch.float32)
    ids = torch.randint(-1, N, (B, N), device=DEVICE)
    with cuda_policy():
        assert_bits_equal(rope.apply_rope(x, cos, sin, ids), reference.apply_rope(x, cos, sin, ids), "rope")


# --------------------------------------------------------------------------- SPRINT fuse, MLP, teacher's LayerNorm


@pytest.mark.parametrize("case", ["routed", "path_drop", "no_routing"])
def test_sprint_fuse_within_one_rounding_of_its_partial_sums(case):
    """The split GEMM (sprint.py) rounds partial sums the twin's single GEMM keeps in fp32: the
    all-row GEMM's output x W1^T + b + m W2^T (x W1^T + b without routing), its folded bias
    b + m W2^T and the kept rows' g W2^T, each to bf16 once. So the output is within one bf16
    rounding of the largest of these and of the output itself; not more (a bf16 m W2^T, rounded
    before the fold, would add half a step of it, and with a [MASK] token and bias larger than
    the rows that is many steps of the output). Parameters fp32, the streams fp32, as the model's."""
    K = 16
    x_enc = rand(B, N, D, dtype=torch.float32)
    ids = torch.stack([torch.randperm(N, device=DEVICE)[:K] for _ in range(B)])
    g = {"routed": rand(B, K, D, dtype=torch.float32), "path_drop": None,
         "no_routing": rand(B, N, D, dtype=torch.float32)}[case]
    ids = ids if case == "routed" else None
    mask_token, bias = 10 * rand(1, 1, D, dtype=torch.float32), 10 * rand(D, dtype=torch.float32)
    weight = 0.1 * rand(D, 2 * D, dtype=torch.float32)
    with cuda_policy():
        got = sprint.sprint_fuse(x_enc, g, ids, mask_token, weight, bias)
        want = reference.sprint_fuse(x_enc, g, ids, mask_token, weight, bias)
    # the partial sums, exactly (float64) from the bf16 operands autocast gives both
    x, m, w, b = (t.to(LOW).double() for t in (x_enc, mask_token.reshape(D), weight, bias))
    xw1, mw2 = x @ w[:, :D].T, w[:, D:] @ m
    if case == "no_routing":
        partial = torch.stack([(xw1 + b).abs(), (g.to(LOW).double() @ w[:, D:].T).abs()])
    else:
        gw2 = torch.zeros_like(xw1)
        if case == "routed":
            gw2.scatter_(1, ids[..., None].expand(-1, -1, D), g.to(LOW).double() @ w[:, D:].T)
        partial = torch.stack([(xw1 + b + mw2).abs(), (b + mw2).abs().expand_as(xw1), gw2.abs()])
    within_one_rounding(got, want, case, magnitude=partial.amax(0))


def test_mlp_epilogue_rounds_as_the_twin():
    """h within one rounding of the twin's addmm output, beyond what two fp32 accumulations in
    different orders may drift apart (K fp32 steps of the sum of the terms' sizes: where h cancels
    to near 0, that is more than a step of h); GELU(tanh) of the stored h within one rounding of
    the twin's F.gelu of it, beyond the few fp32 steps by which two tanh (erf) implementations
    differ near -1 (0.5 h (1 + tanh) cancels there: a few steps of 0.5 |h|); the teacher's exact
    GELU likewise."""
    x = rand(B, N, D, dtype=torch.float32).to(LOW)
    w1, b1 = 0.1 * rand(4 * D, D, dtype=torch.float32), rand(4 * D, dtype=torch.float32)
    with cuda_policy():
        x_, w1_, b1_ = gemm_operands(x, w1, b1)
        h_twin = F.linear(x, w1, b1)
        terms = x_.double().abs() @ w1_.double().abs().T + b1_.double().abs()
        fp32_steps = torch.finfo(torch.float32).eps / torch.finfo(LOW).eps  # sizes whose bf16 step is an fp32 one
        drift = D * fp32_steps * terms
        for approximate in ("tanh", "none"):
            g, h = mlp._forward_gemm(x_, w1_, b1_, approximate, write_h=True, alloc=poisoned)
            within_one_rounding(h, h_twin, f"h ({approximate})", magnitude=drift)
            within_one_rounding(g, F.gelu(h, approximate=approximate), f"g ({approximate})",
                                magnitude=4 * fp32_steps * 0.5 * h.double().abs())


def test_teacher_layer_norm_rounds_as_the_twin():
    """x_new = x + f * gamma bit for bit (fp32 product, then the add); y within one rounding of the
    twin's fp32 LayerNorm cast to bf16 (its statistics' summation order)."""
    x, f = rand(B, N, D, dtype=torch.float32), rand(B, N, D, dtype=torch.float32).to(LOW)
    gamma, weight, bias = (rand(D, dtype=torch.float32) for _ in range(3))
    with torch.no_grad(), cuda_policy():
        x_new, y = layernorm.residual_layer_norm(x, f, gamma, weight, bias, EPS, LOW)
        x_new_twin, y_twin = reference.residual_layer_norm(x, f, gamma, weight, bias, EPS, LOW)
        y0, y0_twin = layernorm.layer_norm(x, weight, bias, EPS, LOW), reference.layer_norm(x, weight, bias, EPS, LOW)
    assert_bits_equal(x_new, x_new_twin, "x_new")
    within_one_rounding(y, y_twin, "y")
    within_one_rounding(y0, y0_twin, "y (plain)")
