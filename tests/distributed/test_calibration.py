"""Tests of the CalMRL calibrator (pretrain/calibration.py) against docs/method.md.

The references here are deliberately naive (per-sample loops, explicit
inverses, the full d x d covariance) so that they share no code path with the
pattern-batched implementation they check.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributions import MultivariateNormal

from pretrain.calibration import Calibrator
from pretrain.runtime import free_port

MODALITIES = ["image", "text", "audio"]

Params = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These tensors are tiny; on a shared CPU, OpenMP threads waiting on a busy
    core make them many times slower than one thread. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------- helpers


def random_present(n: int, num_modalities: int, missing_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli missingness, then give every empty row one random modality."""
    present = torch.rand(n, num_modalities, generator=generator) >= missing_rate
    empty = ~present.any(dim=1)
    keep = torch.randint(num_modalities, (n,), generator=generator)
    present[empty, keep[empty]] = True
    return present


def true_params(modalities: list[str], d: int, k: int, generator: torch.Generator) -> Params:
    params = {}
    for name in modalities:
        W = 0.5 * torch.randn(d, k, generator=generator, dtype=torch.float64)
        mu = 0.3 * torch.randn(d, generator=generator, dtype=torch.float64)
        sigma2 = float(0.05 + 0.15 * torch.rand(1, generator=generator, dtype=torch.float64))
        params[name] = (W, mu, sigma2)
    return params


def sample_model(params: Params, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw complete tuples from z^m = W_m b + mu_m + e_m with a shared b."""
    k = next(iter(params.values()))[0].shape[1]
    b = torch.randn(n, k, generator=generator, dtype=torch.float64)
    z = {}
    for name, (W, mu, sigma2) in params.items():
        noise = math.sqrt(sigma2) * torch.randn(n, W.shape[0], generator=generator, dtype=torch.float64)
        z[name] = b @ W.T + mu + noise
    return z


def with_nan_in_absent_rows(z: dict[str, torch.Tensor], present: torch.Tensor, modalities: list[str]):
    poisoned = {}
    for j, name in enumerate(modalities):
        values = z[name].clone()
        values[~present[:, j]] = float("nan")
        poisoned[name] = values
    return poisoned


def naive_posterior(params: Params, modalities: list[str], z, present) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loop with an explicit inverse of the precision."""
    k = next(iter(params.values()))[0].shape[1]
    means, covs = [], []
    for i in range(present.shape[0]):
        precision = torch.eye(k, dtype=torch.float64)
        rhs = torch.zeros(k, dtype=torch.float64)
        for j, name in enumerate(modalities):
            if present[i, j]:
                W, mu, sigma2 = params[name]
                precision = precision + W.T @ W / sigma2
                rhs = rhs + W.T @ (z[name][i].double() - mu) / sigma2
        cov = torch.linalg.inv(precision)
        means.append(cov @ rhs)
        covs.append(cov)
    return torch.stack(means), torch.stack(covs)


def naive_log_likelihood(params: Params, modalities: list[str], z, present) -> float:
    """Mean over samples of log N(z^O; mu_O, W_O W_O^T + D_O) with the full covariance."""
    values = []
    for i in range(present.shape[0]):
        observed = [name for j, name in enumerate(modalities) if present[i, j]]
        W_O = torch.cat([params[name][0] for name in observed])
        mu_O = torch.cat([params[name][1] for name in observed])
        D_O = torch.cat(
            [torch.full((params[name][0].shape[0],), params[name][2], dtype=torch.float64) for name in observed]
        )
        cov = W_O @ W_O.T + torch.diag(D_O)
        x = torch.cat([z[name][i].double() for name in observed])
        values.append(MultivariateNormal(mu_O, covariance_matrix=cov).log_prob(x))
    return float(torch.stack(values).mean())


def largest_principal_angle_degrees(A: torch.Tensor, B: torch.Tensor) -> float:
    Qa, _ = torch.linalg.qr(A)
    Qb, _ = torch.linalg.qr(B)
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)
    return math.degrees(math.acos(float(cosines.min())))


