"""Completing incomplete tuples before alignment: CalMRL and the baselines.

`Completion` turns a batch of observed embeddings into what the objective
aligns: embeddings for every modality, plus `observed` (encoded) and
`available` (observed or filled) masks. The method decides how:

- calmrl: the bi-step of docs/method.md. Step A (no gradient): E-step on detached
  features, all-reduced statistics, M-step every `update_every` optimizer
  steps. Step B: impute missing modalities with the current state (gradient
  flows through the posterior mean into the observed encoders when
  `grad_through_imputation`). During `warmup_steps` only observed modalities
  are aligned while the calibrator is fitted.
- observed_only: align what is present (the "local anchor" baseline).
- drop_incomplete: only complete tuples take part in the loss.
- mean_fill: a missing vector is the (running, all-ranks) mean of that
  modality's embeddings, normalised; no gradient through the fill.

Every rank calls `complete` and `end_step` at the same steps (they hold
collectives), whatever its local data.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.calibration import Calibrator
from pretrain.config import CalibrationConfig
from pretrain.distributed import all_reduce_sum


@dataclass
class Completed:
    emb: dict[str, torch.Tensor]
    observed: torch.Tensor  # [B, M] bool: encoded from data
    available: torch.Tensor  # [B, M] bool: observed or filled in


class MeanFiller(torch.nn.Module):
    """Decayed running mean of each modality's embedding over all ranks."""

    sums: torch.Tensor  # [M, d]
    counts: torch.Tensor  # [M]

    def __init__(self, num_modalities: int, dim: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("sums", torch.zeros(num_modalities, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_modalities, dtype=torch.float64))

    @torch.no_grad()
    def update(self, emb: list[torch.Tensor], present: torch.Tensor) -> None:
        mask = present.T.unsqueeze(-1).to(torch.float64)  # [M, B, 1]
        stacked = torch.stack([e.detach().to(torch.float64) for e in emb])  # [M, B, D]
        batch = torch.cat([(stacked * mask).sum(1), mask.sum(1)], dim=1)  # [M, D+1]
        batch = all_reduce_sum(batch.to(self.sums.device))
        finite = torch.isfinite(batch).all()  # a diverging step's embeddings are refused (same on every rank)
        keep = torch.where(finite, self.decay, 1.0).to(batch.dtype)
        batch = torch.where(finite, batch, torch.zeros_like(batch))
        self.sums.mul_(keep).add_(batch[:, :-1])
        self.counts.mul_(keep).add_(batch[:, -1])

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1e-12).unsqueeze(1)


