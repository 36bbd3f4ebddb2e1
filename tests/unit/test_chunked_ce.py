"""Column-chunked cross-entropy with recomputation (pretrain/chunked_ce.py): values
and gradients equal the whole computation's, for the bare cross-entropy (masked
columns, masked targets, label smoothing) and for every objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from pretrain.chunked_ce import masked_ce
from pretrain.losses import gram_volume, pairwise_infonce, pmrl

N, D = 23, 6


def _dot(q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, cols: slice) -> torch.Tensor:
    return s * q @ k.T


def _leaves(seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    k = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    s = torch.tensor([7.0], dtype=torch.float64, requires_grad=True)
    available = torch.rand(N, generator=g) > 0.3
    return q, k, s, available


def _value_and_grads(chunk: int, smoothing: float, seed: int):
    q, k, s, available = _leaves(seed)
    per_row = masked_ce(_dot, q, k, s, available, 0, label_smoothing=smoothing, chunk=chunk)
    # rows whose own column is masked are inf: selected away, as the objectives do
    weights = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    loss = torch.where(available, per_row * weights, 0.0).sum()
    loss.backward()
    return per_row.detach(), loss.detach(), q.grad, k.grad, s.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, 22])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_equals_whole(chunk, smoothing):
    whole = _value_and_grads(0, smoothing, seed=chunk)
    chunked = _value_and_grads(chunk, smoothing, seed=chunk)
    rows, available = whole[0], _leaves(chunk)[3]
    assert torch.equal(torch.isinf(rows), torch.isinf(chunked[0]))  # masked targets stay inf
    assert torch.allclose(rows[available], chunked[0][available], atol=1e-12)
    for a, b in zip(whole[1:], chunked[1:]):
        assert torch.allclose(a, b, atol=1e-12)


def test_no_available_column_gives_finite_zero_gradients():
    q, k, s, _ = _leaves(0)
    none = torch.zeros(N, dtype=torch.bool)
    per_row = masked_ce(_dot, q, k, s, none, 0, chunk=5)
    torch.where(none, per_row, 0.0).sum().backward()
    for grad in (q.grad, k.grad, s.grad):
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


def _objective_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    emb = {m: F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1) for m in MODALITIES}
    available = torch.rand(N, len(MODALITIES), generator=g) > 0.35
    available[available.sum(1) == 0, 0] = True
    observed = available & (torch.rand(available.shape, generator=g) > 0.3)
    observed[torch.arange(N), available.float().argmax(1)] = True
    return emb, observed, available


@pytest.mark.parametrize(
    "objective,kwargs",
    [
        (pairwise_infonce, {}),
        (gram_volume, {}),
        (gram_volume, {"label_smoothing": 0.1, "anchor": "image"}),
        (gram_volume, {"negatives_grad": False}),
        (pmrl, {}),
        (pmrl, {"tau2": 0.1}),
    ],
)
def test_objectives_chunked_equal_whole(objective, kwargs):
    results = []
    for chunk in (0, 5):
        emb, observed, available = _objective_batch(3)
        leaves = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
        scale = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
        out = objective(leaves, observed, scale, MODALITIES, available=available, column_chunk=chunk, **kwargs)
        out["loss"].backward()
        results.append((out, {m: e.grad for m, e in leaves.items()}, scale.grad))
    (whole, whole_grads, whole_scale), (chunked, chunked_grads, chunked_scale) = results
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert torch.allclose(whole[key].double(), chunked[key].double(), atol=1e-10), key
    for m in MODALITIES:
        assert torch.allclose(whole_grads[m], chunked_grads[m], atol=1e-10), m
    assert whole_scale is not None and chunked_scale is not None
    assert torch.allclose(whole_scale, chunked_scale, atol=1e-10)


def test_bf16_gradients_do_not_degrade_with_the_number_of_chunks():
    """Chunk gradients are summed in fp32: bf16 inputs in 64 chunks stay as close to a
    float64 reference as the whole bf16 computation."""
    g = torch.Generator().manual_seed(1)
    q64 = F.normalize(torch.randn(32, 16, generator=g, dtype=torch.float64), dim=-1)
    k64 = F.normalize(torch.randn(512, 16, generator=g, dtype=torch.float64), dim=-1)
    available = torch.ones(512, dtype=torch.bool)

    def grad(dtype: torch.dtype, chunk: int) -> torch.Tensor:
        q = q64.to(dtype).detach().clone().requires_grad_(True)
        s = torch.tensor([10.0], dtype=dtype)
        masked_ce(_dot, q, k64.to(dtype), s, available, 0, chunk=chunk).float().sum().backward()
        assert q.grad is not None
        return q.grad.double()

    reference = grad(torch.float64, 0)
    whole, chunked = grad(torch.bfloat16, 0), grad(torch.bfloat16, 8)
    error = lambda g: float((g - reference).norm() / reference.norm())  # noqa: E731
    assert error(chunked) <= 1.5 * error(whole) + 1e-3, (error(chunked), error(whole))
