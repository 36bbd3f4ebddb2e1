"""Process-group helpers: rank/world queries that also work without a group,
and a row gather that carries gradient back to the rank that owns each row."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank in rank order -> [world*B, ...].

    Differentiable: the backward pass sums, over all ranks, the gradient that
    reaches each gathered row and returns it to the rank that owns the row.
    Every rank must pass the same shape (the batch contract fixes B).
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherRows.apply(x)


class _GatherRows(torch.autograd.Function):
    """all_gather_single forward, reduce_scatter_single (sum) backward, both synchronous.

    Not `_functional_collectives.all_gather_tensor_autograd`: on gloo (torch
    2.13) its asynchronous backward corrupts the heap now and then
    ("malloc(): unaligned tcache chunk detected", SIGABRT or a segfault in
    pt_gloo_runloop; the peer then sees "Connection reset by peer"): 7 of 7
    runs of 3000 gather+backward steps crashed, against 0 of 7 for this
    (`python benchmarks/gather_stress.py --impl functional|calmrl`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


@torch.no_grad()
def gather_rows_nograd(x: torch.Tensor) -> torch.Tensor:
    """Same layout as `gather_rows`, without autograd (masks, labels)."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; a copy, the input is left alone."""
    out = x.detach().clone()
    if is_distributed() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class GlobalBatch:
    """The global batch as one rank's objective sees it: this rank's place in it,
    its rows gathered from every rank, and counts summed over ranks.

    The objectives (pretrain/losses.py) reach the other ranks only through this
    object; this default is the process group (or one process). A benchmark can
    stand one process in for many ranks by giving its own (benchmarks/bench_objectives.py)."""

    def rank(self) -> int:
        return rank()

    def world(self) -> int:
        return world_size()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_rows(x)

    def gather_nograd(self, x: torch.Tensor) -> torch.Tensor:
        return gather_rows_nograd(x)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x)


PROCESS_GROUP = GlobalBatch()