def fitted_calibrator(d: int = 6, k: int = 3, seed: int = 0, n: int = 60, iters: int = 3):
    """A calibrator whose parameters are non-trivial (a few EM steps on random data)."""
    generator = torch.Generator().manual_seed(seed)
    params = true_params(MODALITIES, d, k, generator)
    z = sample_model(params, n, generator)
    present = random_present(n, len(MODALITIES), 0.5, generator)
    calibrator = Calibrator(MODALITIES, d, k, seed=seed)
    calibrator.fit(z, present, iters)
    return calibrator, z, present


# ----------------------------------------------------------------- EM ascent


@pytest.mark.parametrize(
    "seed, d, k, modalities, missing_rate, sigma2_floor",
    [
        (0, 8, 2, ["image", "text"], 0.4, 1e-4),
        (1, 16, 4, MODALITIES, 0.5, 1e-4),
        (2, 12, 3, MODALITIES + ["depth"], 0.6, 1e-4),
        (3, 10, 5, MODALITIES, 0.3, 0.5),  # floor above the noise level: clamped M-steps
    ],
)
def test_em_never_decreases_log_likelihood(seed, d, k, modalities, missing_rate, sigma2_floor):
    generator = torch.Generator().manual_seed(seed)
    params = true_params(modalities, d, k + 1, generator)  # model mismatch on purpose
    n = 300
    z = sample_model(params, n, generator)
    # Heavy-tailed contamination: the guarantee holds for any fixed data.
    z = {name: values + 0.1 * torch.distributions.StudentT(2.0).sample(values.shape) for name, values in z.items()}
    present = random_present(n, len(modalities), missing_rate, generator)
    calibrator = Calibrator(modalities, d, k, seed=seed, sigma2_floor=sigma2_floor)

    history = [calibrator.log_likelihood(z, present)] + calibrator.fit(z, present, iters=40)

    for before, after in zip(history, history[1:]):
        assert after >= before - 1e-6 * abs(before), history
    assert history[-1] > history[0] + 1.0  # it actually climbed
    if sigma2_floor > 0.1:
        assert min(p[2] for p in calibrator.params().values()) == pytest.approx(sigma2_floor)


# ------------------------------------------------------- recovery on the model


def test_fit_recovers_true_subspace_and_oracle_imputation():
    d, k, n = 32, 4, 4000
    generator = torch.Generator().manual_seed(7)
    truth = true_params(MODALITIES, d, k, generator)
    complete = sample_model(truth, n, generator)
    present = random_present(n, len(MODALITIES), 0.5, generator)
    assert 0.4 < 1 - present.double().mean() < 0.5
    z = with_nan_in_absent_rows(complete, present, MODALITIES)

    calibrator = Calibrator(MODALITIES, d, k, seed=1)
    calibrator.fit(z, present, iters=150)
    learned = calibrator.params()

    for name in MODALITIES:
        angle = largest_principal_angle_degrees(learned[name][0], truth[name][0])
        assert angle < 5.0, (name, angle)
        assert learned[name][2] == pytest.approx(truth[name][2], rel=0.1)

    oracle_mean, _ = naive_posterior(truth, MODALITIES, z, present)
    imputed = calibrator.impute(z, present, normalize=False)
    for j, name in enumerate(MODALITIES):
        missing = ~present[:, j]
        W, mu, _ = truth[name]
        oracle = oracle_mean[missing] @ W.T + mu
        error = torch.linalg.norm(imputed[name][missing] - oracle) / torch.linalg.norm(oracle - mu)
        assert error < 0.05, (name, float(error))
        # The oracle itself is far better than filling with the mean.
        truth_rows = complete[name][missing]
        assert torch.linalg.norm(oracle - truth_rows) < 0.6 * torch.linalg.norm(mu - truth_rows)


# ------------------------------------------------------- against naive references


def test_posterior_matches_per_sample_inverse():
    calibrator, z, present = fitted_calibrator()
    z = with_nan_in_absent_rows(z, present, MODALITIES)
    mean, cov = calibrator.posterior(z, present)
    naive_mean, naive_cov = naive_posterior(calibrator.params(), MODALITIES, z, present)
    torch.testing.assert_close(mean, naive_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cov, naive_cov, atol=1e-5, rtol=1e-5)
    assert len({tuple(row.tolist()) for row in present}) >= 5  # several patterns exercised


