"""The ADM centre crop against hand-worked sizes: BOX halvings while the short side >= 2r, a
BICUBIC resize of the short side to r (other side rounded), a centre crop rounding down."""
import numpy as np
import pytest
from PIL import Image

from srdit.data.crop import center_crop_dhariwal


def photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


@pytest.mark.parametrize("size, r, halvings, resized, top, left", [
    # 1100x700, r 256: 700 >= 512 -> 550x350; 350 < 512 stop; x 256/350: 550 -> round(402.29) = 402
    ((1100, 700), 256, [(550, 350)], (402, 256), 0, 73),
    # 2100x1500: -> 1050x750 -> 525x375; x 256/375: 525 -> round(358.4) = 358; left (358-256)//2 = 51
    ((2100, 1500), 256, [(1050, 750), (525, 375)], (358, 256), 0, 51),
    # portrait 50x90, r 64: upsampled x 1.28: 90 -> round(115.2) = 115; top (115-64)//2 = 25
    ((50, 90), 64, [], (64, 115), 25, 0),
    # short side exactly 2r halves (>=): 300x200, r 100 -> 150x100; scale 1; left 25
    ((300, 200), 100, [(150, 100)], (150, 100), 0, 25),
])
def test_crop_equals_the_hand_computation(size, r, halvings, resized, top, left):
    image = photo(*size)
    expected = image
    for half in halvings:
        expected = expected.resize(half, Image.BOX)
    expected = np.asarray(expected.resize(resized, Image.BICUBIC))[top:top + r, left:left + r]
    got = center_crop_dhariwal(image, r)
    assert got.shape == (r, r, 3) and got.dtype == np.uint8
    assert np.array_equal(got, expected)


def test_grayscale_becomes_rgb_and_an_exact_size_image_is_unchanged():
    gray = photo(80, 64).convert("L")
    out = center_crop_dhariwal(gray, 64)
    assert out.shape == (64, 64, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    square = photo(64, 64)
    assert np.array_equal(center_crop_dhariwal(square, 64), np.asarray(square))