class Completion(torch.nn.Module):
    def __init__(self, cfg: CalibrationConfig, modalities: tuple[str, ...], dim: int, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.modalities = tuple(modalities)
        self.calibrator: Calibrator | None = None
        self.filler: MeanFiller | None = None
        if cfg.method == "calmrl":
            self.calibrator = Calibrator(
                list(modalities),
                dim,
                cfg.latent_dim,
                decay=cfg.decay,
                sigma2_floor=cfg.sigma2_floor,
                normalize_imputed=cfg.normalize_imputed,
                init_scale=cfg.init_scale,
                seed=seed,
                dtype=getattr(torch, cfg.dtype),
            )
        elif cfg.method == "mean_fill":
            self.filler = MeanFiller(len(modalities), dim, cfg.decay)
        # Features of the last micro-batches for exact fits (not checkpointed: a resumed
        # run refills it before its next refit).
        self._recent: deque[tuple[dict[str, torch.Tensor], torch.Tensor]] = deque(maxlen=cfg.exact_fit_batches)
        self.fit_history: list[float] = []  # log-likelihood per EM iteration of the last exact fit

    def imputing(self, step: int) -> bool:
        """Whether step `step` (0-based optimizer step) aligns filled-in modalities."""
        if self.cfg.method == "calmrl":
            return step >= self.cfg.warmup_steps
        return self.cfg.method == "mean_fill"

    def observed(self, present: torch.Tensor) -> torch.Tensor:
        """[B, M]: the encoded modalities that take part (drop_incomplete: complete rows only)."""
        if self.cfg.method == "drop_incomplete":
            return present & present.all(1, keepdim=True)
        return present

    def available(self, present: torch.Tensor, step: int) -> torch.Tensor:
        """[B, M]: what the objective aligns at step `step`, observed or filled in. A
        function of `present` alone, so the trainer counts imputations on the host
        from the batch's own mask, without reading anything back from the device."""
        method = self.cfg.method
        has_any = present.any(1, keepdim=True)
        if method == "mean_fill":
            return has_any.expand_as(present)
        if method != "calmrl" or not self.imputing(step):
            return self.observed(present)
        # Rows with fewer than impute_min_observed modalities keep only what they have:
        # imputations from a single vector add nothing beyond that vector (docs/benchmark.md).
        enough = present.sum(1, keepdim=True) >= self.cfg.impute_min_observed
        return torch.where(enough, has_any, present)

    def complete(self, emb: dict[str, torch.Tensor], present: torch.Tensor, step: int) -> Completed:
        method = self.cfg.method
        observed, available = self.observed(present), self.available(present, step)
        if method in ("drop_incomplete", "observed_only"):
            return Completed(emb, observed, available)
        if method == "mean_fill":
            assert self.filler is not None
            self.filler.update([emb[m] for m in self.modalities], present)
            means = F.normalize(self.filler.means().to(present.device, torch.float32), dim=-1)
            filled = {
                m: torch.where(present[:, i : i + 1], emb[m], means[i].to(emb[m].dtype))
                for i, m in enumerate(self.modalities)
            }
            return Completed(filled, present, available)
        # calmrl: step A, statistics from detached features (every rank, every micro-step)
        assert self.calibrator is not None
        detached = {m: e.detach() for m, e in emb.items()}
        if self.cfg.exact_fit:
            self._recent.append(({m: e.float() for m, e in detached.items()}, present))
        if not self.imputing(step):
            self.calibrator.accumulate(detached, present)
            return Completed(emb, present, available)
        # step B: impute with the current state (the M-step runs in end_step, after
        # the optimizer step, so statistics and imputation share one E-step)
        if self.cfg.grad_through_imputation:
            completed = self.calibrator.accumulate_and_impute(emb, present)  # observed rows are emb's
        else:
            imputed = self.calibrator.accumulate_and_impute(detached, present)
            completed = {
                m: torch.where(present[:, i : i + 1], emb[m], imputed[m].to(emb[m].dtype))
                for i, m in enumerate(self.modalities)
            }
        return Completed(completed, present, available)

    def end_step(self, step: int) -> None:
        """After optimizer step `step` (1-based count of finished steps): an exact
        fit when one is due (it replaces that step's M-step), else the M-step
        every `update_every` steps."""
        if self.calibrator is None:
            return
        if self.cfg.exact_fit and self._refit_due(step) and self._recent:
            z = {m: torch.cat([batch[m] for batch, _ in self._recent]) for m in self.modalities}
            present = torch.cat([p for _, p in self._recent])
            self.fit_history = self.calibrator.fit_exact(z, present, self.cfg.exact_fit_iters, self.cfg.exact_fit_tol)
            return
        if step % self.cfg.update_every == 0:
            self.calibrator.m_step()

    def _refit_due(self, step: int) -> bool:
        warmup, every = self.cfg.warmup_steps, self.cfg.refit_every
        return step == warmup or (every > 0 and step > warmup and (step - warmup) % every == 0)

    def log_likelihood(self, emb: dict[str, torch.Tensor], present: torch.Tensor) -> float | None:
        if self.calibrator is None or not present.any():
            return None
        return self.calibrator.log_likelihood({m: e.detach() for m, e in emb.items()}, present)

    def extra_metrics(self) -> dict[str, Any]:
        """The calibrator's noise variances (read from the device: log steps only)."""
        if self.calibrator is None:
            return {}
        sigma2 = self.calibrator.sigma2.tolist()
        out: dict[str, Any] = {f"calibrator/sigma2/{m}": s for m, s in zip(self.modalities, sigma2)}
        out["calibrator/refused_batches"] = int(self.calibrator.refused.item())
        return out
