"""A sweep's results: one row per trial, as CSV, a Markdown table and a bar plot."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from cluster.sweep.config import SweepConfig, trial_base_config
from data_pipeline.atomic import atomic_save_figure, atomic_write


def result_rows(grid: Any, sweep: SweepConfig) -> list[dict[str, Any]]:
    steps = int(trial_base_config(sweep)["train"]["steps"])
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        row: dict[str, Any] = {"trial": trial_id}
        for key in sweep.params:
            row[key] = (result.config or {}).get(key)
        reached = metrics.get("step")
        if result.error is not None:
            row["status"] = "error"
        elif reached is not None and reached < steps:
            row["status"] = f"stopped at step {reached}"
        else:
            row["status"] = "done"
        for key, value in metrics.items():
            if key in ("step", "loss", "samples_per_s", "checkpoint_path") or key.startswith("val/"):
                row[key] = value
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:200] if str(result.error).strip() else "error"
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _columns(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[str]:
    first = ["trial", *sweep.params, "status", "step", "loss", "samples_per_s"]
    val_main = ["val/mean_R@1", "val/mean_R@5", "val/mean_R@10", "val/num_complete"]
    keys = {k for r in rows for k in r}
    rest = sorted(k for k in keys if k not in first and k not in val_main and k not in ("checkpoint_path", "error"))
    return [c for c in first + val_main if c in keys] + rest + [c for c in ("checkpoint_path", "error") if c in keys]


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def markdown_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    shown = [
        c
        for c in ["step", "loss", "val/mean_R@1", "val/mean_R@5", "val/mean_R@10", "val/num_complete"]
        if any(c in r for r in rows)
    ]
    if sweep.metric not in shown and any(sweep.metric in r for r in rows):
        shown.append(sweep.metric)
    lines = [
        f"# Sweep {sweep.out_dir}",
        "",
        f"search: {sweep.search}, {len(rows)} trials, {sweep.workers_per_trial} workers each; "
        f"metric {sweep.metric} ({sweep.mode})",
        "",
        "| trial | params | status | " + " | ".join(shown) + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for r in rows:
        params = ", ".join(f"{k}={_fmt(r.get(k))}" for k in sweep.params)
        lines.append(f"| {r['trial']} | {params} | {r['status']} | " + " | ".join(_fmt(r.get(c)) for c in shown) + " |")
    best = best_row(rows, sweep.metric, sweep.mode)
    if best is not None:
        params = ", ".join(f"{k}={_fmt(best.get(k))}" for k in sweep.params)
        lines += [
            "",
            f"Best by {sweep.metric} ({sweep.mode}): trial {best['trial']} ({params}): {_fmt(best[sweep.metric])}",
        ]
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        lines.append(f"\nTrial {r['trial']} failed: {r['error']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], sweep: SweepConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={_fmt(r.get(k))}" for k in sweep.params) or r["trial"] for r in rows]
    values = [float(r[sweep.metric]) if isinstance(r.get(sweep.metric), (int, float)) else math.nan for r in rows]
    best = best_row(rows, sweep.metric, sweep.mode)
    colours = ["tab:orange" if best is not None and r is best else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4.0))
    bars = ax.bar(range(len(rows)), [0.0 if math.isnan(v) else v for v in values], color=colours)
    for bar, v in zip(bars, values):
        ax.annotate(
            "n/a" if math.isnan(v) else f"{v:.3g}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        labels, rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center", fontsize=8
    )
    ax.set_ylabel(sweep.metric)
    ax.set_title(
        f"{Path(sweep.out_dir).name}: {sweep.metric} per trial ({'higher' if sweep.mode == 'max' else 'lower'}"
        " is better)",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_results(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Path]:
    out = Path(sweep.out_dir)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png"}
    write_csv(rows, _columns(rows, sweep), paths["csv"])
    atomic_write(paths["md"], markdown_table(rows, sweep))
    plot(rows, sweep, paths["png"])
    return paths


def summary_line(rows: list[dict[str, Any]], sweep: SweepConfig, paths: dict[str, Path]) -> str:
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "error" for r in rows)
    best = best_row(rows, sweep.metric, sweep.mode)
    best_text = "no trial reported it"
    if best is not None:
        params = ", ".join(f"{k}={_fmt(best.get(k))}" for k in sweep.params)
        best_text = f"{_fmt(best[sweep.metric])} ({params}, trial {best['trial']})"
    return (
        f"sweep {sweep.out_dir}: {done}/{len(rows)} trials done, {failed} failed; "
        f"best {sweep.metric} {best_text}; table {paths['md']}"
    )
