"""The FID Inception-v3 (TF 2015-12-05 graph, pytorch-fid port) and the ADM feature heads.

Network: torchvision `Inception3` layout and names with num_classes = 1008, no AuxLogits, and the
pytorch-fid block behaviour that reproduces the TF graph:
  * FIDInceptionA (Mixed_5b/5c/5d), FIDInceptionC (Mixed_6b..6e), FIDInceptionE_1 (Mixed_7b):
    the 3x3/stride-1 average pool of the pool branch excludes the padding
    (count_include_pad=False, TF's SAME average pool);
  * FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3/stride-1 MAX pool;
  * every conv is conv (no bias) -> BatchNorm (eps 0.001) -> ReLU ("BasicConv2d").
The state_dict is the file `pt_inception-2015-12-05-6726825d.pth` key for key (94 conv+BN
pairs, then fc.weight [1008, 2048] and fc.bias; see shared/layouts/inception_fid.json).

Features (ADM evaluator, SPEC 5), for uint8 images of any size:
  uint8 -> float32 -> TF1 bilinear resize to 299 x 299 -> (x - 128) / 128 -> network;
  pool    [B, 2048]  pool_3: global mean of the Mixed_7c output (8 x 8 at 299)
  spatial [B, 2023]  ADM's "mixed_6/conv": Mixed_6d.branch1x1 (conv+BN+ReLU) [B, 192, 17, 17],
                     channels-last, first 7 channels, flattened: 17 * 17 * 7 = 2023 (sFID)
  logits  [B, 1008]  pool @ fc.weight.T, no bias (ADM's softmax head); softmax is left to IS.

Precision: everything fp32. On GPU, disable TF32 for ADM-comparable numbers
(torch.backends.cudnn.allow_tf32 = False, torch.backends.cuda.matmul.allow_tf32 = False); this
module does not touch global flags.

Cost: about 5.7 GFLOPs per image at 299 x 299.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


# ----------------------------------------------------------------------------- TF1 resize


def _tf1_taps(in_size: int, out_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Source taps of TF1 ResizeBilinear with align_corners=False, half_pixel_centers=False:
    scale = in / out (float32), src = dst * scale (float32), lower = floor(src),
    upper = min(ceil(src), in - 1), lerp = src - floor(src)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    lower_f = src.floor()
    lower = lower_f.long().clamp_min(0)
    upper = src.ceil().long().clamp_max(in_size - 1)
    return lower, upper, src - lower_f


def tf1_resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of float [B, C, H, W] as TF1's ResizeBilinear in the 2015 Inception graph.

    TF1 (align_corners=False, half_pixel_centers=False) maps output pixel i to source coordinate
    i * in / out: pixel corners, not centres, are aligned at 0, so the image shifts by half a
    pixel relative to PyTorch's F.interpolate(mode="bilinear", align_corners=False), which uses
    (i + 0.5) * in / out - 0.5. There is no antialiasing when downsampling. The interpolation is
    TF's: lerp along x in the upper and lower source rows, then along y, each op in float32:
    top = tl + (tr - tl) wx; bottom = bl + (br - bl) wx; out = top + (bottom - top) wy.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected float [B, C, H, W], got {tuple(x.shape)} {x.dtype}")
    h, w = x.shape[-2:]
    y0, y1, wy = _tf1_taps(h, size[0], x.device)
    x0, x1, wx = _tf1_taps(w, size[1], x.device)
    wx, wy = wx.to(x.dtype), wy.to(x.dtype)[:, None]

    def along_x(rows: Tensor) -> Tensor:
        left = rows.index_select(-1, x0)
        return left + (rows.index_select(-1, x1) - left) * wx

    top = along_x(x.index_select(-2, y0))  # [B, C, out_h, out_w]
    bottom = along_x(x.index_select(-2, y1))
    return top + (bottom - top) * wy


# ----------------------------------------------------------------------------- blocks


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps 0.001) -> ReLU; keys `conv.weight`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x: Tensor, kind: str) -> Tensor:
    """3x3 stride-1 pad-1 pool of the pool branches. "avg": TF SAME average pool (padding not
    counted, pytorch-fid); "max": FIDInceptionE_2's max pool; "avg_incl": stock torchvision
    (padding counted), only to check the wiring against torchvision in the tests."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(kind == "avg_incl"))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_features: int, pool: str = "avg"):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool_branch(x, self.pool)),
        ], 1)


