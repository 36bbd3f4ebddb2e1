"""Cross-modal retrieval metrics: R@K and median rank of the true match."""

from __future__ import annotations

import torch


def ranks_of_matches(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """1-based rank of keys[i] among all keys for queries[i] (cosine similarity).

    Ties are counted against the query (a key scoring equal to the match ranks before it).
    """
    sims = queries.float() @ keys.float().T
    matched = sims.diagonal().unsqueeze(1)
    return (sims >= matched).sum(1)


def retrieval_metrics(queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    ranks = ranks_of_matches(queries, keys)
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.float().median())
    out["n"] = int(ranks.numel())
    return out
