"""Streamed .npz writing and reading (srdit.sample.npz) against numpy's own savez/load."""
import hashlib
import zipfile

import numpy as np
import pytest

from srdit.sample.npz import NpzRows, NpzWriter, read_arrays


def _write(path, images, labels, chunk):
    with NpzWriter(str(path)) as w:
        m = w.member("arr_0", images.shape, images.dtype)
        for i in range(0, len(images), chunk):
            m.write(images[i:i + chunk])
        m.close()
        w.add("arr_1", labels)
        w.add("settings", np.array('{"seed": 0}'))


def test_writer_output_loads_with_numpy_and_is_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    labels = np.arange(23, dtype=np.int64) % 7
    _write(tmp_path / "a.npz", images, labels, chunk=5)
    _write(tmp_path / "b.npz", images, labels, chunk=23)  # other chunking, other time: same bytes
    with np.load(tmp_path / "a.npz") as f:
        assert f.files == ["arr_0", "arr_1", "settings"]
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
        assert str(f["settings"]) == '{"seed": 0}'
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.npz", "b.npz")]
    assert digest[0] == digest[1]
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_writer_checks_rows(tmp_path):
    with NpzWriter(str(tmp_path / "x.npz")) as w:
        m = w.member("arr_0", (4, 2), np.uint8)
        with pytest.raises(ValueError, match="do not fit"):
            m.write(np.zeros((2, 3), np.uint8))
        m.write(np.zeros((3, 2), np.uint8))
        with pytest.raises(ValueError, match="more than the declared"):
            m.write(np.zeros((2, 2), np.uint8))
        with pytest.raises(ValueError, match="3 rows written, 4 declared"):
            m.close()


@pytest.mark.parametrize("compressed", [False, True])
def test_rows_stream_equals_np_load(tmp_path, compressed):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (17, 6, 6, 3), dtype=np.uint8)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, images, np.arange(17))
    with NpzRows(str(path), "arr_0") as rows:
        assert (rows.shape, rows.dtype, len(rows)) == ((17, 6, 6, 3), np.uint8, 17)
        batches = list(rows.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    with pytest.raises(KeyError, match="has no array 'mu'"):
        NpzRows(str(path), "mu")


def test_read_arrays_reads_whole_members_and_names_what_is_wrong(tmp_path):
    """Reading every byte is what makes zip check the CRC: a flipped byte in the data of a
    stored member passes np.load's opening and its header, and only the whole read tells."""
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    good = tmp_path / "good.npz"
    np.savez(good, images=images, labels=np.arange(6))
    arrays = read_arrays(str(good), ("images", "labels"))
    np.testing.assert_array_equal(arrays["images"], images)
    with pytest.raises(ValueError, match=r"good.npz has no array mu, sigma \(it has: images, labels\)"):
        read_arrays(str(good), ("images", "mu", "sigma"))
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(data)
    with pytest.raises(ValueError, match=r"flipped.npz is unreadable \(BadZipFile: Bad CRC-32 for file 'images.npy'\)"):
        read_arrays(str(tmp_path / "flipped.npz"), ("images",))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cut.npz is unreadable \(not a zip archive"):
        read_arrays(str(tmp_path / "cut.npz"), ("images",))
