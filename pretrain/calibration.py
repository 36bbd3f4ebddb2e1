"""The CalMRL calibrator: a shared-latent generative model of the representations.

Every modality's representation is modelled as a linear image of one latent
vector shared by all modalities of an instance (docs/method.md, "Generative model"):

    z^m = W_m b + mu_m + e_m,   b ~ N(0, I_k),   e_m ~ N(0, sigma2_m I_d)

The E-step infers b from whatever modalities a sample has, in closed form; the
missing modalities are then imputed as ``normalize(W_m b + mu_m)``. The M-step
refits ``W_m, mu_m, sigma2_m`` in closed form from sufficient statistics, which
are summed across ranks with a single all-reduce so every rank holds the same
state.

All state lives in buffers (never optimizer parameters), in ``dtype`` (float64
by default) whatever the dtype of the features: the statistics are sums over
many steps and the log-likelihood is compared across EM iterations, both of
which bf16/fp32 roundoff would blur. Keep the calibrator out of any wrapper that
casts a module's buffers (e.g. a bf16 DeepSpeed engine); it has nothing to train.

Choices that docs/method.md leaves open, ours (configurable where it matters):
- ``W_m`` starts as ``init_scale * randn(d, k) / sqrt(d)`` (columns of norm
  about ``init_scale``), ``mu_m = 0``, ``sigma2_m = 1``, drawn from ``seed``.
- Counts are decayed together with the other sums, so the M-step is an
  exponentially weighted EM over recent batches.
- ``log_likelihood`` averages over the samples that have at least one
  modality (rows with none carry no data; they are batch padding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class PatternGroups:
    """Every missing pattern (all 2^M observed sets, the empty one included) and
    which one each sample has. Fixed shapes: no `unique`, no host sync."""

    patterns: Tensor  # [P, M] bool: the observed set of pattern p (P = 2^M; p's bits)
    index: Tensor  # [N] long: pattern id of every sample

    @property
    def counts(self) -> Tensor:
        """Samples per pattern, [P] (a comparison, not bincount: its size is fixed)."""
        ids = torch.arange(self.patterns.shape[0], device=self.index.device)
        return (self.index.unsqueeze(0) == ids.unsqueeze(1)).sum(1)


@dataclass(frozen=True)
class PatternMoments:
    """Sufficient statistics of fixed data for EM: per missing pattern, over the
    samples with that pattern, of the concatenated features x = [z^m]_m."""

    patterns: Tensor  # [P, M] bool
    counts: Tensor  # [P]
    first: Tensor  # [P, M d]: sum x
    second: Tensor  # [P, M d, M d]: sum x x^T


@dataclass(frozen=True)
class Posterior:
    """Result of the E-step. Covariances are kept per pattern, not per sample."""

    mean: Tensor  # [N, k]: b_i
    pattern_cov: Tensor  # [P, k, k]: V_O, the posterior covariance of each pattern
    pattern_chol: Tensor  # [P, k, k]: lower Cholesky factor of the precision P_O
    rhs: Tensor  # [N, k]: sum_{m in O} W_m^T (z^m - mu_m) / sigma2_m
    groups: PatternGroups

    def sample_cov(self) -> Tensor:
        """Posterior covariance of every sample, [N, k, k]."""
        return self.pattern_cov.index_select(0, self.groups.index)


def _pattern_groups(present: Tensor) -> PatternGroups:
    """Group samples by missing pattern (a bit code over modalities). All 2^M
    patterns are listed whether or not the batch has them: a few more k x k
    factorisations (8 for three modalities), and shapes that do not depend on
    the data, so the E-step never waits on the host."""
    num_modalities = present.shape[1]
    bits = torch.arange(num_modalities, device=present.device)
    codes = (present.long() << bits).sum(dim=1)
    all_codes = torch.arange(2**num_modalities, device=present.device)
    patterns = ((all_codes.unsqueeze(1) >> bits) & 1).bool()
    return PatternGroups(patterns=patterns, index=codes)


class Calibrator(torch.nn.Module):
    """Shared-latent linear-Gaussian model over modality representations.

    Args:
        modalities: modality names; ``present[:, j]`` refers to ``modalities[j]``.
        dim: representation size ``d``.
        latent_dim: latent size ``k``.
        decay: running statistics are ``decay * old + batch`` (1.0: plain sums).
        sigma2_floor: lower bound on every ``sigma2_m`` after an M-step.
        normalize_imputed: L2-normalise imputed vectors (the encoders' outputs
            are unit vectors); ``impute(normalize=...)`` overrides it per call.
        init_scale: approximate column norm of the initial random ``W_m``.
        seed: seed of the initial ``W_m``; the same seed gives the same state on
            every rank without communication.
        dtype: floating dtype of the state, the statistics and all internal
            arithmetic (extra option; float64 by default).
        process_group: group whose ranks' statistics are summed in
            ``accumulate`` when ``torch.distributed`` is initialised (extra
            option; None is the default group).
    """

    # The state (buffers, identical on every rank) and the running statistics.
    W: Tensor  # [M, d, k]
    mu: Tensor  # [M, d]
    sigma2: Tensor  # [M]
    n_obs: Tensor  # [M]
    sum_z_bt: Tensor  # [M, d, k+1]
    sum_St: Tensor  # [M, k+1, k+1]
    sum_zsq: Tensor  # [M]
    refused: Tensor  # []: batches whose statistics were not finite (not saved)

    def __init__(
        self,
        modalities: list[str],
        dim: int,
        latent_dim: int,
        *,
        decay: float = 0.99,
        sigma2_floor: float = 1e-4,
        normalize_imputed: bool = True,
        init_scale: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        process_group: Any | None = None,
    ) -> None:
        super().__init__()
        if len(set(modalities)) != len(modalities) or not modalities:
            raise ValueError(f"modalities must be distinct and non-empty, got {modalities}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if sigma2_floor <= 0.0:
            raise ValueError(f"sigma2_floor must be positive, got {sigma2_floor}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.modalities = list(modalities)
        self.dim = dim
        self.latent_dim = latent_dim
        self.decay = decay
        self.sigma2_floor = sigma2_floor
        self.normalize_imputed = normalize_imputed
        self.dtype = dtype
        self.process_group = process_group

        num_modalities = len(self.modalities)
        # A private CPU generator: the initial state must not depend on the
        # global RNG, the device, or what other code has drawn before.
        generator = torch.Generator().manual_seed(seed)
        initial_W = torch.randn(num_modalities, dim, latent_dim, generator=generator, dtype=torch.float64)
        initial_W *= init_scale / math.sqrt(dim)
        self.register_buffer("W", initial_W.to(dtype))
        self.register_buffer("mu", torch.zeros(num_modalities, dim, dtype=dtype))
        self.register_buffer("sigma2", torch.ones(num_modalities, dtype=dtype))

        # Sufficient statistics per modality, over the samples where it is observed.
        self.register_buffer("n_obs", torch.zeros(num_modalities, dtype=dtype))
        self.register_buffer("sum_z_bt", torch.zeros(num_modalities, dim, latent_dim + 1, dtype=dtype))
        self.register_buffer("sum_St", torch.zeros(num_modalities, latent_dim + 1, latent_dim + 1, dtype=dtype))
        self.register_buffer("sum_zsq", torch.zeros(num_modalities, dtype=dtype))
        # Batches whose statistics were not finite (a diverging step): refused, not folded in.
        self.register_buffer("refused", torch.zeros((), dtype=dtype), persistent=False)

    # ------------------------------------------------------------------ E-step

    def e_step(self, z: Mapping[str, Tensor], present: Tensor) -> Posterior:
        """Closed-form posterior of the shared latent given the observed modalities.

        Differentiable w.r.t. ``z`` (the state is constant), so imputations can
        pass gradient back to the observed encoders.
        """
        present = self._check_present(present)
        groups = _pattern_groups(present)
        return self._posterior(self._masked_features(z, present), present, groups)

    def posterior(self, z: Mapping[str, Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean [N, k] and covariance [N, k, k] of the shared latent.

        Rows with no modality get the prior (mean 0, covariance I).
        """
        result = self.e_step(z, present)
        return result.mean, result.sample_cov()

    def _posterior(self, features: list[Tensor], present: Tensor, groups: PatternGroups) -> Posterior:
        precision = self._pattern_precision(groups.patterns)
        # One batched Cholesky call factors every distinct pattern's precision.
        chol = torch.linalg.cholesky(precision)
        rhs = self._precision_weighted_sum(features, present)
        # V_O = P_O^{-1} = L^-T L^-1: one batched triangular inverse and a product
        # (half the time of cholesky_inverse for a handful of 64 x 64 factors on CPU).
        chol_inv = torch.linalg.solve_triangular(
            chol, torch.eye(self.latent_dim, dtype=chol.dtype, device=chol.device).expand_as(chol), upper=False
        )
        pattern_cov = chol_inv.mT @ chol_inv
        # b_i = V_O rhs_i: every pattern's V applied to the whole batch is one
        # small batched product ([P, N, k], P <= 2^M - 1), then each sample takes
        # its own pattern's row. P_O = I + ... has eigenvalues >= 1, so V_O from
        # the triangular inverse is as accurate as a per-pattern triangular solve,
        # and there is no sort, loop or scatter over patterns.
        mean = torch.matmul(rhs.unsqueeze(0), pattern_cov)[groups.index, torch.arange(rhs.shape[0], device=rhs.device)]
        return Posterior(mean=mean, pattern_cov=pattern_cov, pattern_chol=chol, rhs=rhs, groups=groups)

    def _pattern_precision(self, patterns: Tensor) -> Tensor:
        """P_O = I + sum_{m in O} W_m^T W_m / sigma2_m for every pattern, [P, k, k]."""
        per_modality = self.W.transpose(1, 2) @ self.W / self.sigma2[:, None, None]
        eye = torch.eye(self.latent_dim, dtype=self.dtype, device=self.W.device)
        return eye + torch.einsum("pm,mkl->pkl", patterns.to(self.dtype), per_modality)

    def _precision_weighted_sum(self, features: list[Tensor], present: Tensor) -> Tensor:
        """sum_{m in O_i} W_m^T (z_i^m - mu_m) / sigma2_m per sample, [N, k].

        The features are not centred (that would be a pass over every [N, d]
        tensor): sum_m z^m W_m / sigma2_m is accumulated in place, one product per
        modality, and the means enter in k-space, sum_{m in O_i} mu_m^T W_m / sigma2_m.
        """
        scaled_W = self.W / self.sigma2[:, None, None]  # [M, d, k]
        rhs = features[0] @ scaled_W[0]
        for j in range(1, len(features)):
            rhs = torch.addmm(rhs, features[j], scaled_W[j])
        mean_term = torch.einsum("md,mdk->mk", self.mu, scaled_W)  # [M, k]
        return rhs - present.to(self.dtype) @ mean_term

    def _masked_features(self, z: Mapping[str, Tensor], present: Tensor) -> list[Tensor]:
        """z^m in the internal dtype, one [N, d] tensor per modality, exactly zero on rows where m is absent.

        ``masked_fill`` rather than a multiply by the mask: absent rows may hold
        NaN, and NaN * 0 is NaN. A modality missing from ``z`` counts as absent.
        One pass over each modality's features (they are the largest tensors
        the calibrator touches): no stacking, no centring.
        """
        num_samples = present.shape[0]
        features = []
        for j, name in enumerate(self.modalities):
            if name not in z:
                if bool(present[:, j].any()):
                    raise ValueError(f"present marks '{name}' observed but z has no '{name}' entry")
                features.append(torch.zeros(num_samples, self.dim, dtype=self.dtype, device=self.W.device))
                continue
            values = z[name]
            if values.shape != (num_samples, self.dim):
                raise ValueError(f"z['{name}'] has shape {tuple(values.shape)}, expected ({num_samples}, {self.dim})")
            features.append(values.to(self.dtype).masked_fill(~present[:, j : j + 1], 0.0))
        return features

    def _check_present(self, present: Tensor) -> Tensor:
        if present.ndim != 2 or present.shape[1] != len(self.modalities):
            raise ValueError(f"present must be [N, {len(self.modalities)}], got {tuple(present.shape)}")
        return present.to(device=self.W.device, dtype=torch.bool)

    # -------------------------------------------------------------- imputation

    def impute(self, z: Mapping[str, Tensor], present: Tensor, *, normalize: bool | None = None) -> dict[str, Tensor]:
        """Complete every modality: observed rows as given, missing rows W_m b_i + mu_m.

        Imputed rows are L2-normalised unless ``normalize`` (default: the
        constructor's ``normalize_imputed``) is False. The result for each
        modality has the dtype of its input features. Nothing is detached:
        gradient flows from imputed rows into the observed features through
        b_i; detach the input for no gradient.
        """
        present = self._check_present(present)
        return self._complete(z, present, self.e_step(z, present), normalize)

    def _complete(
        self, z: Mapping[str, Tensor], present: Tensor, result: Posterior, normalize: bool | None
    ) -> dict[str, Tensor]:
        """Observed rows as given, missing rows W_m b_i + mu_m.

        Fixed shapes: every row's W_m b_i + mu_m is computed (an [N, k] x [k, d]
        product per modality) and ``torch.where`` keeps the observed rows, so
        nothing depends on how many rows are missing (no ``nonzero``, no host
        sync); the gradient reaches z only through the rows it keeps.
        """
        normalize = self.normalize_imputed if normalize is None else normalize
        fallback_dtype = next(iter(z.values())).dtype if z else self.dtype
        completed = {}
        for j, name in enumerate(self.modalities):
            imputed = torch.addmm(self.mu[j], result.mean, self.W[j].T)
            if normalize:
                imputed = F.normalize(imputed, dim=-1)
            if name in z:
                features = z[name]
                completed[name] = torch.where(present[:, j : j + 1], features, imputed.to(features.dtype))
            else:  # every row is missing
                completed[name] = imputed.to(fallback_dtype)
        return completed

    def predictive_cov(self, present_pattern: Sequence[bool] | Sequence[str] | Tensor, modality: str) -> Tensor:
        """W_m V_O W_m^T + sigma2_m I: covariance of z^m given the modalities in O, [d, d].

        ``present_pattern`` is a bool mask over ``modalities`` or a collection of
        observed modality names. A diagnostic: it forms a d x d matrix.
        """
        if isinstance(present_pattern, Tensor):
            mask = present_pattern.to(device=self.W.device, dtype=torch.bool)
        elif any(isinstance(item, str) for item in present_pattern) or len(present_pattern) == 0:
            mask = torch.tensor([name in present_pattern for name in self.modalities], device=self.W.device)
        else:
            mask = torch.tensor([bool(item) for item in present_pattern], device=self.W.device)
        chol = torch.linalg.cholesky(self._pattern_precision(mask.unsqueeze(0)))
        latent_cov = torch.cholesky_inverse(chol)[0]
        j = self.modalities.index(modality)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.W.device)
        return self.W[j] @ latent_cov @ self.W[j].T + self.sigma2[j] * eye

    # ---------------------------------------------------------- log-likelihood

    @torch.no_grad()
    def log_likelihood(self, z: Mapping[str, Tensor], present: Tensor) -> float:
        """Mean over samples of log N(z^O; mu_O, W_O W_O^T + D_O), D_O = diag(sigma2_m I_d).

        Woodbury and the determinant lemma reduce it to the E-step's quantities:
            quad   = sum_m |z^m - mu_m|^2 / sigma2_m - rhs^T P_O^{-1} rhs
            logdet = log det P_O + d sum_{m in O} log sigma2_m
        so each pattern costs one k x k factorisation and each sample O(d k).
        Samples with no modality are left out of the mean (NaN if all are).
        """
        present = self._check_present(present)
        groups = _pattern_groups(present)
        features = self._masked_features(z, present)
        result = self._posterior(features, present, groups)

        # |z^m - mu_m|^2 = |z^m|^2 - 2 mu_m . z^m + |mu_m|^2 on the rows where m is observed
        mask = present.to(self.dtype)
        scaled_sq_norm = sum(
            (x.square().sum(dim=1) - 2.0 * (x @ self.mu[j]) + mask[:, j] * self.mu[j].square().sum()) / self.sigma2[j]
            for j, x in enumerate(features)
        )
        quad = scaled_sq_norm - (result.rhs * result.mean).sum(dim=1)

        patterns = groups.patterns.to(self.dtype)
        logdet_precision = 2.0 * torch.diagonal(result.pattern_chol, dim1=-2, dim2=-1).log().sum(dim=-1)
        logdet_noise = patterns @ (self.dim * self.sigma2.log())
        observed_dims = self.dim * patterns.sum(dim=1)
        pattern_const = observed_dims * _LOG_2PI + logdet_precision + logdet_noise

        per_sample = -0.5 * (pattern_const.index_select(0, groups.index) + quad)
        return per_sample[present.any(dim=1)].mean().item()

    @torch.no_grad()
    def global_log_likelihood(self, z: Mapping[str, Tensor], present: Tensor) -> float:
        """`log_likelihood` averaged over the samples of every rank (one all-reduce):
        the same number on every rank, so a decision taken on it is collective-safe."""
        present = self._check_present(present)
        rows = present.any(dim=1)
        local = self.log_likelihood(z, present) if bool(rows.any()) else 0.0
        count = float(rows.sum())
        totals = torch.tensor([local * count, count], dtype=torch.float64, device=self.W.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=self.process_group)
        return float(totals[0] / totals[1].clamp_min(1.0))

    # ---------------------------------------------------------------- M-step

    @torch.no_grad()
    def accumulate(self, z: Mapping[str, Tensor], present: Tensor, *, decay: float | None = None) -> None:
        """E-step on detached features, then fold the batch's statistics into the running sums.

        The batch statistics are summed over ranks (one all-reduce) when
        ``torch.distributed`` is initialised, so every rank must call it at the
        same steps, even with no observed rows (the reduced buffer's size does
        not depend on ``N``). The calibrator must live on a device the backend can reduce
        (CUDA for NCCL). ``decay`` overrides the constructor's value for this call.
        """
        present = self._check_present(present)
        detached = {name: features.detach() for name, features in z.items()}
        groups = _pattern_groups(present)
        features = self._masked_features(detached, present)
        self._fold_statistics(features, present, self._posterior(features, present, groups), decay)

    def _fold_statistics(self, features: list[Tensor], present: Tensor, result: Posterior, decay: float | None) -> None:
        decay = self.decay if decay is None else decay
        batch = self._batch_statistics(features, present, result)
        batch = self._all_reduce_statistics(batch)
        # A non-finite statistic (embeddings of a diverging step) is refused whole, decided on
        # the device after the all-reduce (so alike on every rank): the running statistics,
        # and so the M-step's factorisations, only ever see finite numbers.
        finite = torch.stack([torch.isfinite(value).all() for value in batch.values()]).all()
        self.refused += (~finite).to(self.refused.dtype)
        keep = torch.where(finite, decay, 1.0).to(self.dtype)
        for name, value in batch.items():
            running = getattr(self, name)
            running.mul_(keep).add_(torch.where(finite, value, torch.zeros_like(value)))

    def accumulate_and_impute(
        self, z: Mapping[str, Tensor], present: Tensor, *, normalize: bool | None = None
    ) -> dict[str, Tensor]:
        """`accumulate(z, present)` then `impute(z, present)` with one shared E-step.

        The statistics use the detached posterior; the imputations keep the
        gradient path through ``z`` (detach ``z`` for none). Same results as
        the two calls, as the state does not change in between.
        """
        present = self._check_present(present)
        groups = _pattern_groups(present)
        features = self._masked_features(z, present)
        result = self._posterior(features, present, groups)
        with torch.no_grad():
            detached = Posterior(
                mean=result.mean.detach(),
                pattern_cov=result.pattern_cov,
                pattern_chol=result.pattern_chol,
                rhs=result.rhs.detach(),
                groups=groups,
            )
            self._fold_statistics([x.detach() for x in features], present, detached, None)
        return self._complete(z, present, result, normalize)

    def _batch_statistics(self, features: list[Tensor], present: Tensor, result: Posterior) -> dict[str, Tensor]:
        """Counts, sum z bt^T, sum St and sum |z|^2 of this batch, per modality."""
        k = self.latent_dim
        ones = torch.ones(present.shape[0], 1, dtype=self.dtype, device=self.W.device)
        bt = torch.cat([result.mean, ones], dim=1)  # [N, k+1]
        mask = present.T.to(self.dtype)  # [M, N]
        observed_bt = bt.unsqueeze(0) * mask.unsqueeze(-1)  # [M, N, k+1], zero where m is absent
        n_obs = mask.sum(dim=1)
        # sum_i V_i over the samples with m observed: V depends only on the pattern.
        samples_per_pattern = result.groups.counts.to(self.dtype)[None, :] * result.groups.patterns.T.to(self.dtype)
        sum_St = observed_bt.transpose(1, 2) @ observed_bt  # [M, k+1, k+1]
        sum_St[:, :k, :k] += torch.einsum("mp,pkl->mkl", samples_per_pattern, result.pattern_cov)
        # z^m is zero on absent rows, so bt needs no mask here: (bt^T z^m)^T per modality.
        sum_z_bt = torch.stack([bt.T @ x for x in features]).transpose(1, 2)  # [M, d, k+1]
        sum_zsq = torch.stack([torch.linalg.vector_norm(x).square() for x in features])
        return {"n_obs": n_obs, "sum_z_bt": sum_z_bt, "sum_St": sum_St, "sum_zsq": sum_zsq}

    def _all_reduce_statistics(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum the batch statistics over ranks with one all-reduce on one flat buffer."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return batch
        flat = torch.cat([value.reshape(-1) for value in batch.values()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        pieces = flat.split([value.numel() for value in batch.values()])
        return {name: piece.view_as(value) for (name, value), piece in zip(batch.items(), pieces)}

    @torch.no_grad()
    def m_step(self) -> None:
        """Closed-form update of W_m, mu_m, sigma2_m from the running statistics.

        With A = sum St, B = sum z bt^T, Wt = [W, mu]:
            Wt     = B A^{-1}
            sigma2 = (sum |z|^2 - 2 tr(Wt^T B) + tr(Wt^T Wt A)) / (d n)
                   = (sum |z|^2 - tr(Wt^T B)) / (d n)             (Wt A = B)
        A modality never observed (zero count) keeps its parameters.
        """
        k = self.latent_dim
        observed = self.n_obs > 0
        # All modalities at once, decided by masks on the device (no host sync); a
        # never-observed one (A may be all zeros) uses I and keeps its parameters.
        # A = sum St is positive definite once n > 0 (V_O is), so A^{-1} = L^-T L^-1
        # from its Cholesky factor (faster here than an LU solve with d right-hand
        # sides); where the factorisation fails, an LU solve's result is taken (both
        # are computed: (k+1) x (k+1) systems, cheap next to a step).
        eye = torch.eye(k + 1, dtype=self.dtype, device=self.W.device)
        A = torch.where(observed[:, None, None], self.sum_St, eye)
        B = self.sum_z_bt  # [M, d, k+1]
        chol, info = torch.linalg.cholesky_ex(A)
        factored = (info == 0)[:, None, None]
        chol = torch.where(factored, chol, eye)
        chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        # A is symmetric, so B A^{-1} = (A^{-1} B^T)^T
        solved, _ = torch.linalg.solve_ex(A, B.transpose(1, 2))
        Wt = torch.where(factored, B @ (chol_inv.mT @ chol_inv), solved.transpose(1, 2))
        # tr(Wt^T Wt A) = tr(Wt^T B) since Wt A = B: sigma2 = (sum |z|^2 - tr(Wt^T B)) / (d n)
        cross = torch.linalg.vecdot(Wt.flatten(1), B.flatten(1))
        sigma2 = ((self.sum_zsq - cross) / (self.dim * self.n_obs.clamp_min(1e-12))).clamp_min(self.sigma2_floor)
        # Only finite updates are taken (the statistics are finite; this guards the solves).
        observed = observed & torch.isfinite(Wt).flatten(1).all(1) & torch.isfinite(sigma2)
        keep = observed[:, None, None]
        self.W.copy_(torch.where(keep, Wt[:, :, :k], self.W))
        self.mu.copy_(torch.where(keep[:, :, 0], Wt[:, :, k], self.mu))
        self.sigma2.copy_(torch.where(observed, sigma2, self.sigma2))

    @torch.no_grad()
    def reset_statistics(self) -> None:
        for name in ("n_obs", "sum_z_bt", "sum_St", "sum_zsq"):
            getattr(self, name).zero_()

    def fit(self, z: Mapping[str, Tensor], present: Tensor, iters: int) -> list[float]:
        """EM on fixed features; returns the log-likelihood after each iteration.

        Each iteration replaces the running statistics with this data's plain
        sums (over all ranks if distributed; the log-likelihood is local). Used
        for warm-up and tests; it leaves the last iteration's statistics behind.
        """
        history = []
        for _ in range(iters):
            self.reset_statistics()
            self.accumulate(z, present, decay=1.0)
            self.m_step()
            history.append(self.log_likelihood(z, present))
        return history

    @torch.no_grad()
    def fit_exact(
        self, z: Mapping[str, Tensor], present: Tensor, max_iters: int = 200, tol: float = 1e-6
    ) -> list[float]:
        """EM to convergence on fixed features (every rank's).

        EM on fixed data needs the data only through each missing pattern's
        count, sum and sum of outer products of its concatenated features
        (`PatternMoments`): they are computed once and summed over ranks with one
        all-reduce, after which an iteration costs O(patterns x (M d)^2 k)
        whatever the number of samples, and every rank computes the same state
        with no further communication. Each iteration gives exactly the
        statistics the per-sample E-step would (tested), then the usual M-step.
        Stops when the mean log-likelihood improves by less than `tol` relative
        to its magnitude, or after `max_iters`. Returns the mean log-likelihood
        after each iteration (non-decreasing, as EM guarantees); the running
        statistics are left as the last iteration's plain sums."""
        moments = self.pattern_moments(z, present)
        history: list[float] = []
        for _ in range(max_iters):
            for name, value in self._statistics_from_moments(moments).items():
                getattr(self, name).copy_(value)
            self.m_step()
            history.append(self.log_likelihood_from_moments(moments))
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * max(1.0, abs(history[-2])):
                break
        return history

    @torch.no_grad()
    def pattern_moments(self, z: Mapping[str, Tensor], present: Tensor) -> PatternMoments:
        """Count, sum and sum of outer products of the concatenated features x = [z^m]_m
        (zero blocks for absent modalities) per missing pattern, summed over ranks.
        Every pattern of the 2^M - 1 is listed, so every rank reduces the same shape."""
        present = self._check_present(present)
        x = torch.cat(self._masked_features(z, present), dim=1)  # [N, M d]
        num_modalities = len(self.modalities)
        bits = torch.arange(num_modalities, device=present.device)
        codes = (present.long() << bits).sum(dim=1)
        all_codes = torch.arange(1, 2**num_modalities, device=present.device)
        patterns = ((all_codes.unsqueeze(1) >> bits) & 1).bool()
        member = (codes.unsqueeze(0) == all_codes.unsqueeze(1)).to(self.dtype)  # [P, N]
        counts = member.sum(1)
        first = member @ x
        second = torch.einsum("pn,nd,ne->pde", member, x, x)
        stats = self._all_reduce_statistics({"counts": counts, "first": first, "second": second})
        return PatternMoments(patterns.to(self.W.device), stats["counts"], stats["first"], stats["second"])

    def _pattern_maps(self, patterns: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per pattern: V_O [P, k, k], A_O [P, k, M d] (the blocks W_m^T / sigma2_m of the
        observed modalities), c_O [P, k] (sum of W_m^T mu_m / sigma2_m) and mu_O [P, M d]."""
        d, k = self.dim, self.latent_dim
        block = patterns.to(self.dtype).repeat_interleave(d, dim=1)  # [P, M d]
        V = torch.cholesky_inverse(torch.linalg.cholesky(self._pattern_precision(patterns)))
        scaled = (self.W / self.sigma2[:, None, None]).permute(2, 0, 1).reshape(k, -1)  # [k, M d]
        A = scaled.unsqueeze(0) * block.unsqueeze(1)
        mu = self.mu.reshape(-1).unsqueeze(0) * block
        c = torch.einsum("pkd,pd->pk", A, mu)
        return V, A, c, mu

    def _statistics_from_moments(self, moments: PatternMoments) -> dict[str, Tensor]:
        """The running statistics one E-step over the data would give, from its moments.

        With b_i = G x_i - g (G = V_O A_O, g = V_O c_O) for a sample of pattern O:
        sum b x^T = G S - g s^T, sum b = G s - n g and
        sum b b^T = G S G^T - G s g^T - g s^T G^T + n g g^T."""
        d, k, num_modalities = self.dim, self.latent_dim, len(self.modalities)
        V, A, c, _ = self._pattern_maps(moments.patterns)
        n, s, S = moments.counts, moments.first, moments.second
        G = V @ A
        g = torch.einsum("pkl,pl->pk", V, c)
        Gs = torch.einsum("pkd,pd->pk", G, s)
        bx = G @ S - g.unsqueeze(2) * s.unsqueeze(1)  # [P, k, M d]
        sum_b = Gs - n[:, None] * g
        outer = torch.einsum("pk,pl->pkl", Gs, g)
        sum_bb = G @ S @ G.mT - outer - outer.mT + n[:, None, None] * torch.einsum("pk,pl->pkl", g, g)
        holds = moments.patterns.T.to(self.dtype)  # [M, P]: the patterns in which m is observed
        n_obs = holds @ n
        St = torch.zeros(num_modalities, k + 1, k + 1, dtype=self.dtype, device=self.W.device)
        St[:, :k, :k] = torch.einsum("mp,pkl->mkl", holds, n[:, None, None] * V + sum_bb)
        St[:, :k, k] = St[:, k, :k] = holds @ sum_b
        St[:, k, k] = n_obs
        zb = torch.einsum("mp,pkmd->mdk", holds, bx.reshape(-1, k, num_modalities, d))
        zs = torch.einsum("mp,pmd->md", holds, s.reshape(-1, num_modalities, d))
        diagonal = torch.diagonal(S, dim1=1, dim2=2).reshape(-1, num_modalities, d).sum(2)  # [P, M]
        return {
            "n_obs": n_obs,
            "sum_z_bt": torch.cat([zb, zs.unsqueeze(2)], dim=2),
            "sum_St": St,
            "sum_zsq": (holds * diagonal.T).sum(1),
        }

    def log_likelihood_from_moments(self, moments: PatternMoments) -> float:
        """`log_likelihood` (the mean over samples) of the data the moments summarise:
        sum_i (x_i - mu)^T C^-1 (x_i - mu) = tr(D^-1 M2) - tr(V A M2 A^T) with
        M2 = sum (x - mu)(x - mu)^T (Woodbury), log det C = log det P_O + d sum log sigma2."""
        d = self.dim
        V, A, _, mu = self._pattern_maps(moments.patterns)
        n, s, S = moments.counts, moments.first, moments.second
        cross = s.unsqueeze(2) * mu.unsqueeze(1)
        centred = S - cross - cross.mT + n[:, None, None] * mu.unsqueeze(2) * mu.unsqueeze(1)
        block = moments.patterns.to(self.dtype).repeat_interleave(d, dim=1)
        inv_noise = (1.0 / self.sigma2).repeat_interleave(d).unsqueeze(0) * block
        quad = (torch.diagonal(centred, dim1=1, dim2=2) * inv_noise).sum(1)
        quad = quad - torch.einsum("pkl,plk->p", V, A @ centred @ A.mT)
        chol = torch.linalg.cholesky(self._pattern_precision(moments.patterns))
        logdet = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        logdet = logdet + moments.patterns.to(self.dtype) @ (d * self.sigma2.log())
        dims = d * moments.patterns.to(self.dtype).sum(1)
        total = -0.5 * (n * (dims * _LOG_2PI + logdet) + quad)
        return float(total.sum() / n.sum().clamp_min(1.0))

    # ----------------------------------------------------------- inspection

    def converted(self, dtype: torch.dtype) -> Calibrator:
        """A copy whose state, statistics and arithmetic are in `dtype` (e.g. float64 for an exact fit)."""
        copy = deepcopy(self)
        copy.dtype = dtype
        return copy.to(dtype)

    def params(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """modality -> (W [d, k], mu [d], sigma2), copies of the current state."""
        return {
            name: (self.W[j].clone(), self.mu[j].clone(), float(self.sigma2[j]))
            for j, name in enumerate(self.modalities)
        }

    def get_extra_state(self) -> dict[str, Any]:
        # Saved so that a checkpoint cannot be loaded into a calibrator whose
        # modality order differs, which would silently swap their parameters.
        return {"modalities": list(self.modalities), "dim": self.dim, "latent_dim": self.latent_dim}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        expected = self.get_extra_state()
        if state != expected:
            raise ValueError(f"calibrator checkpoint is for {state}, this calibrator is {expected}")

    def extra_repr(self) -> str:
        return (
            f"modalities={self.modalities}, dim={self.dim}, latent_dim={self.latent_dim}, "
            f"decay={self.decay}, sigma2_floor={self.sigma2_floor}, dtype={self.dtype}"
        )
