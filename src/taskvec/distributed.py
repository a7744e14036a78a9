"""Data-parallel training under ``torchrun``: DDP semantics for :func:`taskvec.train.fit`, no wrapper.

Why not ``DistributedDataParallel``: ``fit`` trains whatever requires grad in any module (a composer's
coefficients, adapters, a whole network), and the trainable tensors of coefficient learning are tiny,
so one coalesced all-reduce of the gradients per step is all DDP would do for them. Inside an
initialised process group (``torchrun --nproc_per_node N ...`` then ``init()``), ``fit``:

* broadcasts the trainable parameters from rank 0 once, so every rank starts from the same state;
* gives each rank its own shard of every batch (see :func:`shard`);
* averages the gradients across ranks after every backward pass (:func:`average_gradients`), so N
  ranks on equal shards take exactly the step one process takes on the union batch;
* writes checkpoints on rank 0 only (:func:`is_writer`); every rank can read them to resume.

Outside a process group every function here is a no-op, so single-process code is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "active", "all_mean", "average_gradients", "broadcast_parameters", "init", "is_writer", "rank", "set_epoch",
    "shard", "shard_batch", "world_size",
]


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes files (checkpoints, records, reports): rank 0, or no process group."""
    return rank() == 0


def init(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment; False when not launched by it.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. Each rank then uses the GPU of its
    ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def broadcast_parameters(params: Iterable[Tensor]) -> None:
    """Copy rank 0's values into every rank's parameters (what DDP does when it wraps a model)."""
    if not active():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def average_gradients(params: Iterable[Tensor]) -> None:
    """Replace every gradient by its mean over ranks, in one all-reduce of a flat buffer.

    A parameter without a gradient on this rank counts as a zero gradient there, so all ranks agree on
    the buffer layout; one that has no gradient on any rank keeps ``None`` (the optimiser skips it, as
    it would in one process).
    """
    if not active():
        return
    params = list(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=grads[0].device)
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    present = flat[-len(params):] > 0
    flat /= world_size()
    offset = 0
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        numel = grad.numel()
        value = flat[offset : offset + numel].view_as(grad).to(grad.dtype)
        offset += numel
        if not present[i]:
            continue
        if param.grad is None:
            param.grad = value.clone()
        else:
            param.grad.copy_(value)


def all_mean(value: float) -> float:
    """Mean of a Python number over ranks (for logged losses)."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / world_size()


def shard_batch(batch: Any, index: int | None = None, count: int | None = None) -> Any:
    """This rank's slice (along dim 0) of every tensor in ``batch`` (tuples, lists, dicts nest).

    Rank r of N takes ``torch.tensor_split(t, N)[r]``: with a batch size divisible by N, the shards are
    equal and the averaged gradient is exactly the union batch's.
    """
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            return batch
        if batch.shape[0] < count:
            raise ValueError(f"a batch of {batch.shape[0]} cannot be split over {count} ranks")
        return torch.tensor_split(batch, count)[index]
    if isinstance(batch, dict):
        return {key: shard_batch(value, index, count) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(value, index, count) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(shard_batch(value, index, count) for value in batch)
    return batch


def _distributed_sampler(loader: object) -> Any:
    """The DistributedSampler behind a torch DataLoader, if any."""
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def set_epoch(loader: object, epoch: int) -> None:
    """Reshuffle a DataLoader's DistributedSampler for ``epoch``; call before iterating the epoch."""
    sampler = _distributed_sampler(loader) if active() else None
    if sampler is not None:
        sampler.set_epoch(epoch)


def shard(batches: Iterable[Any], loader: object = None) -> Iterator[Any]:
    """The batches this rank trains on.

    A loader that yields the same batches on every rank (taskvec's :class:`~taskvec.train.Loader`, whose
    epochs are seeded identically everywhere, or any plain iterable) is split batch by batch with
    :func:`shard_batch`. A torch ``DataLoader`` whose sampler is a ``DistributedSampler`` already yields
    this rank's share: its batches pass through whole (call :func:`set_epoch` before each epoch).
    """
    if not active():
        yield from batches
        return
    if _distributed_sampler(loader) is not None:
        yield from batches
        return
    for batch in batches:
        yield shard_batch(batch)
