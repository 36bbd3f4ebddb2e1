"""Retrieval metrics against a brute-force reference on random embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evals.retrieval import retrieval_metrics


def brute_force(q: torch.Tensor, k: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    ranks: list[float] = []
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
    assert m["n"] == 20 and m["chance_R@1"] == 1 / 20  # every table shows n and chance beside the metric


def _brute_ranks(score) -> list[float]:
    """Rank of the true match per query, from a score function score(i, j), higher better."""
    n = 30
    ranks: list[float] = []
    for i in range(n):
        scores = [score(i, j) for j in range(n)]
        order = sorted(range(n), key=lambda j: (-scores[j], j != i))
        ranks.append(order.index(i) + 1)
    return ranks


def _triples(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(30, 8, generator=g)
    return [F.normalize(shared + 0.9 * torch.randn(30, 8, generator=g), dim=1) for _ in range(3)]


def test_volume_rule_matches_brute_force():
    from evals.retrieval import joint_retrieval, volume_scores

    text, image, audio = _triples()

    def volume(i, j):  # sqrt(det G) of [t_i, x_j, y_j], straight from its definition
        z = torch.stack([text[i], image[j], audio[j]]).double()
        return -float(torch.det(z @ z.T).clamp_min(1e-6).sqrt())

    got = joint_retrieval(volume_scores(text, [image, audio]), "volume")
    forward = torch.tensor(_brute_ranks(volume), dtype=torch.float)
    backward = torch.tensor(_brute_ranks(lambda i, j: volume(j, i)), dtype=torch.float)
    assert got["volume:anchor->data"]["R@1"] == float((forward <= 1).float().mean())
    assert got["volume:anchor->data"]["median_rank"] == float(forward.median())
    assert got["volume:data->anchor"]["R@5"] == float((backward <= 5).float().mean())
    assert 0 < got["volume:anchor->data"]["R@1"] < 1


def test_leading_vector_rule_matches_brute_force():
    from evals.retrieval import anchor_scores, joint_retrieval

    text, image, audio = _triples(2)

    def anchor(j):
        z = torch.stack([image[j], audio[j]], 1).double()  # [D, 2]
        u = torch.linalg.svd(z, full_matrices=False).U[:, 0]
        return -u if float(u @ z.mean(1)) < 0 else u

    got = joint_retrieval(anchor_scores(text, [image, audio]), "anchor")
    forward = torch.tensor(_brute_ranks(lambda i, j: float(text[i].double() @ anchor(j))), dtype=torch.float)
    backward = torch.tensor(_brute_ranks(lambda i, j: float(text[j].double() @ anchor(i))), dtype=torch.float)
    assert got["anchor:anchor->data"]["R@1"] == float((forward <= 1).float().mean())
    assert got["anchor:data->anchor"]["R@1"] == float((backward <= 1).float().mean())
    assert got["anchor:data->anchor"]["median_rank"] == float(backward.median())
