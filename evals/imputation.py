"""Imputation quality: hide a modality of complete instances, fill it in, and
measure the distance to the true representation.

Methods: the calibrator's posterior-mean imputation (CalMRL), the modality's
mean embedding (mean-fill) and a random unit vector (random-fill). Errors are
the mean cosine distance (1 - cos) and the mean squared error of unit vectors.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from pretrain.calibration import Calibrator


@torch.no_grad()
def imputation_error(
    emb: dict[str, torch.Tensor],
    calibrator: Calibrator | None,
    modalities: list[str] | tuple[str, ...],
    means: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {hidden modality: {"cosine": ..., "mse": ...}}} on complete instances `emb`.

    `means` (modality -> mean embedding, e.g. over the training split) feeds
    mean-fill; by default the mean over `emb` itself."""
    modalities = list(modalities)
    n = next(iter(emb.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, dict[str, float]]] = {"mean_fill": {}, "random_fill": {}}
    if calibrator is not None:
        out["calmrl"] = {}
    for j, m in enumerate(modalities):
        truth = F.normalize(emb[m].float(), dim=1)
        fills = {
            "mean_fill": F.normalize((means[m] if means else truth.mean(0)).float(), dim=0).expand(n, -1),
            "random_fill": F.normalize(torch.randn(n, truth.shape[1], generator=gen), dim=1),
        }
        if calibrator is not None:
            present = torch.ones(n, len(modalities), dtype=torch.bool)
            present[:, j] = False
            fills["calmrl"] = calibrator.impute({k: v.float() for k, v in emb.items()}, present)[m].float()
        for method, fill in fills.items():
            out[method][m] = {
                "cosine": float((1 - (fill * truth).sum(1)).mean()),
                "mse": float((fill - truth).square().sum(1).mean()),
            }
    return out


@torch.no_grad()
def imputation_error_by_pattern(
    emb: dict[str, torch.Tensor],
    calibrators: dict[str, Calibrator],
    modalities: list[str] | tuple[str, ...],
    means: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{observed pattern: {method: mean cosine distance over its hidden modalities}}
    on complete instances, for every pattern with at least one modality hidden
    (the single-observed ones included). Methods: each of `calibrators` by
    name, mean-fill and random-fill."""
    modalities = list(modalities)
    n = next(iter(emb.values())).shape[0]
    out: dict[str, dict[str, float]] = {}
    for size in range(1, len(modalities)):
        for observed in combinations(range(len(modalities)), size):
            present = torch.zeros(n, len(modalities), dtype=torch.bool)
            present[:, list(observed)] = True
            hidden = [m for j, m in enumerate(modalities) if j not in observed]
            gen = torch.Generator().manual_seed(seed)
            fills: dict[str, dict[str, torch.Tensor]] = {
                "mean_fill": {
                    m: F.normalize((means[m] if means else emb[m].mean(0)).float(), dim=0).expand(n, -1) for m in hidden
                },
                "random_fill": {m: F.normalize(torch.randn(n, emb[m].shape[1], generator=gen), dim=1) for m in hidden},
            }
            for name, cal in calibrators.items():
                imputed = cal.impute({k: v.float() for k, v in emb.items()}, present)
                fills[name] = {m: imputed[m].float() for m in hidden}
            row = {}
            for method, filled in fills.items():
                errors = [(1 - (filled[m] * F.normalize(emb[m].float(), dim=1)).sum(1)).mean() for m in hidden]
                row[method] = float(torch.stack(errors).mean())
            out["+".join(modalities[j] for j in observed)] = row
    return out
