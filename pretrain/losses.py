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


def _directional_ce_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_present: torch.Tensor,
    rows: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Sum over `rows` of cross-entropy of queries[i] against all keys, target i+offset.

    Keys of absent samples are masked out (they are zero vectors, not negatives).
    """
    logits = scale * queries @ keys.T
    logits = logits.masked_fill(~key_present.unsqueeze(0), float("-inf"))
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    ce = F.cross_entropy(logits[rows], targets[rows], reduction="sum")
    return ce


def pairwise_infonce(
    emb: dict[str, torch.Tensor],
    present: torch.Tensor,
    logit_scale: torch.Tensor,
    modalities: tuple[str, ...] | list[str],
) -> dict[str, torch.Tensor]:
    """Mean over modality pairs of symmetric InfoNCE.

    For a pair (a, b) the positives are the samples holding both; every sample
    holding b (on any rank) is a candidate column for an a-query, and vice
    versa. A pair that no sample of the global batch holds is left out of the
    mean (every rank agrees, since the counts are all-reduced).

    Returns {"loss": partial loss for backward, "loss/a-b": global term values,
    "loss_value": the global loss}.
    """
    world, batch = world_size(), present.shape[0]
    offset = rank() * batch
    gathered = {m: gather_rows(emb[m]) for m in modalities}
    gathered_present = gather_rows_nograd(present.to(torch.uint8)).bool()
    pairs = list(combinations(range(len(modalities)), 2))
    local_rows = [present[:, i] & present[:, j] for i, j in pairs]
    counts = all_reduce_sum(torch.stack([r.sum() for r in local_rows]).double())
    active = [k for k in range(len(pairs)) if counts[k] > 0]

    # Zero-weight use of every embedding keeps every tower in the backward
    # graph on every rank (ZeRO stages 2 and 3 reduce gradients per parameter).
    loss = sum(e.sum() for e in emb.values()) * 0.0 + logit_scale.sum() * 0.0
    partial_terms = torch.zeros(len(pairs), dtype=torch.float64, device=present.device)
    for k in active:
        i, j = pairs[k]
        a, b = modalities[i], modalities[j]
        rows = local_rows[k]
        ab = _directional_ce_sum(emb[a], gathered[b], gathered_present[:, j], rows, offset, logit_scale)
        ba = _directional_ce_sum(emb[b], gathered[a], gathered_present[:, i], rows, offset, logit_scale)
        term = 0.5 * (ab + ba) / counts[k].to(ab.dtype)
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
