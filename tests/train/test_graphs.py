"""The whole step as CUDA graphs (srdit.train.graphs) computes the eager step's trajectory.

On the CPU, EagerReplay stands in for the CUDA graph: what surrounds capture (static input
buffers, the branch choice, warm-up, restoring the training state after priming) is checked
bit for bit against the plain StepRunner. The capture itself is checked on a GPU only
(test_cuda_graph_step_matches_eager, run by bench/gpu_check.sh).
"""
import pytest
import torch
from runners import build_runner, step_noise, synthetic_batch

from srdit.config import ConfigError, apply_overrides, preset
from srdit.train import graphs
from srdit.train.assemble import check_runtime
from srdit.train.graphs import EagerReplay, GraphedStep

TINY = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32", "train.path_drop_prob=0.5",
        "train.lr_decay_steps=0"]  # runs here are stopped and extended: a decay to max_steps would move
CPU = torch.device("cpu")


def trajectory(step_fn, cfg, device, steps, micro, accum, *, cached=True):
    """Per-step loss values (cloned: graph outputs are overwritten by the next replay) and the
    path-drop coins, on data and noise that depend only on the seeds."""
    data_gen = torch.Generator(device).manual_seed(5)
    noise_gen, host_gen = torch.Generator(device).manual_seed(6), torch.Generator().manual_seed(7)
    values, coins = [], []
    for _ in range(steps):
        batches = [synthetic_batch(cfg, micro, device, cached, generator=data_gen) for _ in range(accum)]
        noise = step_noise(cfg, micro * accum, device, generator=noise_gen, host_generator=host_gen)
        coins.append(noise.path_drop)
        values.append({k: v.clone() for k, v in step_fn(batches, noise).items()})
    return values, coins


def training_state(runner) -> list[torch.Tensor]:
    opt = runner.optimizers.optimizers[0]
    return [*runner.model.parameters(), *runner.ema.model.parameters(),
            *(v for p in opt.param_groups[0]["params"] for v in opt.state[p].values())]


def test_graphed_step_follows_the_eager_trajectory_bit_for_bit():
    overrides = [*TINY, "train.cuda_graphs=true"]
    cfg, eager = build_runner(CPU, *overrides, graph_type=EagerReplay)
    eager = eager.runner  # the plain step, with the same (capturable) optimizer
    _, graphed = build_runner(CPU, *overrides, graph_type=EagerReplay)
    graphed_runner = graphed.runner
    a, coins = trajectory(eager.run, cfg, CPU, steps=8, micro=3, accum=2)
    b, _ = trajectory(graphed.run, cfg, CPU, steps=8, micro=3, accum=2)
    assert set(coins) == {False, True} and set(graphed.graphs) == {False, True}
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (step, k)
    for x, y in zip(training_state(eager), training_state(graphed_runner), strict=True):
        assert torch.equal(x, y)


def test_a_replay_returns_its_graphs_static_outputs():
    cfg, runner = build_runner(CPU, *TINY)
    graphed = GraphedStep(runner, graph_type=EagerReplay)
    batches = [synthetic_batch(cfg, 2, CPU, cached=True)]
    noise = step_noise(cfg, 2, CPU, host_generator=torch.Generator().manual_seed(0))
    first = graphed.run(batches, noise)
    second = graphed.run(batches, noise)
    assert first is second is graphed.graphs[noise.path_drop].outputs  # the same tensors, rewritten


def test_without_sprint_one_graph_serves_both_coins():
    cfg, runner = build_runner(CPU, *TINY, "model.sprint=false")
    graphed = GraphedStep(runner, graph_type=EagerReplay)
    batches = [synthetic_batch(cfg, 2, CPU, cached=True)]
    noise = step_noise(cfg, 2, CPU, host_generator=torch.Generator().manual_seed(0))
    for coin in (True, False):
        noise.path_drop = coin
        graphed.run(batches, noise)
    assert set(graphed.graphs) == {False}


def test_a_replay_refuses_inputs_of_another_shape_naming_them():
    cfg, runner = build_runner(CPU, *TINY)
    graphed = GraphedStep(runner, graph_type=EagerReplay)
    host = torch.Generator().manual_seed(0)
    graphed.run([synthetic_batch(cfg, 2, CPU, cached=True)], step_noise(cfg, 2, CPU, host_generator=host))
    with pytest.raises(ValueError, match=r"micro-batch 0 'latent' is \(3, .* captured step takes \(2, "):
        graphed.run([synthetic_batch(cfg, 3, CPU, cached=True)], step_noise(cfg, 3, CPU, host_generator=host))
    with pytest.raises(ValueError, match="micro-batch 0 has"):
        graphed.run([synthetic_batch(cfg, 2, CPU, cached=False)], step_noise(cfg, 2, CPU, host_generator=host))
    with pytest.raises(ValueError, match="2 micro-batches, captured with 1"):
        graphed.run([synthetic_batch(cfg, 1, CPU, cached=True)] * 2, step_noise(cfg, 2, CPU, host_generator=host))


