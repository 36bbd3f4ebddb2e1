"""Aggregating benchmark runs over seeds: cell summaries, paired differences, the goal.

Every figure is a `Summary` (mean, std, n, 95% interval) over seeds. CalMRL is
compared with each baseline by the paired difference per seed (the same
hidden entries and the same stage-1 start), never by overlapping spreads.
"""

from __future__ import annotations

from typing import Any

from evals.benchmark.presets import OBJECTIVES
from evals.benchmark.stats import Summary, paired_difference, summarise

BASELINES = ("observed_only", "drop_incomplete", "mean_fill", "oracle")
HEADLINE = ("own_R@1", "cos_R@1")  # each objective's own rule, and cosine for all
GOAL_RATES = (0.5, 0.7)
GOAL_OBJECTIVES = ("pmrl", "gram")


def _by_seed(
    results: list[dict[str, Any]], dataset: str, objective: str, method: str, rate: float, metric: str
) -> dict[int, float]:
    out = {}
    for r in results:
        if (r["dataset"], r["objective"], r["method"]) != (dataset, objective, method):
            continue
        if method not in ("oracle", "stage1") and abs(r["rate"] - rate) > 1e-9:
            continue
        if metric in r["summary"]:
            out[int(r["seed"])] = float(r["summary"][metric])
    return out


def aggregate(results: list[dict[str, Any]], rates: tuple[float, ...]) -> dict[str, Any]:
    """{dataset: {"stage1", "cells", "paired", "shift", "impute"}} (see the module doc)."""
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in results}):
        mine = [r for r in results if r["dataset"] == dataset]
        metrics = sorted({k for r in mine for k in r["summary"]})
        stage1 = {m: summarise(list(_by_seed(mine, dataset, "pairwise", "stage1", 0.0, m).values())) for m in metrics}
        cells: dict[str, Any] = {}
        paired: dict[str, Any] = {}
        shift: dict[str, Any] = {}
        impute: dict[str, Any] = {}
        present = {r["objective"] for r in mine if r["method"] != "stage1"}
        objectives = [o for o in OBJECTIVES if o in present] + sorted(present - set(OBJECTIVES))
        for objective in objectives:
            methods = sorted({r["method"] for r in mine if r["objective"] == objective and r["method"] != "stage1"})
            cells[objective] = {
                method: {
                    f"{rate:g}": {
                        m: summarise(list(_by_seed(mine, dataset, objective, method, rate, m).values()))
                        for m in HEADLINE
                    }
                    for rate in rates
                }
                for method in methods
            }
            if "calmrl" not in methods:
                continue
            paired[objective] = {
                baseline: {
                    f"{rate:g}": {
                        m: paired_difference(
                            _by_seed(mine, dataset, objective, "calmrl", rate, m),
                            _by_seed(mine, dataset, objective, baseline, rate, m),
                        )
                        for m in HEADLINE
                    }
                    for rate in rates
                }
                for baseline in BASELINES
                if baseline in methods
            }
            shift[objective] = _per_pattern(
                mine, dataset, objective, rates, "shift", ("observed_only", "calibrated", "calibrated_refit")
            )
            impute[objective] = _per_pattern(
                mine, dataset, objective, rates, "impute", ("calmrl", "calmrl_refit", "mean_fill", "random_fill")
            )
        out[dataset] = {"stage1": stage1, "cells": cells, "paired": paired, "shift": shift, "impute": impute}
    return out


def _per_pattern(
    mine: list[dict[str, Any]],
    dataset: str,
    objective: str,
    rates: tuple[float, ...],
    prefix: str,
    kinds: tuple[str, ...],
) -> dict[str, Any]:
    """{rate: {pattern: {kind: Summary}}} of the CalMRL runs' `PREFIX_KIND PATTERN` summary entries
    (anchor shift or imputation error per missing pattern); patterns are those of the first kind."""
    cal = [r for r in mine if r["objective"] == objective and r["method"] == "calmrl"]
    first = f"{prefix}_{kinds[0]} "
    patterns = sorted({k.split(" ", 1)[1] for r in cal for k in r["summary"] if k.startswith(first)})
    return {
        f"{rate:g}": {
            p: {
                kind: summarise(
                    list(_by_seed(mine, dataset, objective, "calmrl", rate, f"{prefix}_{kind} {p}").values())
                )
                for kind in kinds
            }
            for p in patterns
        }
        for rate in rates
    }


def _pattern_verdict(
    dataset: str, objective: str, rate: str, check: str, patterns: int, worse: list[str]
) -> dict[str, Any]:
    """A goal check that must hold on every missing pattern: met when `worse` is empty."""
    return {
        "dataset": dataset,
        "objective": objective,
        "rate": rate,
        "check": check,
        "value": float(patterns - len(worse)),
        "low": 0.0,
        "high": float(patterns),
        "met": not worse,
        "failing": worse,
    }


def goal_verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal: at each goal rate, CalMRL above observed-only with each joint objective
    (paired 95% interval of the own-rule R@1 above zero), and the calibrated anchor shift
    and CalMRL's imputation error below their references on every missing pattern."""
    verdicts = []
    for dataset, parts in summary.items():
        for objective in GOAL_OBJECTIVES:
            for rate in (f"{r:g}" for r in GOAL_RATES):
                diff = parts["paired"].get(objective, {}).get("observed_only", {}).get(rate, {}).get("own_R@1")
                if isinstance(diff, Summary) and diff.n:
                    verdicts.append(
                        {
                            "dataset": dataset,
                            "objective": objective,
                            "rate": rate,
                            "check": "R@1 (own rule): CalMRL - observed-only",
                            "value": diff.mean,
                            "low": diff.low,
                            "high": diff.high,
                            "met": diff.above_zero,
                        }
                    )
                shifts = parts["shift"].get(objective, {}).get(rate, {})
                if shifts:
                    worse = [p for p, k in shifts.items() if not k["calibrated"].mean < k["observed_only"].mean]
                    check = "anchor shift calibrated < local, every pattern"
                    verdicts.append(_pattern_verdict(dataset, objective, rate, check, len(shifts), worse))
                fills = parts["impute"].get(objective, {}).get(rate, {})
                if fills:
                    worse = [
                        p
                        for p, f in fills.items()
                        if not f["calmrl"].mean < min(f["mean_fill"].mean, f["random_fill"].mean)
                    ]
                    check = "imputation error CalMRL < mean/random fill, every pattern"
                    verdicts.append(_pattern_verdict(dataset, objective, rate, check, len(fills), worse))
    return verdicts
