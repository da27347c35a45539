"""srdit.kernels.sprint (gather_tokens, sprint_fuse) against their eager twins in float64 (STYLE 3, 4).

The launcher tests call the host functions with an allocator that fills every output (and the
partial-sum buffer) with NaN, so an element nobody writes fails the comparison; the autograd,
gradcheck and compile tests go through the registered custom ops. Kept ids are a random subset
per sample in random order, with token 0 (the class token) kept in some samples and not in
others, or always kept, or never.

Tolerances are TOLERANCES (conftest). The weight and bias gradients are reductions over B*T
rows (<= 2 x 257 here): in fp32 their error grows like sqrt(B*T) * 2^-24 ~ 1.4e-6 relative,
and in fp16 the products are accumulated in fp32 and rounded once (2^-11 ~ 5e-4), so both stay
inside the unloosened bounds; nothing is loosened.
The GEMMs run in the input dtype on the CPU too (torch's CPU fp16 GEMM exists and is fast
enough at these sizes), so fp16 here exercises the same code as on the GPU.
"""
import pytest
import torch

import triton

from checks import DEVICE, DTYPES, assert_close, gpu_launch, poisoned, rand  # noqa: F401 (a fixture)
from srdit.kernels import triton_utils
from srdit.kernels.triton_utils import row_launch, split_launch
from srdit.kernels import reference as ref
from srdit.kernels import sprint

# (B, T, K, D): the 256-px routed length 257/64 at small D, 65/16, 17/4, B = 1, odd D; the last
# one has 13 row tiles of 16 rows in the interpreter, so the backward's reduction programs loop.
SHAPES = [(2, 257, 64, 32), (3, 65, 16, 40), (1, 17, 4, 24), (2, 65, 16, 520)]
FUSE_CASES = ["routed", "no_routing", "path_drop"]


def kept_ids(B, T, K, token0="mixed"):
    """[B, K] int64, unique per sample, random order. token0: "mixed" (kept in sample 0 only),
    "kept" (every sample), "dropped" (no sample)."""
    rows = []
    for b in range(B):
        keep0 = token0 == "kept" or (token0 == "mixed" and b == 0)
        rest = torch.randperm(T - 1)[: K - keep0] + 1
        row = torch.cat([torch.zeros(1, dtype=torch.long), rest]) if keep0 else rest
        rows.append(row[torch.randperm(K)])
    return torch.stack(rows).to(DEVICE)


def fuse_inputs(B, T, K, D, dtype, case):
    return {
        "x_enc": rand(B, T, D, dtype=dtype),
        "g": None if case == "path_drop" else rand(B, K if case == "routed" else T, D, dtype=dtype),
        "ids": kept_ids(B, T, K) if case == "routed" else None,
        "mask_token": rand(1, 1, D, dtype=dtype),
        "weight": rand(D, 2 * D, dtype=dtype) * D ** -0.5,
        "bias": rand(D, dtype=dtype),
    }


def reference(fn, inputs, upstream):
    """fn on float64 copies of the float inputs -> (output, {name: gradient or None})."""
    leaves = {k: v.detach().double().requires_grad_() if v is not None and v.is_floating_point() else v
              for k, v in inputs.items()}
    out = fn(**leaves)
    out.backward(upstream.double())
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None and v.is_floating_point()}


