"""ShardDataset refuses a directory that is not what its index says: checksum mismatch,
missing or unindexed shards, truncation, an unfinished preparation, labels out of range.
Each is one clear error naming the file."""
import os
import shutil

import pytest

from srdit.data import ShardDataset, ShardError
from srdit.data.shards import read_index, verify_checksums


@pytest.fixture
def copy(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)  # copy2 keeps mtimes, so the stat cache stays valid
    return out


def test_checksum_mismatch_is_an_error_naming_the_shard(copy):
    index = read_index(copy)
    assert verify_checksums(copy, index, "auto") == 0  # prepare's stat cache: nothing to hash
    assert verify_checksums(copy, index, "full") == 4
    path = copy / "shard-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern inside the last image, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors: sha256 [0-9a-f]{16}\.\.\. differs from index"):
        ShardDataset(copy)
    ShardDataset(copy, verify="size")  # sizes and headers only: opens


def test_a_shard_missing_from_the_directory_is_reported(copy):
    os.remove(copy / "shard-000003.safetensors")
    with pytest.raises(ShardError, match=r"1 shard\(s\) in index.json are missing: shard-000003\.safetensors"):
        ShardDataset(copy)


def test_a_shard_missing_from_the_index_is_reported(copy):
    shutil.copy(copy / "shard-000000.safetensors", copy / "shard-000009.safetensors")
    with pytest.raises(ShardError, match=r"shard file\(s\) are not in index.json: shard-000009\.safetensors"):
        ShardDataset(copy)


def test_truncated_shard_and_unfinished_directory(copy):
    path = copy / "shard-000002.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"shard-000002\.safetensors is [\d,]+ bytes, index.json says"):
        ShardDataset(copy)
    os.remove(copy / "index.json")
    with pytest.raises(ShardError, match="has no index.json: .* unfinished"):
        ShardDataset(copy)
    with pytest.raises(FileNotFoundError, match="not found"):
        ShardDataset(copy / "nowhere")


def test_labels_out_of_range_name_the_shard_and_sample(prepared):
    ShardDataset(prepared[0], num_classes=3)
    # samples: shard 0 = 4 of class 0, shard 1 = 3 of class 1, shard 2 = 1 of class 1 then class 2
    with pytest.raises(ShardError, match=r"shard-000002\.safetensors: sample 1 has label 2, outside \[0, 2\) "
                                         r"\(model.num_classes=2; the data has 3 classes, 4 such samples\)"):
        ShardDataset(prepared[0], num_classes=2)
    with pytest.raises(IndexError, match="sample 12 is out of range"):
        ShardDataset(prepared[0])[12]


def test_version_1_directories_are_read_and_newer_or_unknown_ones_refused(prepared_jpeg, tmp_path):
    """Version 1 (JPEG/PNG only, before format raw) reads as it is; an index from a newer srdit or
    with an unknown image format is one error naming the file."""
    import json

    out = tmp_path / "v1"
    shutil.copytree(prepared_jpeg[0], out)
    index = json.loads((out / "index.json").read_text())
    v1_image = {k: v for k, v in index["image"].items() if k != "exact"}  # what version 1 wrote

    def write(version, image):
        (out / "index.json").write_text(json.dumps({**index, "version": version, "image": image}))

    write(1, v1_image)
    ds = ShardDataset(out)
    assert ds.image_format == "jpeg" and not ds.exact_images and ds[0]["image"].shape == (3, 64, 64)
    write(3, v1_image)
    with pytest.raises(ShardError, match=r"not a srdit-shards index of version 1 or 2 \(format 'srdit-shards', version 3"):
        ShardDataset(out)
    write(2, {"format": "webp"})
    with pytest.raises(ShardError, match=r"index.json: unknown image format"):
        ShardDataset(out)