class InceptionB(nn.Module):
    """Mixed_6a (stock): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (FIDInceptionC): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | pool-1x1."""

    def __init__(self, cin: int, c7: int, pool: str = "avg"):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)
        self.pool = pool

    def branches(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        return [self.branch1x1(x), b7, d, self.branch_pool(_pool_branch(x, self.pool))]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """Mixed_7a (stock): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, pool "avg") and Mixed_7c (FIDInceptionE_2, pool "max"):
    1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(_pool_branch(x, self.pool)),
        ], 1)


# ----------------------------------------------------------------------------- the network


class InceptionFeatures(nn.Module):
    """FID Inception-v3 returning ADM's features; see the module docstring.

    `stock_pools=True` swaps in torchvision's stock pool branches (padding counted, Mixed_7c
    average-pooled); it exists only so the tests can check the wiring against torchvision."""

    def __init__(self, stock_pools: bool = False):
        super().__init__()
        avg = "avg_incl" if stock_pools else "avg"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, avg)
        self.Mixed_5c = InceptionA(256, 64, avg)
        self.Mixed_5d = InceptionA(288, 64, avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg)
        self.Mixed_6c = InceptionC(768, 160, avg)
        self.Mixed_6d = InceptionC(768, 160, avg)
        self.Mixed_6e = InceptionC(768, 192, avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg)
        self.Mixed_7c = InceptionE(2048, avg if stock_pools else "max")
        self.fc = nn.Linear(2048, 1008)  # the bias is in the file but unused (ADM's head)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 [B, H, W, 3] or [B, 3, H, W] -> float32 [B, 3, 299, 299] in [-1, 1)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (0..255), got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"expected [B, H, W, 3] or [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[1] == 3 and images.shape[-1] != 3:
            x = images
        elif images.shape[-1] == 3 and images.shape[1] != 3:
            x = images.permute(0, 3, 1, 2)
        elif images.shape[1] == 3:  # 3 x 3 images: ambiguous, take NCHW like torchvision
            x = images
        else:
            raise ValueError(f"no channel axis of size 3 in {tuple(images.shape)}")
        x = x.to(self.fc.weight.device, torch.float32)
        x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.preprocess(images)  # [B, 3, 299, 299]
        x = self.Conv2d_1a_3x3(x)  # [B, 32, 149, 149]
        x = self.Conv2d_2a_3x3(x)  # [B, 32, 147, 147]
        x = self.Conv2d_2b_3x3(x)  # [B, 64, 147, 147]
        x = F.max_pool2d(x, 3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_3b_1x1(x)  # [B, 80, 73, 73]
        x = self.Conv2d_4a_3x3(x)  # [B, 192, 71, 71]
        x = F.max_pool2d(x, 3, stride=2)  # [B, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B, 288, 35, 35]
        x = self.Mixed_6a(x)  # [B, 768, 17, 17]
        x = self.Mixed_6c(self.Mixed_6b(x))  # [B, 768, 17, 17]
        b6d = self.Mixed_6d.branches(x)  # b6d[0] = branch1x1: [B, 192, 17, 17]
        spatial = b6d[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # [B, 2023]
        x = self.Mixed_6e(torch.cat(b6d, 1))  # [B, 768, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 2048, 8, 8]
        pool = x.mean(dim=(2, 3))  # [B, 2048]
        logits = pool @ self.fc.weight.T  # [B, 1008]
        return {"pool": pool, "spatial": spatial, "logits": logits}


def _init_random(model: nn.Module) -> None:
    """Kaiming-normal convs (variance-preserving through ReLU, so a random network has
    activations of order 1 at every depth), BN at identity, small fc."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def build_inception(stock_pools: bool = False) -> InceptionFeatures:
    """A randomly initialised InceptionFeatures in eval mode (for tests and shapes)."""
    model = InceptionFeatures(stock_pools)
    _init_random(model)
    return model.eval()


def load_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> InceptionFeatures:
    """InceptionFeatures with the pytorch-fid weights from `path`: the file
    pt_inception-2015-12-05-6726825d.pth, or a folder holding it. Loaded with weights_only=True,
    strictly, except that `*.num_batches_tracked` may be absent (unused in eval)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found at {path!r}: expected the pytorch-fid file "
            f"{WEIGHTS_FILE} (~95 MB, FID Inception-v3 of the 2015-12-05 TF graph; pytorch-fid "
            "release v0.1.0 asset). Nothing is downloaded: copy it there or pass its path.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a flat state dict, got {type(state).__name__}")
    model = InceptionFeatures()
    want = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(state) - optional)
    unexpected = sorted(set(state) - set(want))
    bad_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(want[k])}"
                       for k in set(want) & set(state) if state[k].shape != want[k])
    if missing or unexpected or bad_shape:
        def head(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")

        raise ValueError(
            f"{path} does not match the FID Inception layout (torchvision Inception3 names, "
            f"1008 classes, expected file {WEIGHTS_FILE}): missing [{head(missing)}]; "
            f"unexpected [{head(unexpected)}]; shape mismatches [{head(bad_shape)}]")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= optional and not result.unexpected_keys
    model.requires_grad_(False)
    return model.to(device).eval()
