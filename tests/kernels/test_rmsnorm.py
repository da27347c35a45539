"""srdit.kernels.rmsnorm (rmsnorm_modulate, residual_rmsnorm_modulate, rms_norm) against its eager
twins in float64 (STYLE 3, 4).

The launcher tests call the host launchers with an allocator that fills every output and every
partial-sum buffer with NaN, so an element a kernel forgets to write fails the comparison; the
autograd, gradcheck and compile tests go through the registered custom ops.
Shift, scale and gate are chunks of one [B, 3D] tensor, as the model takes them from adaLN.
"""
import pytest
import torch
import triton
import triton.language as tl

from checks import DEVICE, DTYPES, assert_close, gpu_launch, poisoned, rand  # noqa: F401 (a fixture)
from srdit.kernels import reference as ref
from srdit.kernels import rmsnorm as rmm
from srdit.kernels import triton_utils
from srdit.kernels.triton_utils import row_launch, split_launch

EPS = 1e-6
# (B, N, D): N = 1, the routed length 64 + 1, the full 256 + 1; D odd, not a power of two, DiT-B.
# Under the interpreter (1, 65, 768) also makes backward programs loop over row tiles.
SHAPES = [(1, 1, 7), (2, 65, 96), (1, 257, 64), (2, 3, 768), (3, 1, 96), (1, 65, 768)]
SHAPES_2D = [(5, 96), (1, 7)]  # the REG token's wg_norm: plain RMSNorm of x [B, D]


def make_inputs(shape, dtype, *, has_mod, has_weight, residual=False):
    """Fresh non-zero inputs; shift, scale, gate are strided views of one adaLN-like output."""
    B, D = shape[0], shape[-1]
    shift, scale, gate = rand(B, 3 * D, dtype=dtype).chunk(3, dim=-1)
    inputs = {
        "x": rand(*shape, dtype=dtype),
        "shift": shift if has_mod else None,
        "scale": scale if has_mod else None,
        "weight": rand(D, dtype=dtype) if has_weight else None,
    }
    if residual:
        inputs.update(gate=gate, f=rand(*shape, dtype=dtype))
    return inputs


