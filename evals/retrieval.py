"""Cross-modal retrieval: R@K and median rank of the true match, by three rules.

- cosine: between two modalities' unit vectors (every objective);
- volume: GRAM's own rule, the anchor modality against the others together,
  ranked by the volume of the parallelotope they span (smaller is better);
- leading vector: PMRL's own rule, a query vector against the leading left
  singular vector (the instance's anchor) of each candidate's other
  modalities, by cosine.
Each returns the metrics in both directions: anchor -> data and data -> anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses import gram_volumes


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of column i for row i of `scores` [N, N] (higher is better).

    Ties are counted against the query (a key scoring equal to the match ranks before it).
    """
    matched = scores.diagonal().unsqueeze(1)
    return (scores >= matched).sum(1)


def ranks_of_matches(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """1-based rank of keys[i] among all keys for queries[i] (cosine similarity)."""
    return ranks_from_scores(queries.float() @ keys.float().T)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.float().median())
    out["n"] = int(ranks.numel())
    out["chance_R@1"] = 1.0 / max(int(ranks.numel()), 1)  # a random ranking's R@1 over these n keys
    return out


def retrieval_metrics(queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    return metrics_from_ranks(ranks_of_matches(queries, keys), ks)


def volume_scores(anchor: torch.Tensor, others: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """[N, N] with [i, j] = -Vol(anchor_i, others_j...) (higher is better), in float64."""
    data = torch.stack([o.double() for o in others], 1)  # [N, K, D]
    available = torch.ones(data.shape[:2], dtype=torch.bool)
    return -gram_volumes(anchor.double(), data, available, eps)


def leading_vectors(columns: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the leading left singular vector of the stacked columns [N, D, K], signed
    so that it points along the columns' mean (PMRL's anchor of those modalities)."""
    z = torch.stack([c.double() for c in columns], 2)
    u = torch.linalg.svd(z, full_matrices=False).U[:, :, 0]
    sign = torch.sign((u * z.mean(2)).sum(1, keepdim=True))
    return u * torch.where(sign == 0, 1.0, sign)


def anchor_scores(query: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """[N, N] with [i, j] = query_i . u(others_j), u the leading vector of j's other modalities."""
    return F.normalize(query.double(), dim=1) @ leading_vectors(others).T


def joint_retrieval(scores: torch.Tensor, name: str, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Both directions of a joint rule: rows are anchors, columns the data tuples."""
    return {
        f"{name}:anchor->data": metrics_from_ranks(ranks_from_scores(scores), ks),
        f"{name}:data->anchor": metrics_from_ranks(ranks_from_scores(scores.T), ks),
    }
