"""FID Inception: layout, loading, feature shapes, TF1 resize, and the wiring against torchvision."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srdit.eval.inception import (
    WEIGHTS_FILE,
    build_inception,
    load_inception,
    tf1_resize_bilinear,
)

LAYOUT = Path(__file__).resolve().parents[1] / "data" / "inception_fid.json"  # copy of shared/layouts/


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_inception()
    # random BN statistics and affine, so eps and the running stats are exercised
    for name, t in m.state_dict().items():
        if name.endswith("bn.running_mean") or name.endswith("bn.bias"):
            t.copy_(torch.randn_like(t) * 0.1)
        elif name.endswith("bn.running_var") or name.endswith("bn.weight"):
            t.copy_(torch.rand_like(t) + 0.5)
    return m


def _layout():
    return json.loads(LAYOUT.read_text())


def test_state_dict_layout_equals_reference_json(model):
    got = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert got == _layout()  # keys, shapes, dtypes and order


def test_layout_equals_torchvision_inception3(model):
    tv = pytest.importorskip("torchvision").models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    ours = model.state_dict()
    theirs = tv.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("with_counters", (True, False))
def test_load_with_and_without_num_batches_tracked(model, tmp_path, with_counters):
    sd = {k: v for k, v in model.state_dict().items()
          if with_counters or not k.endswith("num_batches_tracked")}
    assert len(sd) == (566 if with_counters else 472)
    torch.save(sd, tmp_path / WEIGHTS_FILE)
    loaded = load_inception(tmp_path)  # a folder holding the file works too
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, model.state_dict()[k]), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_errors_name_the_problem(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_inception(tmp_path / "nothing_here.pth")
    sd = dict(model.state_dict())
    del sd["Mixed_6d.branch1x1.conv.weight"]
    sd["fc.weight"] = torch.zeros(1000, 2048)
    sd["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        load_inception(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and WEIGHTS_FILE in msg
    assert "Mixed_6d.branch1x1.conv.weight" in msg and "AuxLogits.fc.weight" in msg
    assert "fc.weight: file (1000, 2048) vs model (1008, 2048)" in msg


def test_features_shapes_and_layouts(model):
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (2, 64, 48, 3), dtype=torch.uint8, generator=g)  # NHWC
    with torch.no_grad():
        out = model(img)
        out_nchw = model(img.permute(0, 3, 1, 2).contiguous())
    assert out["pool"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 2023)
    assert out["logits"].shape == (2, 1008)
    for k in out:
        assert torch.equal(out[k], out_nchw[k]) and torch.isfinite(out[k]).all()
    assert out["pool"].abs().mean() > 1e-3  # a random net still carries signal to pool_3
    torch.testing.assert_close(out["logits"], out["pool"] @ model.fc.weight.T)
    with pytest.raises(TypeError, match="uint8"):
        model(img.float())


def test_wiring_matches_torchvision_with_fid_pools(model, monkeypatch):
    """torchvision's Inception3 with pytorch-fid's pool changes patched in (TF SAME average pools,
    max pool in Mixed_7c) must give our pool_3, spatial and fc features on the same weights; and
    our stock_pools variant must equal unpatched torchvision."""
    tvi = pytest.importorskip("torchvision.models.inception")

    class FidPools:  # stands in for torch.nn.functional inside torchvision's inception module
        mixed_7c = False

        def __getattr__(self, name):
            return getattr(F, name)

        def avg_pool2d(self, x, kernel_size, stride=None, padding=0, **kw):
            assert (kernel_size, stride, padding) == (3, 1, 1)
            if self.mixed_7c:
                return F.max_pool2d(x, 3, stride=1, padding=1)
            return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    tv = tvi.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    tv.load_state_dict(model.state_dict())
    tv.eval()
    stock = build_inception(stock_pools=True)
    stock.load_state_dict(model.state_dict())
    feats = {}
    tv.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: feats.__setitem__("b1", o))
    tv.avgpool.register_forward_hook(lambda m, i, o: feats.__setitem__("pool", o.flatten(1)))

    img = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        x = model.preprocess(img)
        ref_stock = tv(x) - tv.fc.bias
        pool_stock = feats["pool"]
        shim = FidPools()
        monkeypatch.setattr(tvi, "F", shim)
        tv.Mixed_7c.register_forward_pre_hook(lambda m, i: setattr(shim, "mixed_7c", True))
        tv.Mixed_7c.register_forward_hook(lambda m, i, o: setattr(shim, "mixed_7c", False))
        ref_logits = tv(x) - tv.fc.bias
        ours = model(img)
        ours_stock = stock(img)
    spatial = feats["b1"][:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    torch.testing.assert_close(ours["pool"], feats["pool"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["spatial"], spatial, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["logits"], ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_stock["pool"], pool_stock, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_stock["logits"], ref_stock, rtol=1e-4, atol=1e-5)
    # and the FID pools do matter
    assert not torch.allclose(ours["pool"], pool_stock, rtol=1e-3, atol=1e-4)


def test_tf1_resize_hand_computed():
    # 2x2 -> 3x3. TF1 (no half-pixel centres): src = dst * 2/3 = 0, 2/3, 4/3; 4/3 has
    # floor 1 = last row, so it takes row 1. Effective coordinates along each axis: 0, 2/3, 1.
    # For img[y, x] = 60 y + 30 x (bilinear reproduces it exactly): out = 60 ey + 30 ex.
    img = torch.tensor([[0.0, 30.0], [60.0, 90.0]])[None, None]
    want = torch.tensor([[0.0, 20.0, 30.0],
                         [40.0, 60.0, 70.0],
                         [60.0, 80.0, 90.0]])
    got = tf1_resize_bilinear(img, (3, 3))[0, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # PyTorch's half-pixel convention: src = (dst + 0.5) * 2/3 - 0.5 = -1/6 (clamped to 0), 1/2,
    # 7/6 (clamped to 1): coordinates 0, 1/2, 1, so the centre is the plain average 45, not 60.
    torch_hp = F.interpolate(img, size=(3, 3), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(torch_hp, torch.tensor([[0.0, 15.0, 30.0],
                                                       [30.0, 45.0, 60.0],
                                                       [60.0, 75.0, 90.0]]))
    assert (got - torch_hp).abs().max() == pytest.approx(15.0, abs=1e-4)


def test_tf1_resize_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 5, generator=g) * 255
    # identity size is the identity; integer downsampling takes every k-th pixel (no antialias)
    torch.testing.assert_close(tf1_resize_bilinear(x, (7, 5)), x, rtol=0, atol=0)
    y = torch.rand(1, 1, 8, 8, generator=g)
    torch.testing.assert_close(tf1_resize_bilinear(y, (4, 4)), y[..., ::2, ::2], rtol=0, atol=0)
    # 2x upsampling: odd outputs are midpoints, the last output repeats the last input
    z = tf1_resize_bilinear(y, (16, 16))
    torch.testing.assert_close(z[..., ::2, ::2], y, rtol=0, atol=0)
    torch.testing.assert_close(z[..., 1, 0], (y[..., 0, 0] + y[..., 1, 0]) / 2)
    torch.testing.assert_close(z[..., 15, 0], y[..., 7, 0])
