"""Writing an evaluation: `eval.json` (machines), `eval.md` and `eval.png` (people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write
from evals.plots import plot_eval


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| query -> key | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
    for pair, m in results["retrieval"].items():
        lines.append(f"| {pair} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.0f} |")
    if "anchor_shift" in results:
        lines += ["", "| observed pattern | anchor shift, observed only | anchor shift, calibrated |", "|---|---|---|"]
        for pattern, row in results["anchor_shift"].items():
            cal = f"{row['calibrated']:.3f}" if "calibrated" in row else "-"
            lines.append(f"| {pattern} | {row['observed_only']:.3f} | {cal} |")
    if "imputation_error" in results:
        methods = list(results["imputation_error"])
        lines += [
            "",
            "| hidden modality | " + " | ".join(f"{m} cos / mse" for m in methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for modality in results["imputation_error"][methods[0]]:
            cells = [
                f"{results['imputation_error'][m][modality]['cosine']:.3f} / "
                f"{results['imputation_error'][m][modality]['mse']:.3f}"
                for m in methods
            ]
            lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    if results.get("zero_shot"):
        lines += ["", "| zero-shot | top-1 | chance | n |", "|---|---|---|---|"]
        for modality, row in results["zero_shot"].items():
            lines.append(f"| {modality} | {row['top1']:.3f} | {row['chance']:.3f} | {row['n']} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "eval.json", json.dumps(results, indent=2))
    atomic_write(out_dir / "eval.md", markdown_table(results) + "\n")
    plot_eval(results, out_dir / "eval.png")
    return out_dir / "eval.json"
