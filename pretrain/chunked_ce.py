"""Per-row cross-entropy over masked columns, whole or in column chunks.

Every objective here ends in the same shape of computation: for each local
row i, logits against every gathered column, columns of samples without the
key masked out, and a cross-entropy with target column i + offset. The logits
come from a function `logits_fn(queries, keys, scale, columns)` of the local
queries [P, ...], a slice of the keys [C, ...] (the columns `columns` of the
gathered tensor) and the logit scale: a matrix product for InfoNCE, Gram
volumes for GRAM.

`masked_ce(..., chunk=0)` builds the whole [P, N] logits under autograd.
With `chunk` > 0 it walks the columns `chunk` at a time and keeps, per row,
only a running log-sum-exp, the target logit and (for label smoothing) the
sum of the available logits; the backward pass recomputes each chunk's logits
and pushes the softmax gradient through `logits_fn` chunk by chunk. Memory is
then O(P x chunk) for the logits and every intermediate of `logits_fn`,
whatever N, at the price of computing the logits twice. Values and gradients
equal the whole computation's (tests/unit/test_chunked_ce.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]


def ce_from_logits(
    logits: torch.Tensor, key_available: torch.Tensor, offset: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-row cross-entropy [P] of logits [P, N] with target column i + offset.

    Columns not in `key_available` [N] are masked out (not negatives); rows
    whose own column is masked come out inf/nan: callers select valid rows
    (with `torch.where`, never by indexing: no data-dependent shapes). With
    `label_smoothing` e the target puts 1 - e on column i + offset and e spread
    evenly over the available columns (torch's rule, over the columns that
    exist rather than over padding).
    """
    logits = logits.masked_fill(~key_available.unsqueeze(0), float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device) + offset
    nll = F.cross_entropy(logits, targets, reduction="none")
    if not label_smoothing:
        return nll
    log_probs = torch.log_softmax(logits, dim=1).masked_fill(~key_available.unsqueeze(0), 0.0)
    uniform = -log_probs.sum(1) / key_available.sum().clamp_min(1).to(logits.dtype)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def masked_ce(
    logits_fn: LogitsFn,
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor,
    key_available: torch.Tensor,
    offset: int,
    *,
    label_smoothing: float = 0.0,
    chunk: int = 0,
) -> torch.Tensor:
    """Per-row cross-entropy [P] of `logits_fn(queries, keys, scale, all columns)` (see
    `ce_from_logits`); with 0 < `chunk` < N, computed `chunk` columns at a time with
    recomputation in backward (the module docstring)."""
    columns = keys.shape[0]
    if chunk <= 0 or chunk >= columns:
        return ce_from_logits(
            logits_fn(queries, keys, scale, slice(0, columns)), key_available, offset, label_smoothing
        )
    out: torch.Tensor = _ChunkedCE.apply(logits_fn, chunk, key_available, offset, label_smoothing, queries, keys, scale)
    return out


def _chunks(columns: int, chunk: int) -> list[slice]:
    return [slice(start, min(columns, start + chunk)) for start in range(0, columns, chunk)]


class _ChunkedCE(torch.autograd.Function):
    """The chunked forward and recomputing backward of `masked_ce`.

    Forward keeps per row the log-sum-exp over available columns, the target
    logit and the sum of available logits; all in fp32 at least. Backward: for
    each chunk, d loss_i / d logit_ij = p_ij - (1 - e) [j = target_i] - e / n
    (p = softmax over available columns, n = number of available columns),
    0 on masked columns, times the incoming row gradient; then autograd through
    `logits_fn` on that chunk alone.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits_fn: LogitsFn,
        chunk: int,
        key_available: torch.Tensor,
        offset: int,
        label_smoothing: float,
        queries: torch.Tensor,
        keys: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        rows, columns = queries.shape[0], keys.shape[0]
        targets = torch.arange(rows, device=queries.device) + offset
        lse_parts, target_parts, sum_parts = [], [], []
        out_dtype = queries.dtype
        for cols in _chunks(columns, chunk):
            logits = logits_fn(queries, keys[cols], scale, cols)
            out_dtype = logits.dtype
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            avail = key_available[cols].unsqueeze(0)
            logits = logits.masked_fill(~avail, float("-inf"))
            lse_parts.append(torch.logsumexp(logits, 1))
            local = targets - cols.start
            inside = (local >= 0) & (local < logits.shape[1])
            picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
            target_parts.append(torch.where(inside, picked, 0.0))  # each target lies in one chunk
            if label_smoothing:
                sum_parts.append(logits.masked_fill(~avail, 0.0).sum(1))
        lse = torch.logsumexp(torch.stack(lse_parts, 1), 1)
        loss = lse - torch.stack(target_parts, 1).sum(1)
        if label_smoothing:
            n_available = key_available.sum().clamp_min(1).to(lse.dtype)
            uniform = lse - torch.stack(sum_parts, 1).sum(1) / n_available
            loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
        ctx.save_for_backward(queries, keys, scale, key_available, lse)
        ctx.logits_fn, ctx.chunk, ctx.offset, ctx.label_smoothing = logits_fn, chunk, offset, label_smoothing
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        queries, keys, scale, key_available, lse = ctx.saved_tensors
        e = ctx.label_smoothing
        rows, columns = queries.shape[0], keys.shape[0]
        targets = torch.arange(rows, device=queries.device) + ctx.offset
        finite = torch.isfinite(lse)
        row_grad = torch.where(finite, grad.to(lse.dtype), 0.0).unsqueeze(1)
        lse = torch.where(finite, lse, 0.0).unsqueeze(1)
        n_available = key_available.sum().clamp_min(1).to(lse.dtype)
        q = queries.detach().requires_grad_(queries.requires_grad)
        s = scale.detach().requires_grad_(scale.requires_grad)

        # Accumulated over chunks in fp32 at least (bf16 sums would lose a bit per chunk).
        def buffer(t: torch.Tensor) -> torch.Tensor | None:
            return torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) if t.requires_grad else None

        grad_q, grad_k, grad_s = buffer(queries), buffer(keys), buffer(scale)
        for cols in _chunks(columns, ctx.chunk):
            k = keys[cols].detach().requires_grad_(keys.requires_grad)
            with torch.enable_grad():
                logits = ctx.logits_fn(q, k, s, cols)
            avail = key_available[cols].unsqueeze(0)
            with torch.no_grad():
                g = torch.exp(logits.to(lse.dtype).masked_fill(~avail, float("-inf")) - lse)
                local = targets - cols.start
                # the target column as a comparison, not one_hot (which checks its range on the host)
                onehot = local.unsqueeze(1) == torch.arange(g.shape[1], device=g.device).unsqueeze(0)
                g = g - (1.0 - e) * onehot.to(g.dtype)
                if e:
                    g = g - e / n_available
                g = g.masked_fill(~avail, 0.0) * row_grad
            inputs = [t for t in (q, k, s) if t.requires_grad]
            if not inputs:
                continue
            grads = iter(torch.autograd.grad(logits, inputs, g.to(logits.dtype), allow_unused=True))
            if grad_q is not None:
                piece = next(grads)
                if piece is not None:
                    grad_q += piece
            if grad_k is not None:
                piece = next(grads)
                if piece is not None:
                    grad_k[cols] = piece
            if grad_s is not None:
                piece = next(grads)
                if piece is not None:
                    grad_s += piece

        def cast(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
            return None if g is None else g.to(like.dtype)

        return None, None, None, None, None, cast(grad_q, queries), cast(grad_k, keys), cast(grad_s, scale)
