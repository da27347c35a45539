"""srdit.kernels.attention_prologue against reference.attention_prologue evaluated in float64.

Every output and every gradient (qkv, q/k weights, v0, lambda), every switch combination of
(QK-norm, RoPE, value residual dense/routed), poisoned outputs, gradcheck in float64 and a
torch.compile(fullgraph=True) forward+backward. Runs under TRITON_INTERPRET=1 on the CPU and
unchanged on a GPU.
"""
import contextlib
import itertools
from unittest import mock

import pytest
import torch

from checks import DEVICE, DTYPES, TOLERANCES, assert_close, gpu_launch, poisoned  # noqa: F401 (a fixture)
from srdit.kernels import reference
from srdit.kernels.attention_prologue import _launch_bwd, _launch_fwd, attention_prologue
from srdit.kernels import triton_utils
from srdit.kernels.triton_utils import row_launch

NAMES = ("q", "k", "v", "v_raw", "dqkv", "dq_weight", "dk_weight", "dv0", "dlam")


def _inputs(B, N, H, Dh, dtype, *, norm=True, rope=True, vr="dense", T=None, k_weight=True, with_cls=(True,)):
    """Fresh random inputs laid out as in the model.

    vr: None (no value residual), "dense" (v0 [B,N,H,Dh], v0_ids None) or "routed" (v0 [B,T,H,Dh]
    at v0_ids, a random subset of the T tokens: sample b contains index 0, the class token, iff
    with_cls[b % len(with_cls)]; rope_ids gathered from the full sequence's ids at v0_ids). v0 is a
    non-contiguous slice of a [B,T,3,H,Dh] tensor, like block 0's v_raw (a view of its qkv).
    Token N // 2 is scaled down so that its RMS is comparable to the norm's eps.
    Weights and lambda are fp32 like the model's master weights (fp64 for fp64 runs).
    """
    T = N if T is None else T
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    rnd = lambda *shape, dt=dtype: torch.randn(*shape, device=DEVICE, dtype=dt)  # noqa: E731
    x = dict(qkv=rnd(B, N, 3 * H * Dh), heads=H)
    # one token with mean(x^2) ~ 1e-6, near the QK-norm eps (fp32 machine eps): a wrong eps fails
    x["qkv"][:, N // 2] *= 1e-3
    if norm:
        x["q_weight"] = 1 + 0.5 * rnd(Dh, dt=wdtype)
        x["k_weight"] = 1 + 0.5 * rnd(Dh, dt=wdtype) if k_weight else None
    full_ids = torch.arange(T, device=DEVICE) - 1  # class token (-1) at index 0, then patches
    v0_ids = None
    if vr == "routed":
        rows = []
        for b in range(B):
            perm = torch.randperm(T - 1, device=DEVICE)[: N - 1] + 1  # patches, random order
            first = 0 if with_cls[b % len(with_cls)] else int(torch.randperm(T - 1)[0]) + 1
            while first in perm.tolist():
                first = int(torch.randint(1, T, ()))
            rows.append(torch.cat([perm, torch.tensor([first], device=DEVICE)])[torch.randperm(N, device=DEVICE)])
        v0_ids = torch.stack(rows)  # [B, N], unique per sample
        rope_ids = full_ids[v0_ids]  # tokens keep the id of where they came from
    else:
        rope_ids = torch.randint(0, max(T - 1, 1), (B, N), device=DEVICE)
        rope_ids[:, 0] = -1
    if rope:
        P = max(T - 1, 1)
        x.update(cos=rnd(P, Dh, dt=torch.float32), sin=rnd(P, Dh, dt=torch.float32), rope_ids=rope_ids)
    if vr is not None:
        x.update(v0=rnd(B, T, 3, H, Dh)[:, :, 2], v0_ids=v0_ids, lam=torch.rand((), device=DEVICE, dtype=wdtype) + 0.25)
    return x


@contextlib.contextmanager
def _qk_eps_of(dtype):
    """Evaluate the float64 twin with the QK-norm eps of the run it checks.

    The op's eps is torch's default, default_rms_eps(dtype): fp32 machine eps (1.2e-7) for
    fp16/bf16/fp32 and 2.2e-16 for fp64. The twin run in float64 would pick the fp64 one, a
    different function for rows whose mean square is near 1e-7 (_inputs makes one such token;
    elsewhere the difference is ~1e-7 relative)."""
    eps = reference.default_rms_eps(dtype)
    twin = reference.rms_norm
    with mock.patch.object(reference, "rms_norm", lambda x, weight=None, _=None: twin(x, weight, eps)):
        yield


def _run(fn, inputs, grads, to64=False):
    """Outputs (q, k, v, v_raw) and the gradients of sum(out * grad) w.r.t. qkv, the weights, v0
    (the base tensor it is a slice of) and lambda, in NAMES order; None where absent. With
    to64, the float64 twin with the QK-norm eps of the inputs' dtype."""
    cast = (lambda t: t.double()) if to64 else (lambda t: t)
    x = {k: (cast(v) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    leaves = {}
    for k in ("qkv", "q_weight", "k_weight", "lam"):
        if x.get(k) is not None:
            x[k] = leaves[k] = x[k].detach().requires_grad_()
    if x.get("v0") is not None:
        base = cast(inputs["v0"]._base).detach().requires_grad_()
        leaves["v0"] = base
        x["v0"] = base[:, :, 2]
    with _qk_eps_of(inputs["qkv"].dtype) if to64 else contextlib.nullcontext():
        outs = fn(**x)
    torch.autograd.backward(outs, [cast(g) for g in grads])
    grad = lambda k: leaves[k].grad if k in leaves else None  # noqa: E731
    return (*outs, grad("qkv"), grad("q_weight"), grad("k_weight"), grad("v0"), grad("lam"))


def _reduction_close(out, ref, terms, dtype, name):
    """A scalar reduction sum(terms) (dlambda) compared on the scale of its terms, ||terms||_2.

    A random draw can make the sum nearly cancel (|ref| << ||terms||), and then any summation
    order changes its leading digits: the relative error of the sum is eps * ||terms|| / |ref|,
    unbounded. ||terms||_2 is the expected |sum| of random-sign terms, so the error measured on
    that scale is the order-independent part, ~eps * sqrt(log n), well inside TOLERANCES."""
    err = (out.double() - ref.double()).abs().item() / max(abs(ref.item()), terms.double().norm().item(), 1e-30)
    assert err <= TOLERANCES[dtype], f"{name}: error {err:.3e} > {TOLERANCES[dtype]:.0e} ({dtype})"


def _dlam_terms(inputs, dv):
    """The terms of dlam = sum dv * (v0[v0_ids] - v_raw), in float64; dv in SDPA's [B,H,N,Dh]."""
    x = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    B, N, _ = x["qkv"].shape
    v0 = x["v0"] if x["v0_ids"] is None else reference.gather_tokens(x["v0"], x["v0_ids"])
    return dv.double().transpose(1, 2) * (v0 - x["qkv"].view(B, N, 3, x["heads"], -1)[:, :, 2])


def _check(inputs, dtype, check_poison=True):
    """Forward, every gradient and the poisoned launchers against the float64 twin."""
    B, N, _ = inputs["qkv"].shape
    H = inputs["heads"]
    Dh = inputs["qkv"].shape[-1] // 3 // H
    grads = [torch.randn(B, H, N, Dh, device=DEVICE, dtype=dtype) for _ in range(3)]  # SDPA's layout
    grads.append(torch.randn(B, N, H, Dh, device=DEVICE, dtype=dtype))  # on v_raw
    got = _run(attention_prologue, inputs, grads)
    ref = _run(reference.attention_prologue, inputs, grads, to64=True)
    for name, g, r in zip(NAMES, got, ref):
        assert (g is None) == (r is None), f"{name}: kernel gives {g is not None}, reference {r is not None}"
        if g is None:
            continue
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        if name == "dlam":
            _reduction_close(g, r, _dlam_terms(inputs, grads[2]), dtype, name)
        else:
            assert_close(g, r, dtype, name)
    # dtypes: activations and their gradients in qkv's dtype, parameter gradients in theirs
    for t in got[:5]:
        assert t.dtype == dtype
    if inputs.get("v0") is not None:
        assert got[7].dtype == inputs["v0"].dtype and got[8].dtype == inputs["lam"].dtype
    if inputs.get("q_weight") is not None:
        assert got[5].dtype == inputs["q_weight"].dtype

    if check_poison:  # the launchers write every element of preallocated, NaN-filled outputs
        args = {k: v for k, v in inputs.items()}
        if args.get("cos") is None:
            args.update(sin=None, rope_ids=None)
        q, k, v = _launch_fwd(**args, alloc=poisoned)
        for name, t, r in zip("qkv", (q, k, v), ref):
            assert_close(t, r.transpose(1, 2), dtype, f"{name} (poisoned)")
        has_v0 = inputs.get("v0") is not None  # routed: the launcher zeroes d v0, the kernel writes the kept rows
        g = [t.transpose(1, 2) for t in grads[:3]]  # [B,N,H,Dh] views of SDPA-layout gradients,
        g[1] = g[1].contiguous()  # and one contiguous: the kernel takes one stride set per gradient
        dqkv, _, _, dv0, _ = _launch_bwd(*g, **args, alloc=poisoned)
        x64 = {k: (v.double().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() and k != "cos"
                   and k != "sin" else v) for k, v in inputs.items()}
        with _qk_eps_of(dtype):
            outs = reference.attention_prologue(**x64)[:3]
        wrt = [x64["qkv"]] + ([x64["v0"]] if has_v0 else [])
        ref_grads = torch.autograd.grad(outs, wrt, [t.double() for t in grads[:3]])
        assert_close(dqkv, ref_grads[0], dtype, "dqkv (poisoned)")
        if has_v0:
            assert dv0.dtype == inputs["v0"].dtype
            assert_close(dv0, ref_grads[1], dtype, "dv0 (poisoned)")
    return got


# (B, N, H, Dh, vr, T): the SR-DiT head (Dh=64, H=2 of 12) on the dense 257-token sequence and
# the routed 64-of-257 tokens, the 65-token length, one token, an odd head count with Dh=24
SHAPES = [
    (1, 257, 2, 64, "dense", None),
    (2, 64, 2, 64, "routed", 257),
    (2, 65, 2, 64, "dense", None),
    (3, 1, 3, 24, "dense", None),
    (2, 1, 3, 24, "routed", 5),
    (2, 9, 3, 24, "routed", 17),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_shapes(dtype, shape):
    B, N, H, Dh, vr, T = shape
    _check(_inputs(B, N, H, Dh, dtype, vr=vr, T=T, with_cls=(True, False)), dtype)


@pytest.mark.parametrize("shape", [SHAPES[0], (2, 65, 2, 64, "routed", 257)], ids=lambda s: "-".join(map(str, s)))
def test_gpu_launch_settings(gpu_launch, shape):
    """The GPU's settings (checks.gpu_launch): 16 (token, head) rows of Dh = 64 per program, so
    the dense 257-token and the routed 65-of-257 shapes leave a partial last tile; forward, every
    gradient and the poisoned launchers, QK-norm, RoPE and the value residual all on."""
    B, N, H, Dh, vr, T = shape
    for kernel in ("attention_prologue_fwd", "attention_prologue_bwd"):
        assert (B * N * H) % row_launch(B * N * H, Dh, kernel).rows, "the last tile should be partial"
    _check(_inputs(B, N, H, Dh, torch.float32, vr=vr, T=T, with_cls=(True, False)), torch.float32)


def test_int64_offsets(monkeypatch):
    """int64 offsets (index_dtype's choice from 2^30 elements), forced on a small routed shape."""
    monkeypatch.setattr(triton_utils, "INT32_LIMIT", 0)
    _check(_inputs(2, 9, 3, 24, torch.float32, vr="routed", T=17), torch.float32)


# every combination of the three switches, the value residual both dense and routed
SWITCHES = [(n, r, v) for n, r in itertools.product((False, True), repeat=2) for v in (None, "dense", "routed")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: f"norm{int(s[0])}-rope{int(s[1])}-vr_{s[2]}")
def test_switches(dtype, switches):
    norm, rope, vr = switches
    _check(_inputs(2, 9, 3, 24, dtype, norm=norm, rope=rope, vr=vr, T=13 if vr == "routed" else None), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_without_k_weight(dtype):
    """Exactly the reference's switches: q_weight given and k_weight None normalises k without a
    scale; k_weight given and q_weight None is ignored (no norm at all)."""
    _check(_inputs(2, 5, 2, 16, dtype, k_weight=False), dtype)
    x = _inputs(2, 5, 2, 16, dtype, norm=False)
    x["k_weight"] = torch.randn(16, device=DEVICE)
    _check(x, dtype, check_poison=False)


def test_two_blocks_chain():
    """Block 0 (no residual) caches v_raw; block 1 mixes it in at routed ids: the gradient of
    block 0's v reaches its qkv through both its own attention and block 1's v0."""
    dtype = torch.float32
    B, T, N, H, Dh = 2, 17, 9, 3, 24
    x0 = _inputs(B, T, H, Dh, dtype, vr=None)
    x1 = _inputs(B, N, H, Dh, dtype, vr="routed", T=T)

    def chain(fn, to64):
        cast = (lambda t: t.double()) if to64 else (lambda t: t)
        a = {k: (cast(v).detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in x0.items()}
        b = {k: (cast(v).detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in x1.items()}
        with _qk_eps_of(dtype) if to64 else contextlib.nullcontext():
            q0, k0, v0, v_raw = fn(**a)
            b["v0"] = v_raw
            q1, k1, v1, _ = fn(**b)
        torch.manual_seed(1)
        loss = sum((t * torch.randn(t.shape, device=DEVICE).to(t.dtype)).sum() for t in (q0, k0, v0, q1, k1, v1))
        loss.backward()
        return [v1, a["qkv"].grad, b["qkv"].grad, b["lam"].grad, a["q_weight"].grad]

    for name, g, r in zip(("v1", "dqkv0", "dqkv1", "dlam", "dq_weight0"), chain(attention_prologue, False),
                          chain(reference.attention_prologue, True)):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("vr", [None, "dense", "routed"])
def test_gradcheck_float64(vr):
    B, N, H, Dh = 2, 3, 2, 4
    x = _inputs(B, N, H, Dh, torch.float64, vr=vr, T=5 if vr == "routed" else None)
    names = [k for k in ("qkv", "q_weight", "k_weight", "lam") if x.get(k) is not None]
    leaves = [x[k].detach().requires_grad_() for k in names]
    if vr is not None:
        names.append("v0")
        leaves.append(x["v0"].detach().clone().requires_grad_())

    def f(*args):
        return attention_prologue(**{**x, **dict(zip(names, args))})

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
    for g, r in zip(f(*leaves), reference.attention_prologue(**{**x, **dict(zip(names, leaves))})):
        assert_close(g, r, torch.float64, "fp64 output")


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the custom op and its backward op.

    Inductor compiles the surrounding graph (C++ on the CPU, ~10 s cold) and calls the ops as
    extern kernels, so on the CPU the Triton kernels still run in the interpreter."""
    B, N, H, Dh, T = 2, 9, 3, 24, 13
    x = _inputs(B, N, H, Dh, torch.float32, vr="routed", T=T)
    grads = [torch.randn(B, H, N, Dh, device=DEVICE) for _ in range(3)] + [torch.randn(B, N, H, Dh, device=DEVICE)]

    def f(**kw):
        q, k, v, v_raw = attention_prologue(**kw)
        return sum((t * g).sum() for t, g in zip((q, k, v, v_raw), grads))

    names = ("qkv", "q_weight", "k_weight", "lam")
    leaves = {k: x[k].detach().requires_grad_() for k in names}
    v0_base = x["v0"]._base.detach().requires_grad_()
    loss = torch.compile(f, fullgraph=True)(**{**x, **leaves, "v0": v0_base[:, :, 2]})
    loss.backward()
    ref = _run(reference.attention_prologue, x, grads, to64=True)
    assert_close(loss, sum((t * g.double()).sum() for t, g in zip(ref[:4], grads)), torch.float32, "loss")
    for name, got, r in zip(("dqkv", "dq_weight", "dk_weight", "dv0"),
                            (leaves["qkv"].grad, leaves["q_weight"].grad, leaves["k_weight"].grad, v0_base.grad),
                            ref[4:8]):
        assert_close(got, r, torch.float32, name)
    _reduction_close(leaves["lam"].grad, ref[8], _dlam_terms(x, grads[2]), torch.float32, "dlam")


def test_rejects_bad_inputs():
    qkv = torch.randn(1, 4, 3 * 2 * 6, device=DEVICE)
    cos = torch.randn(3, 6, device=DEVICE)
    ids = torch.zeros(1, 4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="3\\*H\\*Dh"):
        attention_prologue(qkv, 5)
    with pytest.raises(ValueError, match="needs sin"):
        attention_prologue(qkv, 2, cos=cos)
    with pytest.raises(ValueError, match="lam"):
        attention_prologue(qkv, 2, v0=torch.randn(1, 4, 2, 6, device=DEVICE))
    with pytest.raises(ValueError, match="T == N"):
        attention_prologue(qkv, 2, v0=torch.randn(1, 5, 2, 6, device=DEVICE), lam=torch.tensor(0.5))
    with pytest.raises(ValueError, match="even"):
        attention_prologue(torch.randn(1, 4, 3 * 2 * 5, device=DEVICE), 2, cos=cos[:, :5], sin=cos[:, :5],
                           rope_ids=ids)
