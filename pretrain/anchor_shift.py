"""Anchor shift (docs/method.md, "Anchor shift, measured").

On complete instances, the anchor u is the leading left singular vector of
the full Z = [z^m]_m (d x |M|). Hiding the modalities outside a pattern O
gives the local anchor u_O (observed columns only) and the calibrated anchor
u_cal (observed columns + the calibrator's imputations of the hidden ones).
Signs are aligned to u; the shift is the mean |u - u_O| (and |u - u_cal|).
"""

from __future__ import annotations

from itertools import combinations

import torch

from pretrain.calibration import Calibrator


def leading_left_singular_vectors(z: torch.Tensor) -> torch.Tensor:
    """z [N, d, m] -> u [N, d], sign chosen so that u . mean column >= 0."""
    u = torch.linalg.svd(z.double(), full_matrices=False).U[:, :, 0]
    sign = torch.sign((u * z.double().mean(2)).sum(1, keepdim=True))
    return (u * torch.where(sign == 0, 1.0, sign)).float()


def _align(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    sign = torch.sign((v * ref).sum(1, keepdim=True))
    return v * torch.where(sign == 0, 1.0, sign)


@torch.no_grad()
def anchor_shift(
    emb: dict[str, torch.Tensor],
    calibrator: Calibrator | None,
    modalities: list[str] | tuple[str, ...],
    others: dict[str, Calibrator] | None = None,
) -> dict[str, dict[str, float]]:
    """Per missing pattern (named by its observed modalities): mean shift of the
    local anchor and, with a calibrator, of the calibrated anchor
    ("calibrated"); each of `others` (e.g. an exact refit) adds
    "calibrated_<name>".

    `emb` holds complete instances only (every modality, [N, d] each)."""
    modalities = list(modalities)
    full = torch.stack([emb[m].float() for m in modalities], dim=2)  # [N, d, M]
    n = full.shape[0]
    u = leading_left_singular_vectors(full)
    out: dict[str, dict[str, float]] = {}
    for size in range(1, len(modalities)):
        for observed in combinations(range(len(modalities)), size):
            name = "+".join(modalities[i] for i in observed)
            u_obs = _align(leading_left_singular_vectors(full[:, :, list(observed)]), u)
            row = {"n": float(n), "observed_only": float((u - u_obs).norm(dim=1).mean())}
            present = torch.zeros(n, len(modalities), dtype=torch.bool)
            present[:, list(observed)] = True
            named = {"calibrated": calibrator} if calibrator is not None else {}
            named.update({f"calibrated_{k}": c for k, c in (others or {}).items()})
            for key, cal in named.items():
                filled = cal.impute({m: emb[m].float() for m in modalities}, present)
                completed = torch.stack([filled[m].float() for m in modalities], dim=2)
                u_cal = _align(leading_left_singular_vectors(completed), u)
                row[key] = float((u - u_cal).norm(dim=1).mean())
            out[name] = row
    return out
