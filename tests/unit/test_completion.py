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


def test_exact_fit_at_the_end_of_warmup_is_em_to_convergence_on_recent_batches():
    """With calibration.exact_fit the calibrator is refitted exactly when warm-up ends
    (on the buffered features of the last micro-batches), then again every refit_every steps."""
    from pretrain.calibration import Calibrator

    done = completion(
        "calmrl",
        warmup_steps=3,
        exact_fit=True,
        exact_fit_batches=2,
        refit_every=2,
        dtype="float64",
        exact_fit_tol=1e-10,
    )
    batches = [batch(seed, n=40) for seed in range(6)]
    for step, (emb, present) in enumerate(batches):
        done.complete(emb, present, step)
        done.end_step(step + 1)
        if step + 1 == 3:  # warm-up ends: the fit used batches 1 and 2 (the buffer holds two)
            history = done.fit_history
            assert len(history) >= 2 and all(b >= a - 1e-9 for a, b in zip(history, history[1:]))
            z = {m: torch.cat([batches[1][0][m], batches[2][0][m]]) for m in MODALITIES}
            p = torch.cat([batches[1][1], batches[2][1]])
            # EM from another start reaches the same likelihood: the fit ran to convergence.
            reference = Calibrator(list(MODALITIES), D, 3, seed=5, dtype=torch.float64)
            reference.fit_exact(z, p, max_iters=2000, tol=1e-10)
            assert done.calibrator is not None
            assert abs(history[-1] - done.calibrator.log_likelihood(z, p)) < 1e-9
            assert abs(history[-1] - reference.log_likelihood(z, p)) < 1e-3 * abs(history[-1])
            first_fit = done.calibrator.W.clone()
    assert done.calibrator is not None and not torch.equal(done.calibrator.W, first_fit)  # refitted at step 5


def test_fit_exact_stops_at_convergence():
    from pretrain.calibration import Calibrator

    emb, present = batch(7, n=200)
    cal = Calibrator(list(MODALITIES), D, 3, seed=1, dtype=torch.float64)
    history = cal.fit_exact(emb, present, max_iters=3000, tol=1e-6)
    assert len(history) < 3000  # it converged before the cap
    assert abs(history[-1] - history[-2]) <= 1e-6 * abs(history[-2])
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:]))


def test_em_from_pattern_moments_equals_em_on_the_samples():
    """fit_exact iterates on each pattern's moments: the statistics and the likelihood
    are those of the per-sample E-step, to rounding."""
    from pretrain.calibration import Calibrator

    emb, present = batch(11, n=300)
    by_moments = Calibrator(list(MODALITIES), D, 3, seed=2, dtype=torch.float64)
    by_samples = Calibrator(list(MODALITIES), D, 3, seed=2, dtype=torch.float64)
    moments = by_moments.pattern_moments(emb, present)
    for _ in range(3):
        stats = by_moments._statistics_from_moments(moments)
        by_samples.reset_statistics()
        by_samples.accumulate(emb, present, decay=1.0)
        for name, value in stats.items():
            assert torch.allclose(value, getattr(by_samples, name), atol=1e-9), name
            getattr(by_moments, name).copy_(value)
        by_moments.m_step()
        by_samples.m_step()
        assert abs(by_moments.log_likelihood_from_moments(moments) - by_samples.log_likelihood(emb, present)) < 1e-9


def test_rows_with_too_few_modalities_are_not_imputed():
    """impute_min_observed 2: a row holding one modality stays as it is (local)."""
    emb, present = batch()
    done = completion("calmrl", warmup_steps=0, impute_min_observed=2).complete(emb, present, step=0)
    single = present.sum(1) == 1  # row 0: image only
    assert torch.equal(done.available[single], present[single])
    pairs = present.sum(1) == 2
    assert done.available[pairs].all()  # rows with two modalities are completed
    every = completion("calmrl", warmup_steps=0).complete(emb, present, step=0)
    assert every.available[single].all()
