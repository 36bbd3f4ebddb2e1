"""Alignment objectives over embeddings with negatives gathered from all ranks.

Convention shared by every objective here: each rank returns a partial
`loss` such that the mean of `loss` over ranks equals the objective on the
concatenated global batch, and so does the rank-averaged gradient (the
average DeepSpeed and DDP apply). Each rank scores only its own rows against
all gathered columns. Logged `terms` are already global values.
"""
from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from pretrain.distributed import all_reduce_sum, gather_rows, gather_rows_nograd, rank, world_size


def _directional_ce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_available: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Per-row cross-entropy [B] of queries[i] against all keys, target i+offset.

    Keys of samples without that modality are masked out (they are zero
    vectors, not negatives). Rows whose own key is masked come out inf/nan:
    callers select valid rows before reducing.
    """
    logits = scale * queries @ keys.T
    logits = logits.masked_fill(~key_available.unsqueeze(0), float("-inf"))
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, targets, reduction="none")


def pairwise_infonce(
    emb: dict[str, torch.Tensor],
    observed: torch.Tensor,
    logit_scale: torch.Tensor,
    modalities: tuple[str, ...] | list[str],
    *,
    available: torch.Tensor | None = None,
    imputed_pair_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Mean over modality pairs of symmetric InfoNCE on (possibly completed) tuples.

    `observed` [B, M] marks encoded modalities; `available` [B, M] (default:
    `observed`) also marks imputed ones. For a pair (a, b) a sample is a
    positive row when both sides are available and at least one is observed
    (a pair of two imputed vectors is skipped); a row with one imputed side
    has weight `imputed_pair_weight`. Every sample with b available, on any
    rank, is a candidate column for an a-query, and vice versa. A pair no
    sample of the global batch holds is left out of the mean (every rank
    agrees: the counts are all-reduced). A pair's term is the weighted mean
    of its rows' losses.

    Returns {"loss": partial loss for backward, "loss/a-b": global term values,
    "loss_value": the global loss}.
    """
    available = observed if available is None else available
    world, batch = world_size(), observed.shape[0]
    offset = rank() * batch
    gathered = {m: gather_rows(emb[m]) for m in modalities}
    gathered_available = gather_rows_nograd(available.to(torch.uint8)).bool()
    pairs = list(combinations(range(len(modalities)), 2))
    row_weights = []
    for i, j in pairs:
        both = available[:, i] & available[:, j] & (observed[:, i] | observed[:, j])
        full = observed[:, i] & observed[:, j]
        w = torch.where(full, 1.0, imputed_pair_weight) * both
        row_weights.append(w.to(torch.float64))
    totals = all_reduce_sum(torch.stack([w.sum() for w in row_weights]))
    active = [k for k in range(len(pairs)) if totals[k] > 0]

    # Zero-weight use of every embedding keeps every tower in the backward
    # graph on every rank (ZeRO stages 2 and 3 reduce gradients per parameter).
    loss = sum(e.sum() for e in emb.values()) * 0.0 + logit_scale.sum() * 0.0
    partial_terms = torch.zeros(len(pairs), dtype=torch.float64, device=observed.device)
    for k in active:
        i, j = pairs[k]
        a, b = modalities[i], modalities[j]
        weights = row_weights[k].to(emb[a].dtype)
        ab = _directional_ce(emb[a], gathered[b], gathered_available[:, j], offset, logit_scale)
        ba = _directional_ce(emb[b], gathered[a], gathered_available[:, i], offset, logit_scale)
        rows = weights > 0
        term = 0.5 * ((ab[rows] + ba[rows]) * weights[rows]).sum() / totals[k].to(ab.dtype)
        partial_terms[k] = term.detach().double()
        loss = loss + term * (world / len(active))
    global_terms = all_reduce_sum(partial_terms)
    out: dict[str, torch.Tensor] = {"loss": loss}
    for k, (i, j) in enumerate(pairs):
        if k in active:
            out[f"loss/{modalities[i]}-{modalities[j]}"] = global_terms[k].float()
    out["loss_value"] = (global_terms.sum() / max(len(active), 1)).float()
    return out


OBJECTIVES = {"pairwise": pairwise_infonce}