# --------------------------------------------------------------------------- gather_tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("layout", ["hidden", "v0_heads"])
def test_gather_kernels(shape, layout, dtype):
    """Forward and backward launchers, outputs poisoned; the hidden state [B,T,D] and the
    value-residual v0 [B,T,H,Dh] as the strided slice of a qkv projection it is in the model."""
    B, T, K, D = shape
    if layout == "hidden":
        x = rand(B, T, D, dtype=dtype)
    else:
        x = rand(B, T, 3, 2, D // 2, dtype=dtype)[:, :, 2]  # [B,T,H=2,Dh], not contiguous
    ids = kept_ids(B, T, K)
    out = sprint._launch_gather_fwd(x, ids, alloc=poisoned)
    dout = rand(*out.shape, dtype=dtype)
    dx = sprint._launch_gather_bwd(dout, ids, T, alloc=poisoned)

    out_ref, grads = reference(ref.gather_tokens, {"x": x, "ids": ids}, dout)
    assert out.shape == out_ref.shape and out.dtype == dx.dtype == dtype and dx.shape == x.shape
    assert torch.equal(out.double(), out_ref)  # a gather is exact
    assert torch.equal(dx.double(), grads["x"])  # one term per row: the scatter-add is exact


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("token0", ["kept", "dropped"])
def test_gather_autograd(token0, dtype):
    B, T, K, D = 2, 65, 16, 24
    x = rand(B, T, D, dtype=dtype).requires_grad_()
    ids = kept_ids(B, T, K, token0)
    out = sprint.gather_tokens(x, ids)
    dout = rand(*out.shape, dtype=dtype)
    out.backward(dout)
    out_ref, grads = reference(ref.gather_tokens, {"x": x, "ids": ids}, dout)
    assert_close(out, out_ref, dtype, "out")
    assert x.grad.dtype == dtype
    assert_close(x.grad, grads["x"], dtype, "dx")


def test_gather_2d():
    """x [B,T] (no trailing dims), as the reference allows."""
    x = rand(3, 17, dtype=torch.float32).requires_grad_()
    ids = kept_ids(3, 17, 4)
    out = sprint.gather_tokens(x, ids)
    out.backward(torch.ones_like(out))
    assert torch.equal(out, ref.gather_tokens(x, ids))
    assert torch.equal(x.grad, torch.zeros_like(x).scatter_(1, ids, 1.0))


# --------------------------------------------------------------------------- sprint_fuse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_kernels(shape, case, dtype):
    """Forward and backward host functions with every output poisoned, all gradients."""
    inp = fuse_inputs(*shape, dtype, case)
    args = [inp[k] for k in ("x_enc", "g", "ids", "mask_token", "weight")]
    out = sprint._sprint_fuse_fwd(*args, inp["bias"], alloc=poisoned)
    dout = rand(*out.shape, dtype=dtype)
    dx, dg, dmask, dweight, dbias = sprint._sprint_fuse_bwd(dout, *args, True, alloc=poisoned)

    out_ref, grads = reference(ref.sprint_fuse, inp, dout)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close(out, out_ref, dtype, "out")
    got = {"x_enc": dx, "g": dg, "mask_token": dmask, "weight": dweight, "bias": dbias}
    for name, want in grads.items():
        if want is None:  # no routing: the reference never uses mask_token
            assert case == "no_routing" and name == "mask_token"
            continue
        assert got[name].dtype == dtype and got[name].shape == want.shape, name
        assert_close(got[name], want, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_autograd(case, dtype):
    """Public function with .backward() as the model uses it (gather -> routed g -> fuse)."""
    B, T, K, D = 2, 65, 16, 40
    inp = fuse_inputs(B, T, K, D, dtype, case)
    inp["ids"] = kept_ids(B, T, K, "kept") if case == "routed" else None
    leaves = {k: v.detach().clone().requires_grad_() if v is not None and v.is_floating_point() else v
              for k, v in inp.items()}
    out = sprint.sprint_fuse(**leaves)
    dout = rand(*out.shape, dtype=dtype)
    out.backward(dout)
    out_ref, grads = reference(ref.sprint_fuse, inp, dout)
    assert_close(out, out_ref, dtype, "out")
    for name, want in grads.items():
        got = leaves[name].grad
        if want is None:
            assert got is None, f"d{name} should be None, as in the reference"
            continue
        assert got is not None and got.dtype == dtype, name
        assert_close(got, want, dtype, f"d{name}")


@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_without_bias(case):
    inp = fuse_inputs(1, 17, 4, 24, torch.float32, case)
    inp["bias"] = None
    leaves = {k: v.clone().requires_grad_() if v is not None and v.is_floating_point() else v for k, v in inp.items()}
    out = sprint.sprint_fuse(**leaves)
    dout = rand(*out.shape, dtype=torch.float32)
    out.backward(dout)
    out_ref, grads = reference(ref.sprint_fuse, inp, dout)
    assert_close(out, out_ref, torch.float32, "out")
    for name, want in grads.items():
        if want is None:
            assert leaves[name].grad is None, name
        else:
            assert_close(leaves[name].grad, want, torch.float32, f"d{name}")


def test_fuse_under_autocast():
    """Under autocast the op computes in the autocast dtype, as F.linear does in the reference."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    inp = fuse_inputs(2, 65, 16, 40, torch.float32, "routed")
    leaves = {k: v.clone().requires_grad_() if v is not None and v.is_floating_point() else v for k, v in inp.items()}
    with torch.autocast(DEVICE, dtype=dtype):
        out = sprint.sprint_fuse(**leaves)
        want = ref.sprint_fuse(**inp)
    assert out.dtype == want.dtype == dtype
    dout = rand(*out.shape, dtype=dtype)
    out.backward(dout)
    cast = {k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in inp.items()}
    out_ref, grads = reference(ref.sprint_fuse, cast, dout)
    assert_close(out, out_ref, dtype, "out")
    for name, want in grads.items():
        assert leaves[name].grad.dtype == torch.float32, name  # fp32 leaves get fp32 gradients
        assert_close(leaves[name].grad, want, dtype, f"d{name}")


def test_gpu_launch_settings(gpu_launch):
    """The GPU's settings (checks.gpu_launch), outputs poisoned, fp32. gather_tokens and the fused
    forward epilogue on 3 x 16 kept rows of 40: one partial tile of 64 rows; the fused backward's
    pass over dout on 5 x 257 rows of 768: 643 tiles of 2 rows for 528 programs, so 322
    programs of 2 tiles, the last one partly past the end."""
    for kernel, (rows, width) in {"gather_tokens": (3 * 16, 40), "sprint_fuse_fwd": (3 * 16, 40)}.items():
        assert rows % row_launch(rows, width, kernel).rows, f"{kernel}: the last tile should be partial"
    B, T, K, D = 5, 257, 64, 768
    tiles = triton.cdiv(B * T, row_launch(B * T, D, "sprint_fuse_bwd").rows)
    split = split_launch(1, tiles, DEVICE)
    assert split.tiles_per_program > 1 and split.splits * split.tiles_per_program > tiles
    for layout in ("hidden", "v0_heads"):
        test_gather_kernels((3, 65, 16, 40), layout, torch.float32)
    test_fuse_kernels((3, 65, 16, 40), "routed", torch.float32)
    test_fuse_kernels((B, T, K, D), "routed", torch.float32)


def test_int64_offsets(monkeypatch):
    """int64 offsets (index_dtype's choice from 2^30 elements), forced on small shapes."""
    monkeypatch.setattr(triton_utils, "INT32_LIMIT", 0)
    test_gather_kernels(SHAPES[2], "v0_heads", torch.float32)
    test_fuse_kernels(SHAPES[2], "routed", torch.float32)


# --------------------------------------------------------------------------- gradcheck, compile


def test_gradcheck_float64():
    """Numerical vs analytical gradients in float64 (the kernels accumulate in fp64 then)."""
    B, T, K, D = 2, 9, 3, 5
    x = rand(B, T, 2, D, dtype=torch.float64).requires_grad_()
    ids = kept_ids(B, T, K)
    assert torch.autograd.gradcheck(lambda a: sprint.gather_tokens(a, ids), (x,), fast_mode=True)
    for case in FUSE_CASES:
        inp = fuse_inputs(B, T, K, D, torch.float64, case)
        names = [k for k, v in inp.items() if v is not None and v.is_floating_point()
                 and not (case == "no_routing" and k == "mask_token")]
        leaves = [inp[k].requires_grad_() for k in names]

        def fn(*tensors):
            return sprint.sprint_fuse(**{**inp, **dict(zip(names, tensors))})

        assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=True), case


@pytest.mark.parametrize("case", ["routed", "path_drop"])
def test_compile_fullgraph(case):
    """torch.compile(fullgraph=True) traces through both ops and the backward ops (register_fake)
    and gives the eager values and gradients. Inductor on the GPU; on the CPU the aot_eager
    backend, which runs the same dynamo capture, fake-tensor propagation and AOT autograd that
    prove the graph is not broken, without Inductor's C++ codegen of the glue ops around the
    custom ops (measured: passes, but ~20 s cold on 2 cores, a third of this file's 60 s budget)."""
    torch._dynamo.reset()
    dtype = torch.float32
    B, T, K, D = 2, 65, 16, 40
    inp = fuse_inputs(B, T, K, D, dtype, "routed")
    ids = inp["ids"]
    args = [inp[k] for k in ("x_enc", "mask_token", "weight", "bias")] + [rand(D, dtype=dtype)]

    def step(x, mask_token, weight, bias, scale):
        enc = torch.tanh(x)  # [B, T, D]
        g = None if case == "path_drop" else sprint.gather_tokens(enc, ids) * scale  # [B, K, D]
        h = sprint.sprint_fuse(enc, g, None if g is None else ids, mask_token, weight, bias)  # [B, T, D]
        return h.square().mean()

    def loss_and_grads(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        loss = fn(*leaves)
        return [loss, *torch.autograd.grad(loss, leaves, allow_unused=True)]

    want = loss_and_grads(step)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    got = loss_and_grads(torch.compile(step, fullgraph=True, backend=backend))
    for name, g, w in zip(("loss", "dx", "dmask", "dweight", "dbias", "dscale"), got, want):
        if w is None:
            assert g is None and case == "path_drop" and name == "dscale"
            continue
        assert_close(g, w, dtype, name)


# --------------------------------------------------------------------------- contracts


@pytest.mark.skipif(DEVICE == "cuda", reason="a failed device-side assert would poison the CUDA context")
def test_debug_id_check(monkeypatch):
    """SRDIT_CHECK_IDS=1 rejects duplicate or out-of-range ids; off by default (no cost)."""
    x = rand(2, 9, 4, dtype=torch.float32)
    dup = torch.tensor([[1, 2, 3], [4, 4, 5]], device=DEVICE)
    far = torch.tensor([[1, 2, 9], [4, 0, 5]], device=DEVICE)
    sprint.gather_tokens(x, dup)  # unchecked by default
    monkeypatch.setenv("SRDIT_CHECK_IDS", "1")
    sprint.gather_tokens(x, kept_ids(2, 9, 3))
    for bad in (dup, far):
        with pytest.raises(RuntimeError, match="unique"):
            sprint.gather_tokens(x, bad)
        with pytest.raises(RuntimeError, match="unique"):
            sprint.sprint_fuse(x, x[:, :3], bad, x[:1, :1], rand(4, 8, dtype=torch.float32), None)


def test_bad_arguments_fail_clearly():
    x = rand(2, 9, 4, dtype=torch.float32)
    w = rand(4, 8, dtype=torch.float32)
    m = rand(1, 1, 4, dtype=torch.float32)
    ids = kept_ids(2, 9, 3)
    with pytest.raises(ValueError, match=r"ids \[B,K\]"):
        sprint.gather_tokens(x, ids[0])
    with pytest.raises(ValueError, match=r"weight must be \[4,8\]"):
        sprint.sprint_fuse(x, None, None, m, w[:, :6], None)
    with pytest.raises(ValueError, match="g must be"):
        sprint.sprint_fuse(x, x[:, :3], None, m, w, None)
    with pytest.raises(ValueError, match="g must be"):
        sprint.sprint_fuse(x, x[:, :2], ids, m, w, None)