def test_log_likelihood_matches_full_covariance_gaussian():
    calibrator, z, present = fitted_calibrator(seed=3)
    z = with_nan_in_absent_rows(z, present, MODALITIES)
    expected = naive_log_likelihood(calibrator.params(), MODALITIES, z, present)
    assert calibrator.log_likelihood(z, present) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_m_step_matches_per_sample_formula():
    calibrator, z, present = fitted_calibrator(seed=4)
    params = calibrator.params()
    mean, cov = naive_posterior(params, MODALITIES, z, present)
    d, k = calibrator.dim, calibrator.latent_dim

    calibrator.reset_statistics()
    calibrator.accumulate(z, present)
    calibrator.m_step()

    for j, name in enumerate(MODALITIES):
        rows = present[:, j].nonzero().flatten().tolist()
        bt = {i: torch.cat([mean[i], torch.ones(1, dtype=torch.float64)]) for i in rows}
        St = {
            i: torch.block_diag(cov[i], torch.zeros(1, 1, dtype=torch.float64)) + torch.outer(bt[i], bt[i])
            for i in rows
        }
        Wt = sum(torch.outer(z[name][i], bt[i]) for i in rows) @ torch.linalg.inv(sum(St[i] for i in rows))
        sigma2 = sum(
            float(z[name][i] @ z[name][i] - 2 * z[name][i] @ Wt @ bt[i] + torch.trace(Wt.T @ Wt @ St[i])) for i in rows
        ) / (d * len(rows))
        W, mu, learned_sigma2 = calibrator.params()[name]
        torch.testing.assert_close(W, Wt[:, :k], atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(mu, Wt[:, k], atol=1e-8, rtol=1e-8)
        assert learned_sigma2 == pytest.approx(sigma2, rel=1e-8)


# ----------------------------------------------------------------- edge cases


def test_single_sample_pattern_nan_absent_rows_and_empty_rows():
    calibrator, z, _ = fitted_calibrator(seed=5, n=8)
    present = torch.tensor(
        [
            [True, True, True],
            [True, True, True],
            [True, False, False],  # the only sample with this pattern
            [False, True, True],
            [False, True, True],
            [False, False, False],  # padding row: no modality at all
            [True, True, True],
            [False, False, True],  # single again
        ]
    )
    z = with_nan_in_absent_rows(z, present, MODALITIES)

    mean, cov = calibrator.posterior(z, present)
    naive_mean, naive_cov = naive_posterior(calibrator.params(), MODALITIES, z, present)
    torch.testing.assert_close(mean, naive_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cov, naive_cov, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean[5], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(cov[5], torch.eye(3, dtype=torch.float64))

    completed = calibrator.impute(z, present)
    for j, name in enumerate(MODALITIES):
        assert torch.isfinite(completed[name]).all()
        observed = present[:, j]
        assert torch.equal(completed[name][observed], z[name][observed])
        norms = completed[name][~observed].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))

    assert math.isfinite(calibrator.log_likelihood(z, present))
    calibrator.reset_statistics()
    calibrator.accumulate(z, present)
    for name in ("n_obs", "sum_z_bt", "sum_St", "sum_zsq"):
        assert torch.isfinite(getattr(calibrator, name)).all(), name
    torch.testing.assert_close(calibrator.n_obs, present.sum(dim=0).double())

    # A batch that is a single sample works too.
    single_mean, _ = calibrator.posterior({name: values[2:3] for name, values in z.items()}, present[2:3])
    torch.testing.assert_close(single_mean, mean[2:3])


def test_never_observed_modality_keeps_its_parameters():
    generator = torch.Generator().manual_seed(6)
    z = sample_model(true_params(MODALITIES, 8, 2, generator), 50, generator)
    present = random_present(50, 3, 0.3, generator)
    present[:, 2] = False
    present[~present.any(dim=1), 0] = True
    calibrator = Calibrator(MODALITIES, 8, 2)
    before = calibrator.params()
    calibrator.fit(z, present, iters=3)
    after = calibrator.params()
    assert torch.equal(before["audio"][0], after["audio"][0]) and before["audio"][2] == after["audio"][2]
    assert not torch.equal(before["image"][0], after["image"][0])


