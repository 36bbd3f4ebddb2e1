"""Completion of incomplete tuples: CalMRL's bi-step and the baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from pretrain.completion import Completion
from pretrain.config import CalibrationConfig

D = 8


def batch(seed: int = 0, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 3, generator=g)
    maps = [torch.randn(3, D, generator=g) for _ in MODALITIES]
    emb = {m: F.normalize(latent @ w + 0.05 * torch.randn(n, D, generator=g), dim=1) for m, w in zip(MODALITIES, maps)}
    present = torch.ones(n, 3, dtype=torch.bool)
    present[0, 1:] = False  # image only
    present[1, 0] = False
    present[2, 2] = False
    present[3] = False  # a padding row
    for m, i in zip(MODALITIES, range(3)):
        emb[m] = emb[m] * present[:, i : i + 1]
    return emb, present


def completion(method: str, **kw) -> Completion:
    options = {"latent_dim": 3, "warmup_steps": 2, **kw}
    return Completion(CalibrationConfig(method=method, **options), MODALITIES, D)


def test_observed_only_and_drop_incomplete_masks():
    emb, present = batch()
    done = completion("observed_only").complete(emb, present, step=0)
    assert torch.equal(done.observed, present) and torch.equal(done.available, present)
    done = completion("drop_incomplete").complete(emb, present, step=0)
    complete = present.all(1)
    assert torch.equal(done.observed, present & complete[:, None])
    assert not done.observed[:4].any() and done.observed[4:].all()


def test_mean_fill_uses_normalised_modality_mean():
    emb, present = batch()
    done = completion("mean_fill", decay=1.0).complete(emb, present, step=0)
    expected = F.normalize(emb["text"][present[:, 1]].mean(0), dim=0)
    assert torch.allclose(done.emb["text"][0], expected, atol=1e-6)
    assert torch.equal(done.emb["image"][0], emb["image"][0])
    assert done.available[:3].all() and not done.available[3].any()


def test_calmrl_aligns_observed_only_during_warmup_then_imputes():
    comp = completion("calmrl", decay=1.0)
    emb, present = batch()
    for step in range(2):
        done = comp.complete(emb, present, step)
        assert torch.equal(done.available, present)
        comp.end_step(step + 1)
    done = comp.complete(emb, present, step=2)
    assert done.available[:3].all() and not done.available[3].any()
    assert torch.equal(done.observed, present)
    for i, m in enumerate(MODALITIES):
        missing = ~present[:, i] & present.any(1)
        assert torch.allclose(done.emb[m][missing].norm(dim=1), torch.ones(int(missing.sum())), atol=1e-5)
        assert torch.equal(done.emb[m][present[:, i]], emb[m][present[:, i]])


@pytest.mark.parametrize("through", [True, False])
def test_grad_through_imputation_switch(through):
    comp = completion("calmrl", grad_through_imputation=through, warmup_steps=0)
    emb, present = batch()
    comp.complete(emb, present, 0)
    comp.end_step(1)  # fitted state
    emb = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
    done = comp.complete(emb, present, 1)
    done.emb["text"][0].sum().backward()  # text of sample 0 is imputed from its image
    grad = emb["image"].grad
    assert (grad is not None and grad[0].abs().sum() > 0) == through


def test_state_round_trip():
    comp = completion("calmrl")
    emb, present = batch()
    comp.complete(emb, present, 0)
    comp.end_step(1)
    other = completion("calmrl")
    other.load_state_dict(comp.state_dict())
    tensors = {k: v for k, v in comp.state_dict().items() if isinstance(v, torch.Tensor)}
    assert len(tensors) >= 6
    for k, v in tensors.items():
        assert torch.equal(v, other.state_dict()[k]), k
