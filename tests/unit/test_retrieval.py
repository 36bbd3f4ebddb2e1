"""Retrieval metrics against a brute-force reference on random embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evals.retrieval import retrieval_metrics


def brute_force(q: torch.Tensor, k: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    ranks = []
    for i in range(q.shape[0]):
        scores = [float(q[i] @ k[j]) for j in range(k.shape[0])]
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j != i))  # ties count against the query
        ranks.append(order.index(i) + 1)
    ranks_t = torch.tensor(ranks, dtype=torch.float)
    out = {f"R@{x}": float((ranks_t <= x).float().mean()) for x in ks}
    out["median_rank"] = float(ranks_t.median())
    return out


def test_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    queries = F.normalize(keys + 0.8 * torch.randn(60, 8, generator=g), dim=1)
    got, ref = retrieval_metrics(queries, keys), brute_force(queries, keys)
    for name, value in ref.items():
        assert abs(got[name] - value) < 1e-9, name
    assert 0 < got["R@1"] < 1  # neither trivial nor hopeless


def test_perfect_embeddings_score_one():
    keys = F.normalize(torch.randn(20, 16), dim=1)
    m = retrieval_metrics(keys, keys)
    assert m["R@1"] == 1.0 and m["median_rank"] == 1.0