def reference(fn, inputs, upstream):
    """fn on float64 copies of `inputs` -> (outputs, {name: gradient}) for the upstream grads."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items() if v is not None}
    outs = fn(**{k: leaves.get(k) for k in inputs})
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.double() for u in upstream])
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items()}


def expected_rstd(x):
    return (x.double().pow(2).mean(-1) + EPS).rsqrt().flatten()


# --------------------------------------------------------------------------- launchers, poisoned

CASES = [(s, mod, w) for s in SHAPES for mod in (True, False) for w in (True, False)]
CASES += [(s, False, w) for s in SHAPES_2D for w in (True, False)]


def case_id(case):
    shape, has_mod, has_weight = case
    return "x".join(map(str, shape)) + ("-mod" if has_mod else "") + ("-w" if has_weight else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,has_mod,has_weight", CASES, ids=map(case_id, CASES))
def test_rmsnorm_modulate_kernels(shape, has_mod, has_weight, dtype):
    inp = make_inputs(shape, dtype, has_mod=has_mod, has_weight=has_weight)
    x, shift, scale, weight = inp["x"], inp["shift"], inp["scale"], inp["weight"]
    _, y, rstd = rmm._launch_fwd(x, shift, scale, weight, EPS, alloc=poisoned)
    dy = rand(*shape, dtype=dtype)
    dx, df, dgate, dshift, dscale, dweight = rmm._launch_bwd(dy, x, rstd, scale, weight, alloc=poisoned)
    assert df is None and dgate is None

    (y_ref,), grads = reference(ref.rmsnorm_modulate, inp, [dy])
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(rstd, expected_rstd(x), dtype, "rstd")
    assert_close(dx, grads["x"], dtype, "dx")
    assert (dshift is None) == (dscale is None) == (not has_mod) and (dweight is None) == (not has_weight)
    if has_mod:
        assert_close(dshift, grads["shift"], dtype, "dshift")
        assert_close(dscale, grads["scale"], dtype, "dscale")
    if has_weight:
        assert_close(dweight, grads["weight"], dtype, "dweight")


CASES_3D = [c for c in CASES if len(c[0]) == 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,has_mod,has_weight", CASES_3D, ids=map(case_id, CASES_3D))
def test_residual_rmsnorm_modulate_kernels(shape, has_mod, has_weight, dtype):
    inp = make_inputs(shape, dtype, has_mod=has_mod, has_weight=has_weight, residual=True)
    x, gate, f = inp["x"], inp["gate"], inp["f"]
    shift, scale, weight = inp["shift"], inp["scale"], inp["weight"]
    x_new, y, rstd = rmm._launch_fwd(x, shift, scale, weight, EPS, gate, f, alloc=poisoned)
    dx_new, dy = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    dx, df, dgate, dshift, dscale, dweight = rmm._launch_bwd(
        dy, x_new, rstd, scale, weight, dx_new, f, gate, alloc=poisoned)

    (x_new_ref, y_ref), grads = reference(ref.residual_rmsnorm_modulate, inp, [dx_new, dy])
    assert x_new.dtype == y.dtype == dtype
    assert_close(x_new, x_new_ref, dtype, "x_new")
    assert_close(y, y_ref, dtype, "y")
    assert_close(rstd, expected_rstd(x_new_ref), dtype, "rstd")
    for name, got in [("x", dx), ("f", df), ("gate", dgate), ("shift", dshift), ("scale", dscale),
                      ("weight", dweight)]:
        if name in grads:
            assert_close(got, grads[name], dtype, f"d{name}")
        else:
            assert got is None, f"d{name} should be None"


@pytest.mark.parametrize("programs", [1, 2])
def test_backward_row_loop(programs):
    """Backward programs that loop over several row tiles, on any device (a GPU's default split
    gives small shapes one tile per program): all 65 rows in 1 program (last tile partial), or
    in 2 (the second program's last tile wholly past the batch's end)."""
    shape, dtype = (1, 65, 768), torch.float32
    B, N, D = shape
    tiles = triton.cdiv(N, row_launch(N, D, "rmsnorm_bwd").rows)
    split = split_launch(B, tiles, DEVICE, programs=programs)
    assert split.splits == programs and split.tiles_per_program > 1
    assert programs == 1 or split.tiles_per_program * programs > tiles
    inp = make_inputs(shape, dtype, has_mod=True, has_weight=True, residual=True)
    x_new, _, rstd = rmm._launch_fwd(**inp, eps=EPS, alloc=poisoned)
    dx_new, dy = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    dx, df, dgate, dshift, dscale, dweight = rmm._launch_bwd(
        dy, x_new, rstd, inp["scale"], inp["weight"], dx_new, inp["f"], inp["gate"], alloc=poisoned,
        programs=programs)
    _, grads = reference(ref.residual_rmsnorm_modulate, inp, [dx_new, dy])
    for name, got in [("x", dx), ("f", df), ("gate", dgate), ("shift", dshift), ("scale", dscale),
                      ("weight", dweight)]:
        assert_close(got, grads[name], dtype, f"d{name}")


def test_gpu_launch_settings(gpu_launch):
    """The launchers with the GPU's settings (checks.gpu_launch), every output and gradient
    poisoned, in fp32 (the settings do not depend on the dtype). Modulated with the residual, at
    the 256-px length: 3 x 257 rows of 768, forward tiles of 2 rows (the last one partial),
    backward 129 programs per batch element looping over 2 one-row tiles (the last program's
    second tile past the end). Plain RMSNorm with a weight (one group) on 601 rows: 301 programs
    of 2 tiles, the last one past the end. (Looping needs more tiles than the 528 programs of
    4 per SM: each check runs ~1000 programs in the interpreter, ~5 s.)"""
    B, N, D = 3, 257, 768
    assert (B * N) % row_launch(B * N, D, "rmsnorm_fwd").rows, "the forward's last tile should be partial"
    for groups, rows_per_group in ((B, N), (1, 601)):
        tiles = triton.cdiv(rows_per_group, row_launch(rows_per_group, D, "rmsnorm_bwd").rows)
        split = split_launch(groups, tiles, DEVICE)
        assert split.tiles_per_program > 1 and split.splits * split.tiles_per_program > tiles
    test_residual_rmsnorm_modulate_kernels((B, N, D), True, False, torch.float32)
    test_rmsnorm_modulate_kernels((601, D), False, True, torch.float32)


def test_int64_offsets(monkeypatch):
    """The kernels' int64 offsets, taken for tensors of 2^30 elements or more (index_dtype),
    forced here on small ones: the same results."""
    monkeypatch.setattr(triton_utils, "INT32_LIMIT", 0)
    test_residual_rmsnorm_modulate_kernels((2, 65, 96), True, True, torch.float32)
    test_rmsnorm_modulate_kernels((5, 96), False, True, torch.float32)


# --------------------------------------------------------------------------- custom ops, autograd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 65, 96), (1, 1, 7)], ids=["2x65x96", "1x1x7"])
def test_autograd_through_custom_ops(shape, dtype):
    """Public functions with .backward(): both ops chained as in a block (norm2 after the
    attention residual), weight on one, the 2-D wg_norm case on the side."""
    inp = make_inputs(shape, dtype, has_mod=True, has_weight=True, residual=True)
    token = rand(shape[0], shape[-1], dtype=dtype)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in {**inp, "token": token}.items()}

    def block(ops, x, gate, f, shift, scale, weight, token):
        x_new, y = ops.residual_rmsnorm_modulate(x, gate, f, shift, scale, weight, EPS)
        z = ops.rmsnorm_modulate(y, shift, scale, None, EPS)
        return x_new, z, ops.rmsnorm_modulate(token, None, None, weight, EPS)

    outs = block(rmm, **leaves)
    upstream = [rand(*o.shape, dtype=dtype) for o in outs]
    torch.autograd.backward(outs, upstream)
    outs_ref, grads = reference(lambda **kw: block(ref, **kw), {**inp, "token": token}, upstream)
    for name, got, want in zip(("x_new", "z", "token_norm"), outs, outs_ref):
        assert_close(got, want, dtype, name)
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_close(leaf.grad, grads[name], dtype, f"d{name}")


@pytest.mark.parametrize("used", ["x_new", "y"])
def test_residual_one_output_used(used):
    """Only one of (x_new, y) reaches the loss: the other's gradient arrives as zeros or None."""
    inp = make_inputs((2, 5, 24), torch.float32, has_mod=True, has_weight=False, residual=True)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
    x_new, y = rmm.residual_rmsnorm_modulate(**leaves)
    out = x_new if used == "x_new" else y
    up = rand(*out.shape, dtype=torch.float32)
    out.backward(up)
    zero = torch.zeros_like(up)
    _, grads = reference(ref.residual_rmsnorm_modulate, inp, [up, zero] if used == "x_new" else [zero, up])
    for name, leaf in leaves.items():
        assert_close(leaf.grad, grads[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_mixed_dtypes(dtype):
    """As under autocast: activations and adaLN outputs in low precision, the weight in fp32.
    Outputs take x's dtype, every gradient its input's dtype."""
    inp = make_inputs((2, 9, 40), dtype, has_mod=True, has_weight=True, residual=True)
    inp["weight"] = inp["weight"].float()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    outs = rmm.residual_rmsnorm_modulate(**leaves)
    assert all(o.dtype == dtype for o in outs)
    upstream = [rand(*o.shape, dtype=dtype) for o in outs]
    torch.autograd.backward(outs, upstream)
    outs_ref, grads = reference(ref.residual_rmsnorm_modulate, inp, upstream)
    for name, got, want in zip(("x_new", "y"), outs, outs_ref):
        assert_close(got, want, dtype, name)
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, grads[name], dtype, f"d{name}")


# --------------------------------------------------------------------------- y in the next GEMM's dtype


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, triton_utils.round_to(tl.load(x_ptr + offs, mask=mask), y_ptr.dtype.element_ty), mask=mask)


