"""Model level: kernels="triton" computes what kernels="eager" computes, outputs and every
parameter gradient, routed training and eval; and a block compiles with fullgraph=True."""
import pytest
import torch

from checks import DEVICE, rel_err
from srdit.config import apply_overrides, preset
from srdit.model import build_model

SMALL = ["model.hidden=64", "model.heads=2", "model.depth=5", "model.projector_dim=48", "model.teacher_dim=32",
         "model.in_channels=4", "model.input_size=4", "model.num_classes=10"]


def pair(name="sr-dit-b1-256", *extra):
    eager = build_model(apply_overrides(preset(name), SMALL + list(extra))).to(DEVICE)
    triton = build_model(apply_overrides(preset(name), SMALL + list(extra) + ["model.kernels=triton"])).to(DEVICE)
    with torch.no_grad():  # non-zero everywhere, so every path shows in outputs and gradients
        for p in eager.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    triton.load_state_dict(eager.state_dict())
    return eager, triton


def inputs(B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 4, 4, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, 11, (B,), generator=g)
    cls = torch.randn(B, 32, generator=g)
    return [v.to(DEVICE) for v in (x, t, y, cls)]


def compare(eager, triton, train: bool, **kw):
    eager.train(train), triton.train(train)
    outs = []
    for model in (eager, triton):
        out = model(*inputs(), **kw)
        loss = out.v.square().sum() + out.v_cls.square().sum() + out.repa.square().sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True,
                                    materialize_grads=True)  # eval: [MASK] is unused
        outs.append((out, grads))
    (oe, ge), (ot, gt) = outs
    for name in ("v", "v_cls", "repa"):
        assert rel_err(getattr(ot, name), getattr(oe, name)) < 1e-5, name
    names = [n for n, p in eager.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, gt, ge):
        # weight gradients sum over all rows in another order: a few fp32 ulps of sqrt(rows)
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("name", ["sr-dit-b1-256", "qknorm-b1-256"])
def test_triton_equals_eager_when_routing(name):
    eager, triton = pair(name)
    ids = torch.stack([torch.randperm(17)[:4] for _ in range(3)]).to(DEVICE)
    compare(eager, triton, train=True, keep_ids=ids)


def test_triton_equals_eager_in_eval_and_path_drop():
    eager, triton = pair()
    compare(eager, triton, train=False)
    compare(eager, triton, train=True, path_drop=True)


def test_triton_equals_eager_with_q1_q2_fixed():
    eager, triton = pair("sr-dit-b1-256", "model.quirk_rotate_routed_cls=false", "model.quirk_cls_may_drop=false")
    ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.stack([1 + torch.randperm(16)[:3] for _ in range(3)])], 1)
    compare(eager, triton, train=True, keep_ids=ids.to(DEVICE))


def test_block_compiles_with_fullgraph():
    _, triton = pair()
    block = triton.blocks[2]
    x = torch.randn(2, 17, 64, device=DEVICE, requires_grad=True)
    c = torch.randn(2, 6 * 64, device=DEVICE)  # the block's adaLN output
    ids = torch.arange(-1, 16, device=DEVICE).expand(2, -1)
    v0 = torch.randn(2, 17, 2, 32, device=DEVICE)
    pending = (torch.randn(2, 64, device=DEVICE), torch.randn(2, 17, 64, device=DEVICE))  # the previous MLP branch
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out, (gate, f), _ = compiled(x, c, triton.feat_rope, ids, v0, pending)
    ref, (ref_gate, ref_f), _ = block(x, c, triton.feat_rope, ids, v0, pending)
    assert rel_err(out, ref) < 1e-6 and rel_err(f, ref_f) < 1e-6 and torch.equal(gate, ref_gate)
    (out.sum() + (gate.unsqueeze(1) * f).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_mini_convergence_triton_follows_eager(tmp_path):
    """STYLE 14: the same tiny SR-DiT trained from one seed with each op set: the loss curves and
    the final parameters agree (to fp32 rounding, amplified a little by Adam's normalisation)."""
    from srdit.train.main import main

    tiny = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32", "train.global_batch=16",
            "train.log_every=1", "train.max_steps=4", "train.sample_every=1000", "sample.num_steps=2"]
    for kind in ("eager", "triton"):
        assert main(["--preset", "quickstart", "--out", str(tmp_path / kind), *tiny, f"model.kernels={kind}"]) == 0
    import json

    curves = {k: [json.loads(line)["loss"] for line in open(tmp_path / k / "metrics.jsonl")] for k in ("eager", "triton")}
    assert len(curves["eager"]) == 4
    for a, b in zip(curves["eager"], curves["triton"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), curves
    final = {k: torch.load(tmp_path / k / "checkpoints" / "step_000000004.pt", weights_only=True)["model"]
             for k in ("eager", "triton")}
    for name, value in final["eager"].items():
        assert rel_err(final["triton"][name], value) < 1e-3, name