def test_decay_scales_old_statistics():
    calibrator, z, present = fitted_calibrator(seed=8, n=40)
    first = ({name: v[:20] for name, v in z.items()}, present[:20])
    second = ({name: v[20:] for name, v in z.items()}, present[20:])

    def statistics_of(batch):
        fresh = Calibrator(MODALITIES, calibrator.dim, calibrator.latent_dim)
        fresh.load_state_dict(calibrator.state_dict())
        fresh.reset_statistics()
        fresh.accumulate(*batch)
        return {name: getattr(fresh, name).clone() for name in ("n_obs", "sum_z_bt", "sum_St", "sum_zsq")}

    expected_first, expected_second = statistics_of(first), statistics_of(second)
    calibrator.decay = 0.5
    calibrator.reset_statistics()
    calibrator.accumulate(*first)
    calibrator.accumulate(*second)
    for name, value in expected_first.items():
        torch.testing.assert_close(getattr(calibrator, name), 0.5 * value + expected_second[name])


# ------------------------------------------------------------------ gradients


def test_impute_passes_gradient_to_observed_features():
    calibrator, z, present = fitted_calibrator(seed=9, n=12)
    present[:, 2] = False  # audio always imputed
    present[~present.any(dim=1), 0] = True
    image = z["image"].clone().requires_grad_(True)
    text = z["text"].clone().requires_grad_(True)

    def imputed_audio(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return calibrator.impute({"image": image, "text": text, "audio": z["audio"]}, present)["audio"]

    assert torch.autograd.gradcheck(imputed_audio, (image, text))
    imputed_audio(image, text).sum().backward()
    assert image.grad[present[:, 0]].abs().sum() > 0
    assert torch.all(image.grad[~present[:, 0]] == 0)  # absent rows are not inputs
    assert all(buffer.grad is None for buffer in calibrator.buffers())


def test_state_is_buffers_not_parameters():
    calibrator = Calibrator(MODALITIES, 8, 2)
    assert list(calibrator.parameters()) == []
    same_seed = Calibrator(MODALITIES, 8, 2)
    other_seed = Calibrator(MODALITIES, 8, 2, seed=1)
    assert torch.equal(calibrator.W, same_seed.W) and not torch.equal(calibrator.W, other_seed.W)
    assert torch.all(calibrator.mu == 0) and torch.all(calibrator.sigma2 == 1)


# ------------------------------------------------------------------ state dict


def test_state_dict_round_trip_is_exact(tmp_path: Path):
    calibrator, z, present = fitted_calibrator(seed=10)
    calibrator.accumulate(z, present)  # running statistics non-trivial too
    torch.save(calibrator.state_dict(), tmp_path / "calibrator.pt")

    restored = Calibrator(MODALITIES, calibrator.dim, calibrator.latent_dim, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "calibrator.pt"))
    for (name, value), (other_name, other_value) in zip(calibrator.state_dict().items(), restored.state_dict().items()):
        assert name == other_name
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other_value), name

    calibrator.m_step()
    restored.m_step()
    completed, completed_restored = calibrator.impute(z, present), restored.impute(z, present)
    for name in MODALITIES:
        assert torch.equal(completed[name], completed_restored[name])

    reordered = Calibrator(list(reversed(MODALITIES)), calibrator.dim, calibrator.latent_dim)
    with pytest.raises(ValueError):
        reordered.load_state_dict(calibrator.state_dict())


# ----------------------------------------------------------------------- bf16


