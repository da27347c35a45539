"""The fast step computes what the eager step computes (issue 7's invariant): the `best`
configuration of bench/throughput.py (Triton kernels, batched adaLN, torch.compile, the whole
step as graphs, cached teacher targets) against the eager one with the same cached targets, on
the same synthetic batch and the same noise: every loss part and the gradient norm agree to
fp32 rounding over several optimizer steps."""
import torch
from runners import build_runner, step_noise, synthetic_batch

from srdit.train.graphs import EagerReplay

CPU = torch.device("cpu")
BEST = ["model.kernels=triton", "model.batched_adaln=true", "train.compile=true", "train.cuda_graphs=true"]


def test_best_variant_computes_the_eager_losses():
    cfg, eager = build_runner(CPU, "data.cached_teacher=true", "train.global_batch=8")
    _, best = build_runner(CPU, "data.cached_teacher=true", "train.global_batch=8", *BEST, graph_type=EagerReplay)
    batch = synthetic_batch(cfg, 8, CPU, cached=True, generator=torch.Generator().manual_seed(3))
    gens = {name: (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)) for name in ("a", "b")}
    for step in range(3):
        a = eager.run([batch], step_noise(cfg, 8, CPU, generator=gens["a"][0], host_generator=gens["a"][1]))
        b = best.run([batch], step_noise(cfg, 8, CPU, generator=gens["b"][0], host_generator=gens["b"][1]))
        for name in ("loss", "vel", "repa", "cls", "cfm", "grad_norm"):
            assert abs(a[name].item() - b[name].item()) <= 1e-4 * max(1.0, abs(a[name].item())), (step, name)


def test_attention_auto_is_resolved_before_the_model_is_compiled():
    """`auto` times its candidates for the step's shapes (all tokens and the routed blocks' kept
    tokens) in build_step, before torch.compile traces the model, which cannot time anything;
    the choice is what the training log prints."""
    from srdit.kernels import attention

    attention._AUTO.clear()
    cfg, runner = build_runner(CPU, "model.attention_backend=auto", "train.compile=true", "train.global_batch=4")
    m = cfg.model
    shapes = {(4, m.heads, m.num_tokens, m.head_dim), (4, m.heads, m.num_kept, m.head_dim)}
    assert {key[1] for key in attention._AUTO} == shapes  # resolved before any step ran
    assert runner.attention == (f"auto: {m.num_tokens} tokens -> sdpa, {m.num_kept} tokens -> sdpa")
