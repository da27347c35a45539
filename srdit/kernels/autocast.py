"""What autocast does to the GEMM after a fused op: the one rule the fused ops (rmsnorm.py,
sprint.py, mlp.py) and the teacher's fused norms (srdit/model/dinov2.py) follow to write their
output in the dtype the next GEMM reads, or to cast a GEMM's operands as F.linear would; and
the dtype of an op autocast runs in fp32 (rms_norm). No triton import: the model's eager path
uses it too.
"""
from __future__ import annotations

import torch


def autocast_gemm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a GEMM that reads x (bf16 under the training step's autocast),
    None outside autocast or for a dtype autocast leaves alone (fp64). Fused ops write their
    output in it, saving the cast pass autocast would make. Meta tensors (the host-sync test)
    are never under autocast: is_autocast_enabled raises for them. (Not
    torch.amp.is_autocast_available, which dynamo cannot trace on torch 2.11.)"""
    device_type = x.device.type
    if (device_type != "meta" and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return None


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM that reads x runs in: autocast's (autocast_gemm_dtype), else x's."""
    return autocast_gemm_dtype(x) or x.dtype


def fp32_op_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of an op that CUDA's autocast runs in fp32 (rms_norm, layer_norm) on x: fp32
    under autocast for an fp16/bf16/fp32 x, else x's. CUDA's policy, not the CPU's (whose
    autocast leaves rms_norm alone): the kernels run on CUDA, and the tests emulate its policy."""
    return torch.float32 if autocast_gemm_dtype(x) is not None else x.dtype


def gemm_operands(x: torch.Tensor, *tensors):
    """x and `tensors` (None stays None) in gemm_dtype(x): the casts autocast makes before a
    GEMM (F.linear's), made by a fused op that runs its GEMMs itself; autograd records them as
    it records autocast's."""
    dtype = gemm_dtype(x)
    return [None if t is None else t.to(dtype) for t in (x, *tensors)]