def test_bf16_features_give_bf16_imputations():
    calibrator, z, present = fitted_calibrator(seed=11, n=40)
    z_bf16 = {name: values.to(torch.bfloat16) for name, values in z.items()}

    completed = calibrator.impute(z_bf16, present)
    reference = calibrator.impute({name: values.float() for name, values in z_bf16.items()}, present)
    for j, name in enumerate(MODALITIES):
        assert completed[name].dtype == torch.bfloat16
        observed = present[:, j]
        assert torch.equal(completed[name][observed], z_bf16[name][observed])
        torch.testing.assert_close(completed[name].float(), reference[name], atol=1e-2, rtol=1e-2)

    calibrator.accumulate(z_bf16, present)
    calibrator.m_step()
    assert calibrator.sum_St.dtype == torch.float64
    assert math.isfinite(calibrator.log_likelihood(z_bf16, present))


# ---------------------------------------------------------------- two ranks

STATISTICS = ("n_obs", "sum_z_bt", "sum_St", "sum_zsq", "W", "mu", "sigma2")


def _two_steps(calibrator: Calibrator, batches) -> None:
    for z, present in batches:
        calibrator.accumulate(z, present)
        calibrator.m_step()


def _rank_worker(rank: int, world_size: int, port: int, data_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        data = torch.load(data_file)
        calibrator = Calibrator(MODALITIES, data["dim"], data["latent_dim"], decay=0.9)
        _two_steps(calibrator, data["shards"][rank])
        torch.save({name: getattr(calibrator, name) for name in STATISTICS}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_match_one_process_on_the_union(tmp_path: Path):
    d, k, per_rank = 16, 3, 24
    generator = torch.Generator().manual_seed(12)
    truth = true_params(MODALITIES, d, k, generator)

    shards: list[list] = [[], []]
    union = []
    for _ in range(2):  # two steps, so the decay of the running sums is exercised too
        batch_z = {name: values.float() for name, values in sample_model(truth, 2 * per_rank, generator).items()}
        batch_present = random_present(2 * per_rank, 3, 0.4, generator)
        batch_present[per_rank:, 2] = False  # rank 1 never sees audio locally
        batch_present[~batch_present.any(dim=1), 0] = True
        batch_z = with_nan_in_absent_rows(batch_z, batch_present, MODALITIES)
        for rank in range(2):
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            shards[rank].append(({name: v[rows] for name, v in batch_z.items()}, batch_present[rows]))
        union.append((batch_z, batch_present))

    data_file = tmp_path / "data.pt"
    torch.save({"dim": d, "latent_dim": k, "shards": shards}, data_file)
    mp.spawn(_rank_worker, args=(2, free_port(), str(data_file), str(tmp_path)), nprocs=2, join=True)

    single = Calibrator(MODALITIES, d, k, decay=0.9)
    _two_steps(single, union)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name in STATISTICS:
        assert torch.equal(results[0][name], results[1][name]), name  # identical on every rank
        torch.testing.assert_close(results[0][name], getattr(single, name), atol=1e-5, rtol=1e-5)


def test_accumulate_and_impute_equals_the_two_calls():
    """The shared E-step gives the same statistics, imputations and gradients."""
    g = torch.Generator().manual_seed(3)
    mods = ["image", "text", "audio"]
    z = {m: torch.randn(40, 16, generator=g, dtype=torch.float64) for m in mods}
    present = torch.rand(40, 3, generator=g) > 0.4
    present[~present.any(1), 0] = True
    a = Calibrator(mods, 16, 4, seed=1)
    b = Calibrator(mods, 16, 4, seed=1)
    a.fit(z, present, 2)
    b.load_state_dict(a.state_dict())
    za = {m: v.clone().requires_grad_(True) for m, v in z.items()}
    zb = {m: v.clone().requires_grad_(True) for m, v in z.items()}
    out_a = a.accumulate_and_impute(za, present)
    b.accumulate(zb, present)
    out_b = b.impute(zb, present)
    for name in ("n_obs", "sum_z_bt", "sum_St", "sum_zsq"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-10), name
    for m in mods:
        assert torch.allclose(out_a[m], out_b[m], atol=1e-10)
    torch.stack([o.sum() for o in out_a.values()]).sum().backward()
    torch.stack([o.sum() for o in out_b.values()]).sum().backward()
    for m in mods:
        grad_a, grad_b = za[m].grad, zb[m].grad
        assert grad_a is not None and grad_b is not None
        assert torch.allclose(grad_a, grad_b, atol=1e-10)
