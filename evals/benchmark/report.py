"""The benchmark's report: tables in the paper's layout (Markdown), every run (JSON, CSV), a plot.

Per data set: one headline table (rows: objective x method, columns: missing
rates; each cell "own rule / cosine" R@1, mean ± std over seeds) with the
stage-1 start, the ceiling and chance; the paired differences CalMRL minus
each baseline with 95% intervals; anchor shift and imputation error per
missing pattern; and the goal checks.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_save_figure, atomic_write
from evals.benchmark.aggregate import aggregate, goal_verdicts
from evals.benchmark.presets import METHODS, Preset
from evals.benchmark.stats import Summary

OWN_RULE = {"gram": "volume_R@1", "pmrl": "anchor_R@1", "pairwise": "cos_R@1"}


def _cell(s: Summary | None, digits: int = 3) -> str:
    if s is None or not s.n or math.isnan(s.mean):
        return "-"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _both(cell: dict[str, Summary]) -> str:
    own, cos = cell.get("own_R@1"), cell.get("cos_R@1")
    return f"{_cell(own)} / {_cell(cos)}"


def _diff(s: Summary) -> str:
    if not s.n or math.isnan(s.mean):
        return "-"
    mark = " ✔" if s.above_zero else (" ✘" if s.below_zero else "")
    return f"{s.mean:+.4f} [{s.low:+.4f}, {s.high:+.4f}]{mark}"


def _pattern_table(title: str, by_rate: dict[str, Any], kinds: tuple[str, ...], rates: list[str]) -> list[str]:
    """A table per missing pattern (rows) and rate (columns); a cell is the kinds' means joined by " / "."""
    lines = [
        title,
        "",
        "| observed | " + " | ".join(f"missing {r}" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for pattern in next(iter(by_rate.values()), {}):
        cells = [
            " / ".join(f"{by_rate[r][pattern][k].mean:.3f}" if by_rate[r][pattern][k].n else "-" for k in kinds)
            for r in rates
        ]
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    rates = report["rates"]
    for dataset, parts in report["summary"].items():
        info = report["datasets"].get(dataset, {})
        ceiling = info.get("ceiling") or {}
        lines += [
            f"### {dataset}: R@1 on the {info.get('n_eval', '?')} complete {info.get('split', 'test')} instances, "
            "own rule / cosine (mean ± std over seeds)",
            "",
        ]
        facts = [
            f"chance {info['chance']:.4f}" if info.get("chance") else "",
            f"ceiling (retrieval by what the modalities carry): cosine pairs {ceiling['mean_R@1']:.3f}, "
            f"joint {0.5 * (ceiling['joint:anchor->data'] + ceiling['joint:data->anchor']):.3f}"
            if ceiling
            else "",
        ]
        lines += ["; ".join(f for f in facts if f) + ".", ""]
        lines += [
            "| objective | method | " + " | ".join(f"missing {r}" for r in rates) + " |",
            "|---|---|" + "---|" * len(rates),
        ]
        s1 = parts["stage1"]
        for objective, methods in parts["cells"].items():
            if s1:  # the start of every stage-2 run, scored by this objective's rule
                own = s1.get(OWN_RULE.get(objective, "cos_R@1"))
                cell = f"{_cell(own)} / {_cell(s1.get('cos_R@1'))}"
                lines.append(f"| {objective} | stage 1 (the start) | " + " | ".join(cell for _ in rates) + " |")
            for method in (m for m in METHODS if m in methods):
                lines.append(
                    f"| {objective} | {method} | " + " | ".join(_both(methods[method][r]) for r in rates) + " |"
                )
        lines.append("")
        if parts["paired"]:
            lines += [
                f"{dataset}: paired difference CalMRL minus baseline, R@1 by the objective's own rule and by "
                "cosine, per seed: mean [95% interval] (✔ above zero, ✘ below)",
                "",
                "| objective | baseline | "
                + " | ".join(f"{kind}, missing {r}" for r in rates for kind in ("own rule", "cosine"))
                + " |",
                "|---|---|" + "---|" * 2 * len(rates),
            ]
            for objective, baselines in parts["paired"].items():
                for baseline, by_rate in baselines.items():
                    lines.append(
                        f"| {objective} | {baseline} | "
                        + " | ".join(_diff(by_rate[r][m]) for r in rates for m in ("own_R@1", "cos_R@1"))
                        + " |"
                    )
            lines.append("")
        for objective, by_rate in parts["shift"].items():
            lines += _pattern_table(
                f"{dataset}, {objective}, CalMRL runs: anchor shift per observed pattern on complete "
                "evaluation instances, local / calibrated (run's state) / calibrated (exact refit)",
                by_rate,
                ("observed_only", "calibrated", "calibrated_refit"),
                rates,
            )
            lines += _pattern_table(
                f"{dataset}, {objective}, CalMRL runs: imputation error (cosine distance) of the hidden "
                "modalities per observed pattern, CalMRL / exact refit / mean-fill / random-fill",
                parts["impute"][objective],
                ("calmrl", "calmrl_refit", "mean_fill", "random_fill"),
                rates,
            )
    if report["goal"]:
        lines += [
            "### Goal checks",
            "",
            "| data set | objective | missing | check | value | met |",
            "|---|---|---|---|---|---|",
        ]
        for v in report["goal"]:
            value = (
                f"{v['value']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]"
                if "R@1" in v["check"]
                else f"{v['value']:.0f} of {v['high']:.0f} patterns"
                + (f" (not: {', '.join(v['failing'])})" if v.get("failing") else "")
            )
            lines.append(
                f"| {v['dataset']} | {v['objective']} | {v['rate']} | {v['check']} | {value} | "
                f"{'yes' if v['met'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    panels = [(d, o) for d, parts in summary.items() for o in parts["cells"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    rates = [float(r) for r in report["rates"]]
    for ax, (dataset, objective) in zip(axes[0], panels):
        methods = summary[dataset]["cells"][objective]
        for method in (m for m in METHODS if m in methods):
            means = [methods[method][f"{r:g}"]["own_R@1"].mean for r in rates]
            stds = [methods[method][f"{r:g}"]["own_R@1"].std for r in rates]
            if method == "oracle":
                ax.axhline(means[0], color="black", ls="--", label=f"oracle {means[0]:.3f}")
                continue
            ax.errorbar(
                rates, means, yerr=stds, marker="o", capsize=3, label=method, lw=2.5 if method == "calmrl" else 1.2
            )
        stage1 = summary[dataset]["stage1"].get("cos_R@1")
        if stage1 is not None and stage1.n:
            ax.axhline(stage1.mean, color="grey", ls=":", label=f"stage 1 (cosine) {stage1.mean:.3f}")
        ax.set_title(f"{dataset}: {objective}", fontsize=10)
        ax.set_xlabel("imposed missing rate")
        ax.set_ylabel("R@1, the objective's own rule")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Summary):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def write_report(results: list[dict[str, Any]], out: Path, preset: Preset, datasets: dict[str, Any]) -> dict[str, Any]:
    """benchmark.json (every run and every summary), .csv (one row per run), .md and .png."""
    summary = aggregate(results, preset.rates)
    report = {
        "rates": [f"{r:g}" for r in preset.rates],
        "summary": summary,
        "datasets": datasets,
        "goal": goal_verdicts(summary),
        "runs": results,
    }
    atomic_write(out / "benchmark.json", json.dumps(_jsonable(report), indent=1))
    columns = sorted({k for r in results for k in r["summary"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "objective", "method", "rate", "seed", "train_samples", "steps", "train_s", *columns])
    for r in results:
        writer.writerow(
            [
                r["dataset"],
                r["objective"],
                r["method"],
                r["rate"],
                r["seed"],
                r["train_samples"],
                r["steps"],
                f"{r['train_s']:.1f}",
                *[r["summary"].get(c, "") for c in columns],
            ]
        )
    atomic_write(out / "benchmark.csv", buffer.getvalue())
    atomic_write(out / "benchmark.md", markdown(report))
    plot(report, out / "benchmark.png")
    return report
