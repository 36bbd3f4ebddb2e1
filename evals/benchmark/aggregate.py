"""Aggregating benchmark runs over seeds, and the goal check."""

from __future__ import annotations

import math
from typing import Any


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{dataset: {method: {rate: {metric: [mean, std, n]}}}} over seeds."""
    groups: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"], r["rate"]), []).append(r["summary"])
    out: dict[str, Any] = {}
    for (dataset, method, rate), rows in sorted(groups.items()):
        metrics = sorted({k for row in rows for k in row})
        cell = {k: [*_mean_std([row.get(k, float("nan")) for row in rows]), len(rows)] for k in metrics}
        out.setdefault(dataset, {}).setdefault(method, {})[f"{rate:g}"] = cell
    return out


def goal_verdicts(summary: dict[str, Any], rates: tuple[str, ...] = ("0.5", "0.7")) -> list[dict[str, Any]]:
    """The first benchmark's goal, per data set and rate: CalMRL's mean R@1 above observed-only
    and above drop-incomplete by more than the seed spread (the larger of the two
    standard deviations), and calibrated anchor shift and CalMRL imputation error
    below their references."""
    verdicts = []
    for dataset, methods in summary.items():
        for rate in rates:
            cal = methods.get("calmrl", {}).get(rate)
            if cal is None:
                continue
            for baseline in ("observed_only", "drop_incomplete"):
                other = methods.get(baseline, {}).get(rate)
                if other is None:
                    continue
                margin = cal["mean_R@1"][0] - other["mean_R@1"][0]
                spread = max(cal["mean_R@1"][1], other["mean_R@1"][1])
                verdicts.append(
                    {
                        "dataset": dataset,
                        "rate": rate,
                        "versus": baseline,
                        "margin": margin,
                        "spread": spread,
                        "met": margin > spread,
                    }
                )
            if "anchor_shift_calibrated" in cal:
                verdicts.append(
                    {
                        "dataset": dataset,
                        "rate": rate,
                        "versus": "anchor shift (observed-only anchor)",
                        "margin": cal["anchor_shift_observed"][0] - cal["anchor_shift_calibrated"][0],
                        "spread": cal["anchor_shift_calibrated"][1],
                        "met": cal["anchor_shift_calibrated"][0] < cal["anchor_shift_observed"][0],
                    }
                )
            if "imputation_cos_calmrl" in cal:
                best_fill = min(cal["imputation_cos_mean_fill"][0], cal["imputation_cos_random_fill"][0])
                verdicts.append(
                    {
                        "dataset": dataset,
                        "rate": rate,
                        "versus": "imputation error (best of mean/random fill)",
                        "margin": best_fill - cal["imputation_cos_calmrl"][0],
                        "spread": cal["imputation_cos_calmrl"][1],
                        "met": cal["imputation_cos_calmrl"][0] < best_fill,
                    }
                )
    return verdicts
