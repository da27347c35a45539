"""Every loader yields GlobalBatches' samples in GlobalBatches' order: in-process, DataLoader
workers, and DALI (CPU mode, device_id=None); resuming at step s continues exactly. For each
kind of shard: raw images (the default, no decoder anywhere), JPEG images, cached targets."""
import pytest
import torch

from srdit.data import GlobalBatches, ShardDataset, TorchBatches, dali_available, make_batches

DALI = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130==2.4.0)")
# 12 samples, global batch 4: 3 steps per epoch, so 7 steps cross two epoch boundaries
STEPS, G = 7, 4


def run(loader, steps=STEPS):
    """The micro-batches (dicts of CPU tensors) of `steps` steps, in order."""
    out = []
    for _ in range(steps):
        out += [{k: v.cpu() for k, v in micro.items()} for micro in loader.next_step()]
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def datasets(prepared, prepared_jpeg, prepared_teacher):
    return {"image": ShardDataset(prepared[0]), "jpeg": ShardDataset(prepared_jpeg[0]),
            "teacher": ShardDataset(prepared_teacher[0])}


def reference(ds, start=0, **kw):
    return run(GlobalBatches(ds, G, seed=7, start_step=start, **kw), STEPS - start)


@pytest.mark.parametrize("kind", ["image", "jpeg", "teacher"])
def test_dataloader_workers_equal_global_batches_and_resume_exactly(datasets, kind):
    ds = datasets[kind]
    ref = reference(ds, accum=2)
    assert [m["latent"].shape[0] for m in ref] == [2] * 2 * STEPS
    assert_same(run(TorchBatches(ds, G, seed=7, accum=2, workers=2)), ref)
    loader = make_batches(ds, G, seed=7, accum=2, start_step=4, workers=1)
    assert isinstance(loader, TorchBatches) and loader.step == 4
    assert_same(run(loader, STEPS - 4), ref[2 * 4:])


def test_every_epoch_is_a_permutation_and_ranks_split_each_global_batch(datasets):
    ds = datasets["image"]
    one = [m["latent"] for m in reference(ds)]
    per_epoch = [torch.cat(one[e * 3:(e + 1) * 3]) for e in range(2)]
    for epoch in per_epoch:  # 3 steps x 4 = all 12 samples once
        assert torch.unique(epoch.reshape(12, -1), dim=0).shape[0] == 12
    assert not torch.equal(per_epoch[0], per_epoch[1])  # reshuffled per epoch
    ranks = [reference(ds, rank=r, world=2) for r in range(2)]
    for s in range(STEPS):
        assert torch.equal(torch.cat([ranks[0][s]["latent"], ranks[1][s]["latent"]]), one[s])


@DALI
@pytest.mark.parametrize("kind, workers", [("image", 0), ("jpeg", 0), ("teacher", 0), ("image", 2), ("jpeg", 2)])
def test_dali_cpu_mode_equals_the_pytorch_fallback(datasets, kind, workers):
    """Same seed -> the same samples in the same order, bit for bit (raw crops pass through with
    no decoder; CPU JPEG decode: the same libjpeg-turbo as PIL); workers=2 runs the source in
    DALI's spawned worker processes."""
    from srdit.data.dali import DaliBatches

    ds = datasets[kind]
    ref = reference(ds, accum=2)
    loader = make_batches(ds, G, seed=7, accum=2, backend="dali", device="cpu", workers=workers)
    assert isinstance(loader, DaliBatches)
    assert_same(run(loader), ref)
    resumed = DaliBatches(ds, G, seed=7, accum=2, start_step=5, device="cpu")
    assert_same(run(resumed, STEPS - 5), ref[2 * 5:])


@DALI
@pytest.mark.parametrize("kind", ["image", "jpeg"])
def test_dali_teacher_input_is_close_to_the_teachers_own_preprocessing(datasets, kind):
    """DALI's cubic resize is Catmull-Rom (a = -0.5), torch's bicubic a = -0.75: close, not equal."""
    from srdit.data.dali import DaliBatches
    from srdit.model.dinov2 import build_dinov2

    ds = datasets[kind]
    batch = DaliBatches(ds, G, seed=7, device="cpu", teacher_input=56).next_step()[0]
    expected = build_dinov2("vitb14", 56).preprocess(reference(ds)[0]["image"])
    error = (batch["teacher_input"] - expected).abs() * 0.226 * 255  # back to pixel levels
    assert batch["teacher_input"].shape == (4, 3, 56, 56) and error.mean() < 1.0 and error.max() < 12


def test_auto_backend_without_a_gpu_is_the_pytorch_fallback(datasets):
    ds = datasets["teacher"]
    assert isinstance(make_batches(ds, G, workers=2), TorchBatches)
    assert isinstance(make_batches(ds, G, workers=0), GlobalBatches)
    for kind in ("image", "jpeg"):
        with pytest.raises(ValueError, match="decode='gpu' needs a CUDA device and JPEG shards"):
            TorchBatches(datasets[kind], G, decode="gpu")


def test_dali_is_optional(datasets, monkeypatch):
    """Without DALI (the GPU machines have none) nothing imports it and "auto" falls back."""
    import sys

    from srdit.data import loaders

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    loaders.dali_available.cache_clear()
    try:
        assert not loaders.dali_available()
        assert isinstance(make_batches(datasets["image"], G, device="cpu", workers=0), GlobalBatches)
    finally:
        loaders.dali_available.cache_clear()
