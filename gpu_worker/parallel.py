"""Tensor parallelism: this process's rank in its worker group, and the group's collectives.

One worker group serves one model replica; its `tensor_parallel_size` ranks are separate
processes (`pagoda worker --rank N`), each on its own GPU, joined by torch.distributed (NCCL
on GPUs, gloo on the CPU) through `--distributed-init-method`. The layers read the rank and
size when they are built (Megatron-LM's split, as vLLM does): column-parallel projections
keep a slice of the output rows, row-parallel ones a slice of the input columns and sum the
partial products with an all-reduce, the embedding and LM head keep a slice of the
vocabulary. With one rank every collective is the identity and torch.distributed is never
initialised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1


_state = TensorParallel()
# all_gather_into_tensor's newer name (torch 2.13 warns on the old one; older ones lack the new).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tp() -> TensorParallel:
    """This process's rank and group size (0 and 1 until `init_tensor_parallel`)."""
    return _state


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """Join the worker group's process group (blocks until every rank has joined).

    `timeout_s` bounds every collective: a rank whose peer died mid-step fails instead of
    waiting forever, and exits, so that its worker group restarts (docs/ARCHITECTURE.md, Faults).
    """
    global _state
    if size > 1 and not dist.is_initialized():  # (a second runner in one process: tests)
        if not init_method:
            raise ValueError("tensor_parallel_size > 1 needs distributed_init_method (tcp://HOST:PORT of rank 0)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
        logger.info("rank %d of %d joined its worker group (%s, %s)", rank, size, backend, init_method)
    _state = TensorParallel(rank, size)


def group_init_method(init_method: str, group: int) -> str:
    """Worker group G meets at the port of `init_method` plus G (each group is a process group
    of its own: its rank 0 hosts it)."""
    if group == 0 or not init_method:
        return init_method
    head, _, port = init_method.rpartition(":")
    return f"{head}:{int(port) + group}"


def set_tensor_parallel(rank: int, size: int) -> None:
    """The rank and size the layers are built for, without a process group (tests that build
    one rank's modules to inspect their shapes)."""
    global _state
    _state = TensorParallel(rank, size)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (captured in CUDA graphs like any NCCL call)."""
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., size * n], rank r's part at [r n, (r + 1) n)."""
    if _state.size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((_state.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x)  # the ranks' tensors end to end along dim 0
    return out.view(_state.size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], _state.size * x.shape[-1])


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of `value` over the ranks (the KV pool's size: every rank must hold the same)."""
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(size: int, what: str) -> int:
    """`size` / ranks, which must divide evenly (the heads, the MLP width)."""
    if size % _state.size:
        raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size {_state.size}")
    return size // _state.size
