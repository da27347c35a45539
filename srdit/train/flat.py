"""One buffer for all weights and one for all gradients.

Flat parameters (flatten_parameters): every parameter is a view of one contiguous buffer, so an
update of all weights at once (the EMA, a sharded optimizer) is one kernel over one tensor, not a
launch per parameter.

Flat gradients (FlatGradients): every trainable parameter's `.grad` is a fixed view of one fp32
buffer laid out exactly like the flat parameters (same offsets, same gaps). Zeroing is one fill,
autograd accumulates into the views in place (AccumulateGrad adds into a `.grad` that exists), the
clip norm is one reduction, and a gradient chunk is a contiguous slice that one collective can
reduce with no copy into a bucket (srdit.train.reduce). The addresses never change, which is
what a captured CUDA graph needs.

The layout follows the order autograd finishes the gradients (gradient_ready_order, measured on
a two-sample step of a copy of the model on the meta device): the buffer then fills from its
start during backward, so its leading chunks can be reduced while the rest of the backward runs.
In parameters() order they would not: the REG token's projection and norm are registered late
but get their gradients last, and would hold back the chunk of the output layers, whose
gradients come first.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from srdit.model import build_model
from srdit.train.inputs import synthetic_batch
from srdit.train.loss import diffusion_loss, draw_step_noise

FLAT_ALIGN_BYTES = 256  # what CUDA's allocator gives a tensor of its own


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _aligned(offset: int, element_size: int) -> int:
    return round_up(offset, max(1, FLAT_ALIGN_BYTES // element_size))


def flatten_parameters(module: nn.Module, order: list[int] | None = None, multiple: int = 1,
                       frozen_apart: bool = False) -> nn.Module:
    """Every parameter of `module` becomes a view of one contiguous buffer, values unchanged (in
    place: optimizers and hooks keep the same Parameter objects), laid out in `order` (indices
    into parameters(); default parameters() order), the buffer's length padded with zeros to a
    multiple of `multiple` elements (equal shards for several ranks). frozen_apart: the
    parameters that need no gradient go after all the others (in `order` among themselves),
    starting at a multiple of `multiple`: the trainable ones then fill a region of their own,
    which ranks can split into equal pieces that hold trainable weights only (ShardLayout). Each
    view starts 256 bytes aligned, as a tensor of its own would: the alignment that Triton
    specialises on and vectorised GEMM loads want does not change with the model's size (the gaps
    are zeros and stay zeros). Call it before the EMA and the optimizers are made. Parameters of
    several dtypes or devices are left as they are; already flat parameters too."""
    params = list(module.parameters())
    if not params or len({(p.dtype, p.device) for p in params}) > 1 or flat_view(params) is not None:
        return module
    order = list(range(len(params))) if order is None else list(order)
    if sorted(order) != list(range(len(params))):
        raise ValueError(f"a parameter order must list each of the {len(params)} parameters once")
    opens_region = None  # the first frozen parameter, with frozen_apart
    if frozen_apart:
        frozen = [i for i in order if not params[i].requires_grad]
        order = [i for i in order if params[i].requires_grad] + frozen
        opens_region = frozen[0] if frozen else None
    size = params[0].element_size()
    offsets, end = {}, 0
    for i in order:
        if i == opens_region:
            end = round_up(end, multiple)
        offsets[i] = _aligned(end, size)
        end = offsets[i] + params[i].numel()
    _place(params, [offsets[i] for i in range(len(params))], round_up(end, multiple))
    return module


def flatten_like(module: nn.Module, source: nn.Module) -> nn.Module:
    """`module`'s parameters (a copy of `source`'s: the same shapes, in the same order) become
    views of one buffer laid out exactly as `source`'s flat parameters are: the same offsets and
    length, so the two buffers correspond element for element (the EMA's copy of the model)."""
    params, theirs = list(module.parameters()), list(source.parameters())
    buffer = flat_buffer(source)
    if buffer is None or [p.shape for p in params] != [p.shape for p in theirs]:
        raise ValueError("flatten_like needs a flat source with the same parameters")
    _place(params, [p.storage_offset() for p in theirs], buffer.numel())
    return module


def _place(params: list[torch.Tensor], offsets: list[int], length: int) -> None:
    flat = torch.zeros(length, dtype=params[0].dtype, device=params[0].device)
    for p, offset in zip(params, offsets):
        view = flat[offset: offset + p.numel()].view_as(p)
        view.copy_(p.detach())
        p.data = view


def flat_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D tensor over `tensors` when they lie in one storage, each contiguous and 256-byte
    aligned, none overlapping another (in any order, with zeros between them where
    flatten_parameters puts gaps), else None. Its elements are in storage order, from the first
    tensor's start to the last one's end."""
    if not tensors:
        return None
    first = tensors[0]
    if any(t.dtype != first.dtype or not t.is_contiguous()
           or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors):
        return None
    ordered = sorted(tensors, key=lambda t: t.storage_offset())
    start = end = ordered[0].storage_offset()
    for t in ordered:
        at = t.storage_offset()
        if at < end or at != start + _aligned(at - start, t.element_size()):
            return None
        end = at + t.numel()
    return first.detach().as_strided((end - start,), (1,), start)


def flat_buffer(module: nn.Module) -> torch.Tensor | None:
    """The whole buffer `module`'s flat parameters are views of, its padding included (1-D);
    None when they are not flat."""
    params = list(module.parameters())
    if flat_view(params) is None:
        return None
    first = params[0].detach()
    return first.as_strided((first.untyped_storage().nbytes() // first.element_size(),), (1,), 0)


def span(p: torch.Tensor) -> tuple[int, int]:
    """[start, end) of a flat parameter in its buffer (flat_buffer starts at the storage's first
    element), which is also where its gradient, its moments and its average lie in theirs."""
    return p.storage_offset(), p.storage_offset() + p.numel()


def same_layout(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """True when two lists of flat tensors sit at the same offsets of their buffers, so their flat
    views correspond element for element (the model and its EMA copy, made by deepcopy)."""
    def offsets(ts):
        base = min(t.storage_offset() for t in ts)
        return [t.storage_offset() - base for t in ts]

    return len(a) == len(b) and offsets(a) == offsets(b)


def gradient_ready_order(model: nn.Module, loss_fn) -> list[int]:
    """Indices into model.parameters() in the order autograd finishes their gradients, measured
    on one backward of `loss_fn(model)` (a scalar). The order is the graph's, not the data's: any
    inputs of the right shapes give it. Parameters that got no gradient come last, in
    parameters() order. Gradients and the global RNG states are left as they were."""
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    order: list[int] = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: order.append(index[id(p)]))
             for p in params if p.requires_grad]
    saved = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            for p in params:
                p.grad = None
            loss_fn(model).backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, g in zip(params, saved):
            p.grad = g
    seen = set(order)
    return order + [i for i in range(len(params)) if i not in seen]


class FlatGradients:
    """The fp32 gradients of `model`'s trainable parameters as views of one buffer laid out like
    its flat parameters (flatten_parameters first). Frozen parameters keep `.grad` None; their
    part of the buffer stays zero."""

    def __init__(self, model: nn.Module):
        params = list(model.parameters())
        flat = flat_buffer(model)
        if flat is None:
            raise ValueError("flat gradients need flat parameters: call srdit.train.flat.flatten_parameters first")
        self.buffer = torch.zeros_like(flat)
        self.params = [p for p in params if p.requires_grad]
        # the trainable parameters' extent, without the padding to equal shards or the frozen
        # region: a norm over it does not depend on the number of ranks, and nothing past it is
        # ever anything but zero
        self.used = max((span(p)[1] for p in self.params), default=0)
        for p in self.params:
            p.grad = self.view_of(p)

    def view_of(self, p: torch.Tensor) -> torch.Tensor:
        return self.buffer[slice(*span(p))].view_as(p)

    def zero(self) -> None:
        self.buffer.zero_()

    def norm(self) -> torch.Tensor:
        """The global 2-norm of every gradient: one reduction (the gaps are zeros)."""
        return torch.linalg.vector_norm(self.buffer[:self.used])


def probe_loss(cfg, device):
    """loss_fn(model) for gradient_ready_order: the training loss of a two-sample step on random
    inputs of the real shapes (cached teacher targets: the order is the student's), routed."""
    m = cfg.model

    def loss(model):
        g = None if torch.device(device).type == "meta" else torch.Generator(device).manual_seed(0)
        batch = synthetic_batch(cfg, 2, device, cached=True, generator=g)
        noise = draw_step_noise(2, (m.in_channels, m.input_size, m.input_size), m, cfg.train, generator=g,
                                host_generator=torch.Generator().manual_seed(0), device=device)
        noise = dataclasses.replace(noise, path_drop=False)  # the common branch's order
        total, _ = diffusion_loss(model, batch["latent"], batch["label"], batch["teacher"].float(), noise.rows(0, 2),
                                  cfg.train, kernels=m.kernels)
        return total

    return loss


def training_order(cfg) -> list[int]:
    """gradient_ready_order of cfg's model, measured on a copy of it on the meta device: shapes
    and autograd's order without memory, arithmetic or timing (attention_backend=auto is not
    resolved here), and the same on every rank."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(cfg).to("meta")  # .to: the buffers made from numpy arrive on the CPU
    return gradient_ready_order(model, probe_loss(cfg, torch.device("meta")))


ALIGN = FLAT_ALIGN_BYTES // 4  # fp32 elements: each rank's piece of a chunk starts aligned


def flatten_for_training(model: nn.Module, cfg, world: int = 1) -> nn.Module:
    """flatten_parameters in gradient-ready order (see the module's docstring), padded so that
    `world` ranks get equal aligned pieces: what srdit.train and build_step lay a fresh model out
    as, before its EMA and optimizers are made. The frozen parameters (pos_embed) lie apart, after
    the trainable ones: the pieces the ranks update then hold trainable weights only, an equal
    share each. The trainable parameters' offsets do not depend on `world`."""
    if flat_view(list(model.parameters())) is not None:
        return model
    return flatten_parameters(model, training_order(cfg), multiple=world * ALIGN, frozen_apart=True)


def chunk_bounds(spans: list[tuple[int, int]], total: int, chunks: int, multiple: int = 1) -> list[int]:
    """Chunk boundaries [0, b1, ..., total] over a buffer of `total` elements: near equal sizes,
    each cut where a parameter's span ends (`spans`: their [start, end)), rounded to a multiple of
    `multiple` (so that each rank's piece of a chunk is whole and aligned; `total` is one). Fewer
    chunks when there are fewer parameters."""
    ends = sorted(end for _, end in spans)
    bounds = [0]
    for k in range(1, chunks):
        target = total * k // chunks
        cut = min(ends, key=lambda e: abs(e - target), default=total)
        cut = round(cut / multiple) * multiple
        if bounds[-1] < cut < total:
            bounds.append(cut)
    bounds.append(total)
    return bounds


class ShardLayout:
    """How `world` ranks split the flat buffers of `model` (flatten_for_training(..., world)):
    the trainable region is cut into CHUNKS contiguous chunks (chunk_bounds), each cut into
    `world` equal pieces; rank r owns the r-th piece of every chunk. One layout serves the
    gradients (reduce-scatter: each rank gets the sum of its pieces), the optimizer and the EMA
    (each rank updates its pieces) and the weights (all-gather: the pieces back into every rank's
    chunks). The frozen region after it (flatten_parameters' frozen_apart: pos_embed), `tail`, is
    cut into `world` pieces too, for the EMA only: it gets no gradient and no update, and its
    weights never change, so they are never gathered. Frozen parameters among the trainable ones
    (a model flattened otherwise) stay in the chunks, and the optimizer's runs skip them."""

    def __init__(self, model: nn.Module, rank: int, world: int, chunks: int):
        params = list(model.parameters())
        buffer = flat_buffer(model)
        if buffer is None or (world > 1 and buffer.numel() % (world * ALIGN)):
            raise ValueError(f"sharding over {world} ranks needs flat parameters padded for them "
                             "(srdit.train.flat.flatten_for_training(model, cfg, world))")
        spans = [span(p) for p in params]
        trainable = [s for s, p in zip(spans, params) if p.requires_grad]
        self.rank, self.world = rank, world
        self.total = buffer.numel()
        self.frozen = sorted(s for s, p in zip(spans, params) if not p.requires_grad)
        self.end = self.total  # of the chunks: the frozen region starts there when it lies apart
        if self.frozen and trainable:
            apart = self.frozen[0][0] // (world * ALIGN) * (world * ALIGN)
            if max(e for _, e in trainable) <= apart:
                self.end = apart
        self.tail = (self.end, self.total) if self.end < self.total else None
        self.bounds = chunk_bounds(trainable, self.end, chunks, world * ALIGN)

    @classmethod
    def whole(cls, model: nn.Module) -> "ShardLayout":
        """One rank's layout: each chunk (and the tail) is its one piece (the unsharded update)."""
        return cls(model, 0, 1, 1)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds, self.bounds[1:]))

    def piece(self, k: int, rank: int | None = None) -> tuple[int, int]:
        """[start, end) of this rank's (or `rank`'s) piece of chunk k, in the flat buffer."""
        return self._piece(*self.chunks[k], self.rank if rank is None else rank)

    def _piece(self, a: int, b: int, rank: int) -> tuple[int, int]:
        size = (b - a) // self.world
        return a + rank * size, a + (rank + 1) * size

    def pieces(self, buffer: torch.Tensor, tail: bool = False) -> list[torch.Tensor]:
        """This rank's piece of every chunk of a flat buffer, as views; with `tail`, its piece of
        the frozen region too (the EMA's). Pieces that meet are one view (one rank's: the whole
        buffer, one tensor for a foreach op)."""
        spans = [mine for _, mine in self.gathers(tail)]
        merged = [list(spans[0])]
        for a, b in spans[1:]:
            if a == merged[-1][1]:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        return [buffer[a:b] for a, b in merged]

    def gathers(self, tail: bool = False) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(whole, this rank's piece) spans of every chunk (and with `tail`, of the frozen
        region): what an all-gather of the pieces fills."""
        out = [((a, b), self.piece(k)) for k, (a, b) in enumerate(self.chunks)]
        if tail and self.tail is not None:
            out.append((self.tail, self._piece(*self.tail, self.rank)))
        return out

    @property
    def shard_size(self) -> int:
        """Elements of this rank's pieces of the chunks (the reduced gradients it holds)."""
        return self.end // self.world

    def compact_offsets(self, rank: int | None = None) -> list[int]:
        """Where each piece starts in a compact buffer of this rank's pieces only (the reduced
        gradients: shard_size elements)."""
        offsets, at = [], 0
        for k in range(len(self.chunks)):
            offsets.append(at)
            start, end = self.piece(k, rank)
            at += end - start
        return offsets

    def trainable_runs(self) -> list[tuple[int, int, int]]:
        """(start, end, compact start) of the runs of this rank's pieces that hold no frozen
        parameter: what the optimizer updates (weight decay must not touch a frozen weight)."""
        runs = []
        for k, compact in enumerate(self.compact_offsets()):
            start, end = self.piece(k)
            at = start
            for f0, f1 in self.frozen:
                if f1 <= at or f0 >= end:
                    continue
                if f0 > at:
                    runs.append((at, f0, compact + at - start))
                at = max(at, f1)
            if at < end:
                runs.append((at, end, compact + at - start))
        return runs
