"""prepare -> ShardDataset -> GlobalBatches -> training steps, through `python -m srdit.train
--data DIR` (sr-dit-b1-256 shrunk to 64 px data: 4 x 4 latents, a DINOv2 ViT-B/14 teacher fed
56 px, i.e. 4 x 4 patches, so the REPA targets have the model's 17 tokens)."""
import json
import os

from srdit.train.main import main

TINY = ["model.hidden=64", "model.heads=2", "model.depth=5", "model.projector_dim=32", "model.num_classes=3",
        "model.input_size=4", "data.teacher_resolution=56", "train.global_batch=4", "train.max_steps=2",
        "train.log_every=1", "sample.num_steps=3"]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_steps_on_images_with_the_online_teacher_and_on_cached_targets(prepared, prepared_teacher, weights,
                                                                               tmp_path, capsys):
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert main(["--preset", "sr-dit-b1-256", "--out", str(online), "--data", str(prepared[0]), *TINY,
                 f"data.teacher={weights['teacher']}"]) == 0
    assert main(["--preset", "sr-dit-b1-256", "--out", str(cached), "--data", str(prepared_teacher[0]), *TINY,
                 "data.cached_teacher=true"]) == 0
    log = capsys.readouterr().out  # the log says what the teacher saw
    assert "images: raw (exact pixels, as the release's PNG crops)" in log and "teacher targets cached" in log
    online, cached = records(online), records(cached)
    assert [r["step"] for r in online] == [r["step"] for r in cached] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["repa"] != 0 and r["cls"] > 0 for r in online + cached)
    # the same latents in the same order (same seed): the same velocity loss at step 1
    assert abs(cached[0]["vel"] - online[0]["vel"]) < 1e-5


def test_wrong_latent_shape_is_a_one_line_error(prepared, tmp_path, capsys):
    assert main(["--preset", "sr-dit-b1-256", "--out", str(tmp_path / "run"), "--data", str(prepared[0])]) == 2
    assert "latents are (32, 4, 4), the preset expects (32, 16, 16)" in capsys.readouterr().err


def test_data_latent_scale_reaches_the_loader_and_the_decoder(prepared, weights):
    """data.latent_scale is read where latents are scaled (the shard reader) and unscaled (the
    INVAE decode of samples), not the constant."""
    import torch

    from srdit.config import apply_overrides, preset
    from srdit.data.shards import open_shard
    from srdit.model.invae import load_invae, to_uint8
    from srdit.sample.generate import decode_uint8
    from srdit.train.inputs import build_dataset

    cfg = apply_overrides(preset("sr-dit-b1-256"), [*TINY, "data.latent_scale=0.5", f"data.path={prepared[0]}"])
    dataset = build_dataset(cfg)
    raw = open_shard(os.path.join(str(prepared[0]), "shard-000000.safetensors"))["latent"]
    assert torch.equal(dataset[0]["latent"], torch.from_numpy(raw[0].copy()) * 0.5)
    vae = load_invae(weights["vae"])
    z = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(decode_uint8(z, cfg, vae), to_uint8(vae.decode(z / 0.5)))
