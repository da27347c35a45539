"""srdit.data: ImageNet preparation (`python -m srdit.data.prepare`), the shard format and its
reader `ShardDataset`, the ADM centre crop, and the loaders: `GlobalBatches` (in-process),
`TorchBatches` (DataLoader workers), `DaliBatches` (DALI, optional), `make_batches` (picks one).
DALI is imported only when a DALI loader is built."""
from srdit.data.batches import TorchBatches, dali_available, make_batches
from srdit.data.crop import center_crop_dhariwal
from srdit.data.dali import DaliBatches
from srdit.data.loader import GlobalBatches
from srdit.data.shards import ShardDataset, ShardError

__all__ = ["DaliBatches", "GlobalBatches", "ShardDataset", "ShardError", "TorchBatches", "center_crop_dhariwal",
           "dali_available", "make_batches"]
