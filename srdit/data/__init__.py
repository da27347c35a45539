"""srdit.data: the shard format and its reader `ShardDataset`, the ADM centre crop, the sample
order (`GlobalBatches`, order.py) and the loaders over it (loaders.py: `TorchBatches`,
`make_batches`; dali.py: `DaliBatches`, optional). These readers are a leaf of the package graph:
they import nothing of srdit but config and io. The preparation tool `python -m srdit.data.prepare`
sits above srdit.model (it runs the encoders) and is not imported here. DALI is imported only
when a DALI loader is built."""
from srdit.data.crop import center_crop_dhariwal
from srdit.data.dali import DaliBatches
from srdit.data.loaders import TorchBatches, dali_available, make_batches
from srdit.data.order import GlobalBatches
from srdit.data.shards import ShardDataset, ShardError

__all__ = ["DaliBatches", "GlobalBatches", "ShardDataset", "ShardError", "TorchBatches", "center_crop_dhariwal",
           "dali_available", "make_batches"]
