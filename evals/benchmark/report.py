"""The benchmark's report: tables (Markdown), every run (JSON, CSV), and a plot."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_save_figure, atomic_write
from evals.benchmark.aggregate import aggregate, goal_verdicts
from evals.benchmark.presets import METHODS


def _cell(stat: list[float] | None) -> str:
    if stat is None or math.isnan(stat[0]):
        return "-"
    return f"{stat[0]:.3f} ± {stat[1]:.3f}"


def markdown(summary: dict[str, Any], verdicts: list[dict[str, Any]], rates: list[str]) -> str:
    lines: list[str] = []
    for dataset, methods in summary.items():
        lines += [
            f"### {dataset}: mean R@1 over the six modality pairs (complete test instances; mean ± std over seeds)",
            "",
            "| method | " + " | ".join(f"missing {r}" for r in rates) + " |",
            "|---|" + "---|" * len(rates),
        ]
        for method in METHODS:
            if method not in methods:
                continue
            if method == "oracle":
                cells = [_cell(next(iter(methods[method].values()))["mean_R@1"])] * len(rates)
            else:
                cells = [_cell(methods[method].get(r, {}).get("mean_R@1")) for r in rates]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        cal = methods.get("calmrl", {})
        if cal:
            lines += [
                "",
                f"{dataset}, CalMRL runs: mean anchor shift over missing patterns and mean imputation "
                "cosine distance over hidden modalities",
                "",
                "| missing | anchor shift observed-only | anchor shift calibrated | "
                "imputation CalMRL | mean-fill | random-fill |",
                "|---|---|---|---|---|---|",
            ]
            for r in rates:
                c = cal.get(r, {})
                lines.append(
                    f"| {r} | "
                    + " | ".join(
                        _cell(c.get(k))
                        for k in (
                            "anchor_shift_observed",
                            "anchor_shift_calibrated",
                            "imputation_cos_calmrl",
                            "imputation_cos_mean_fill",
                            "imputation_cos_random_fill",
                        )
                    )
                    + " |"
                )
        lines.append("")
    if verdicts:
        lines += [
            "### Goal (CalMRL better by more than the seed spread)",
            "",
            "| data set | missing | versus | margin | spread | met |",
            "|---|---|---|---|---|---|",
        ]
        for v in verdicts:
            lines.append(
                f"| {v['dataset']} | {v['rate']} | {v['versus']} | {v['margin']:+.3f} | "
                f"{v['spread']:.3f} | {'yes' if v['met'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.2), squeeze=False)
    for ax, (dataset, methods) in zip(axes[0], summary.items()):
        for method in METHODS:
            if method not in methods:
                continue
            if method == "oracle":
                mean, std, _ = next(iter(methods[method].values()))["mean_R@1"]
                ax.axhline(mean, color="black", ls="--", label=f"oracle (complete data) {mean:.3f}")
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
                continue
            rates = sorted(methods[method], key=float)
            ax.errorbar(
                [float(r) for r in rates],
                [methods[method][r]["mean_R@1"][0] for r in rates],
                yerr=[methods[method][r]["mean_R@1"][1] for r in rates],
                marker="o",
                capsize=3,
                label=method,
                lw=2.5 if method == "calmrl" else 1.2,
            )
        ax.set_title(f"{dataset}: mean R@1 (test, complete)")
        ax.set_xlabel("extra missing rate imposed on the training split")
        ax.set_ylabel("mean R@1 over 6 modality pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict[str, Any]], out: Path, rates: list[str]) -> tuple[dict[str, Any], list]:
    summary = aggregate(results)
    verdicts = goal_verdicts(summary)
    atomic_write(out / "benchmark.json", json.dumps({"summary": summary, "goal": verdicts, "runs": results}, indent=1))
    columns = sorted({k for r in results for k in r["summary"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "method", "rate", "seed", "train_samples", "steps", "train_s", *columns])
    for r in results:
        writer.writerow(
            [
                r["dataset"],
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
    atomic_write(out / "benchmark.md", markdown(summary, verdicts, rates))
    plot(summary, out / "benchmark.png")
    return summary, verdicts