def test_rounding_to_bf16_is_torchs_bit_for_bit():
    """The kernels' fp32 -> bf16 rounding against torch's cast on the values where rounding modes
    differ: ties to even (both parities), a carry out of the mantissa into the exponent, overflow
    to inf, subnormals, signed zeros, inf and NaN, and random values (the interpreter's own cast
    truncates: half of these would fail with it)."""
    bits = [0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x3FFF_8000, 0x3FFF_FFFF, 0x7F7F_FFFF, 0xFF7F_8000,
            0x0000_8000, 0x0001_8000, 0x0000_0001, 0x807F_FFFF, 0x0000_0000, 0x8000_0000, 0x7F80_0000, 0xFF80_0000,
            0x7FC0_0000, 0x7FFF_FFFF, 0xFFFF_FFFF]
    special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([special, torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,))]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("autocast", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_autocast_y_is_the_cast_it_replaces(residual, autocast):
    """Under autocast y comes out in the autocast dtype, with the bits of the old path (y in x's
    fp32, then autocast's cast before the next Linear), and dy is taken in that dtype with the
    gradients of the old path (the Linear's low-precision gradient cast back to fp32 first);
    x_new stays fp32. rms_norm (the REG token) keeps x's dtype."""
    shape = (2, 65, 96)
    inp = make_inputs(shape, torch.float32, has_mod=True, has_weight=False, residual=residual)
    for name in ("shift", "scale", "gate", "f"):  # adaLN and the branch come out of autocast GEMMs
        if name in inp:
            inp[name] = inp[name].to(autocast)
    fn = rmm.residual_rmsnorm_modulate if residual else rmm.rmsnorm_modulate
    upstream = [rand(*shape, dtype=torch.float32)] if residual else []
    dy = rand(*shape, dtype=autocast)
    results = []
    for fused in (True, False):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
        with torch.autocast(torch.device(DEVICE).type, dtype=autocast, enabled=fused):
            outs = fn(**leaves)
        outs = list(outs) if residual else [outs]
        if not fused:
            outs[-1] = outs[-1].to(autocast)  # the cast the next Linear made
        torch.autograd.backward(outs, upstream + [dy])
        results.append((outs, {k: v.grad for k, v in leaves.items()}))
    (outs, grads), (old_outs, old_grads) = results
    assert outs[-1].dtype == autocast and (not residual or outs[0].dtype == torch.float32)
    for got, want in zip(outs, old_outs):
        assert torch.equal(got.view(torch.int16) if got.dtype != torch.float32 else got,
                           want.view(torch.int16) if want.dtype != torch.float32 else want)
    for name, got in grads.items():
        assert got.dtype == inp[name].dtype and torch.equal(got, old_grads[name]), f"d{name}"
    with torch.autocast(torch.device(DEVICE).type, dtype=autocast):
        assert rmm.rms_norm(inp["x"][:, 0]).dtype == torch.float32


def test_no_rows():
    """N = 0 launches nothing; outputs are empty and the per-batch gradients are zeros."""
    inp = make_inputs((2, 0, 8), torch.float32, has_mod=True, has_weight=True, residual=True)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    x_new, y = rmm.residual_rmsnorm_modulate(**leaves)
    z = rmm.rmsnorm_modulate(leaves["x"], leaves["shift"], leaves["scale"], leaves["weight"])
    assert x_new.shape == y.shape == z.shape == (2, 0, 8)
    (x_new.sum() + y.sum() + z.sum()).backward()
    for name in ("gate", "shift", "scale", "weight"):
        assert torch.equal(leaves[name].grad, torch.zeros_like(leaves[name])), name


def test_gradcheck_float64():
    """Numerical vs analytical gradients in float64 (the kernels compute in fp64 then)."""
    shape = (2, 3, 5)
    inp = make_inputs(shape, torch.float64, has_mod=True, has_weight=True, residual=True)
    leaves = [inp[k].detach().clone().requires_grad_() for k in ("x", "gate", "f", "shift", "scale", "weight")]
    x, gate, f, shift, scale, weight = leaves
    assert torch.autograd.gradcheck(lambda *a: rmm.rmsnorm_modulate(*a, eps=EPS), (x, shift, scale, weight),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: rmm.residual_rmsnorm_modulate(*a, eps=EPS), tuple(leaves),
                                    fast_mode=True)
    token = rand(3, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w: rmm.rmsnorm_modulate(t, None, None, w, EPS), (token, weight),
                                    fast_mode=True)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through both ops and their backward ops (register_fake),
    and the compiled function gives the eager function's values and gradients."""
    torch._dynamo.reset()
    dtype = torch.float32
    inp = make_inputs((2, 65, 96), dtype, has_mod=True, has_weight=True, residual=True)
    args = [inp[k].detach().clone() for k in ("x", "gate", "f", "shift", "scale", "weight")]

    def step(x, gate, f, shift, scale, weight):
        x_new, y = rmm.residual_rmsnorm_modulate(x, gate, f, shift, scale, None, EPS)
        z = rmm.rmsnorm_modulate(y * 0.5, shift, scale, weight, EPS)
        w = rmm.rmsnorm_modulate(x_new[:, 0], None, None, weight, EPS)
        return (x_new * z).square().mean() + w.sin().sum()

    def loss_and_grads(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        loss = fn(*leaves)
        return [loss, *torch.autograd.grad(loss, leaves)]

    want = loss_and_grads(step)
    got = loss_and_grads(torch.compile(step, fullgraph=True))
    for name, g, w in zip(("loss", "dx", "dgate", "df", "dshift", "dscale", "dweight"), got, want):
        assert_close(g, w, dtype, name)


def test_bad_arguments_fail_clearly():
    x = rand(2, 3, 8, dtype=torch.float32)
    s = rand(2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="both shift and scale"):
        rmm.rmsnorm_modulate(x, s, None)
    with pytest.raises(ValueError, match=r"x \[B,N,D\]"):
        rmm.rmsnorm_modulate(x[:, 0], s, s)
    with pytest.raises(ValueError, match="weight must be"):
        rmm.rmsnorm_modulate(x, s, s, rand(7, dtype=torch.float32))
    with pytest.raises(ValueError, match="gate must be"):
        rmm.residual_rmsnorm_modulate(x, s[:1], x, s, s)
