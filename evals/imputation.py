"""Imputation quality: hide a modality of complete instances, fill it in, and
measure the distance to the true representation.

Methods: the calibrator's posterior-mean imputation (CalMRL), the modality's
mean embedding (mean-fill) and a random unit vector (random-fill). Errors are
the mean cosine distance (1 - cos) and the mean squared error of unit vectors.
"""

from __future__ import annotations

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