def test_graphs_need_cuda_adamw_and_no_graphs_of_compiles_own_and_take_several_ranks():
    cfg = apply_overrides(preset("quickstart"), [*TINY, "train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_runtime(cfg, CPU, world=1)
    check_runtime(cfg, CPU, world=2, graph_type=EagerReplay)  # the reduction is captured with the step
    _, runner = build_runner(CPU, *TINY)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphedStep(runner)
    with pytest.raises(ConfigError, match="adamw"):
        apply_overrides(preset("quickstart"), ["train.cuda_graphs=true", "train.optimizer=muon"])
    with pytest.raises(ConfigError, match="reduce-overhead"):
        apply_overrides(preset("quickstart"), ["train.cuda_graphs=true", "train.compile=true",
                                               "train.compile_mode=reduce-overhead"])


def test_training_with_graphs_logs_the_losses_of_training_without_also_across_a_resume(tmp_path, monkeypatch,
                                                                                       capsys):
    from test_train import losses, run

    monkeypatch.setattr(graphs, "default_graph_type", lambda device: EagerReplay)
    assert run(tmp_path / "plain", "train.max_steps=6", "train.path_drop_prob=0.5") == 0
    for steps in (3, 6):  # stop after 3 steps, resume with fresh graphs for the rest
        assert run(tmp_path / "graphs", f"train.max_steps={steps}", "train.path_drop_prob=0.5",
                   "train.cuda_graphs=true") == 0
        assert "captured 2 CUDA graph(s) of the whole step" in capsys.readouterr().out
    assert losses(tmp_path / "graphs") == losses(tmp_path / "plain")
    a = torch.load(tmp_path / "plain" / "checkpoints" / "step_000000006.pt", weights_only=True)
    b = torch.load(tmp_path / "graphs" / "checkpoints" / "step_000000006.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_cuda_graph_step_matches_eager(kernels):
    """Real capture: bf16 autocast, online teacher, both path-drop branches, two micro-batches."""
    cuda = torch.device("cuda")
    overrides = ["train.path_drop_prob=0.5", "train.cuda_graphs=true", f"model.kernels={kernels}",
                 f"model.batched_adaln={kernels == 'triton'}"]
    cfg, eager = build_runner(cuda, *overrides, teacher=True)
    eager = eager.runner  # the plain step, with the same (capturable) optimizer
    _, graphed = build_runner(cuda, *overrides, teacher=True)
    a, coins = trajectory(eager.run, cfg, cuda, steps=8, micro=4, accum=2, cached=False)
    b, _ = trajectory(graphed.run, cfg, cuda, steps=8, micro=4, accum=2, cached=False)
    assert set(coins) == {False, True} and set(graphed.graphs) == {False, True}
    for step, (x, y) in enumerate(zip(a, b)):
        for k in ("loss", "vel", "repa", "cls", "cfm", "grad_norm"):
            assert torch.isfinite(y[k]) and abs(x[k].item() - y[k].item()) <= 2e-3 * max(1.0, abs(x[k].item())), \
                (step, k, x[k].item(), y[k].item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("order", ["library", "fixed"])
def test_cuda_graph_step_with_the_nccl_reduction_captured_matches_eager(order):
    """The reduction captured with the step: a one-rank NCCL communicator captures its all_reduce
    (with train.reduce_order=fixed: its all-to-all, the pairwise sums and the all-gathers) as
    eight do. bench/gpu_check.sh runs this under torchrun (env:// rendezvous); alone, it makes
    its own one-rank group."""
    import os

    import torch.distributed as dist

    from srdit import distributed

    distributed.allow_collective_capture()  # before the process group starts, as srdit.train does
    own_group = not dist.is_initialized()
    if own_group:
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore())
    try:
        cuda = torch.device("cuda")
        overrides = ["train.path_drop_prob=0.5", "train.cuda_graphs=true", "model.kernels=triton",
                     "model.batched_adaln=true", f"train.reduce_order={order}", "train.grad_accum=2",
                     "train.global_batch=8"]
        cfg, eager = build_runner(cuda, *overrides, teacher=True, reduce=True)
        eager = eager.runner
        _, graphed = build_runner(cuda, *overrides, teacher=True, reduce=True)
        assert graphed.runner.reducer is not None
        a, coins = trajectory(eager.run, cfg, cuda, steps=6, micro=4, accum=2, cached=False)
        b, _ = trajectory(graphed.run, cfg, cuda, steps=6, micro=4, accum=2, cached=False)
        assert set(coins) == {False, True} and set(graphed.graphs) == {False, True}
        for step, (x, y) in enumerate(zip(a, b)):
            for k in ("loss", "grad_norm"):
                assert torch.isfinite(y[k]) and abs(x[k].item() - y[k].item()) <= 2e-3 * max(1.0, abs(x[k].item())), \
                    (step, k, x[k].item(), y[k].item())
    finally:
        if own_group:
            dist.destroy_process_group()


def test_the_fixed_order_through_a_one_rank_reducer_and_captured_equals_its_plain_step():
    """What bench/gpu_check.sh's one-rank NCCL check captures, on a one-rank gloo group with the
    EagerReplay stand-in: the all-to-all, the pairwise sums and the all-gather back, 4 micro-batches
    (a saved pair collapsed into each chunk before it goes out), against the same fixed-order step
    with no reducer: bit for bit."""
    import torch.distributed as dist

    overrides = [*TINY, "train.reduce_order=fixed", "train.grad_accum=4", "train.global_batch=8", "train.grad_clip=0.05"]
    cpu = torch.device("cpu")
    cfg, plain = build_runner(cpu, *overrides)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        _, graphed = build_runner(cpu, *overrides, "train.cuda_graphs=true", graph_type=EagerReplay, reduce=True)
        assert graphed.runner.reducer is not None and graphed.runner.reducer.gather_back
        a, coins = trajectory(plain.run, cfg, cpu, steps=4, micro=2, accum=4)
        b, _ = trajectory(graphed.run, cfg, cpu, steps=4, micro=2, accum=4)
    finally:
        dist.destroy_process_group()
    assert set(coins) == {False, True}
    assert min(v["grad_norm"].item() for v in a) > 0.05  # the clip acted
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    for p, q in zip(training_state(plain), training_state(graphed.runner), strict=True):
        assert torch.equal(p, q)


def test_a_host_collective_inside_the_captured_step_is_an_error_that_says_so(monkeypatch):
    from srdit import distributed
    from srdit.train import step

    real = step.diffusion_loss

    def with_a_barrier(*args, **kwargs):
        distributed.barrier()
        return real(*args, **kwargs)

    cfg, runner = build_runner(CPU, *TINY)
    graphed = GraphedStep(runner, graph_type=EagerReplay)
    monkeypatch.setattr(step, "diffusion_loss", with_a_barrier)
    with pytest.raises(RuntimeError, match="distributed.barrier is a host collective and cannot run inside the "
                                           "captured training step"):
        graphed.run([synthetic_batch(cfg, 2, CPU, cached=True)],
                    step_noise(cfg, 2, CPU, host_generator=torch.Generator().manual_seed(0)))


def test_a_resumed_optimizer_keeps_this_runs_capturable_setting():
    """Optimizer.load_state_dict would bring back the checkpoint's flag, and capture refuses an
    AdamW that is not capturable; a capturable one warns on every uncaptured step."""
    from srdit.train.optim import Optimizers

    cfg, runner = build_runner(CPU, *TINY)
    for p in runner.model.parameters():
        p.grad = torch.randn_like(p)
    runner.optimizers.step(torch.zeros(()))
    state = runner.optimizers.state_dict()
    for graphs_on in (True, False):
        cfg = apply_overrides(cfg, [f"train.cuda_graphs={graphs_on}"])
        resumed = Optimizers(runner.model, cfg.train, CPU)
        resumed.load_state_dict(state)
        assert all(g["capturable"] is graphs_on for o in resumed.optimizers for g in o.param_groups)
        state = resumed.state_dict()


def test_a_failed_capture_says_what_to_do():
    class Refuses(EagerReplay):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    cfg, runner = build_runner(CPU, *TINY)
    graphed = GraphedStep(runner, graph_type=Refuses)
    with pytest.raises(RuntimeError, match="as a CUDA graph failed: RuntimeError: operation not permitted.*without "
                                           "train.cuda_graphs"):
        graphed.run([synthetic_batch(cfg, 2, CPU, cached=True)],
                    step_noise(cfg, 2, CPU, host_generator=torch.Generator().manual_seed(0)))
