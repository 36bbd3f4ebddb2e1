"""Writing an evaluation: `eval.json` (machines), `eval.md` and `eval.png` (people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write
from evals.plots import plot_eval

RETRIEVAL_HEADER = [
    "| query -> key | n | R@1 | chance R@1 | R@5 | R@10 | median rank |",
    "|---|---|---|---|---|---|---|",
]


def _retrieval_row(name: str, m: dict[str, float]) -> str:
    n = int(m.get("n", 0))
    chance = m.get("chance_R@1", 1.0 / n if n else float("nan"))
    return (
        f"| {name} | {n} | {m['R@1']:.3f} | {chance:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.0f} |"
    )


def markdown_table(results: dict[str, Any]) -> str:
    """The evaluation for people; every retrieval row names the items it ranks (n) and chance."""
    lines = [f"Retrieval among the {results.get('num_complete', '?')} complete instances (n keys each):", ""]
    lines += RETRIEVAL_HEADER
    for pair, m in results["retrieval"].items():
        lines.append(_retrieval_row(pair, m))
    for rule, m in results.get("joint_retrieval", {}).items():
        lines.append(_retrieval_row(rule, m))
    if results.get("pair_retrieval"):
        lines += ["", "Retrieval among every instance holding both modalities of the pair:", ""]
        lines += RETRIEVAL_HEADER
        for pair, m in results["pair_retrieval"].items():
            lines.append(_retrieval_row(pair, m))
    if "positive_cosine" in results:
        cosines = ", ".join(f"{pair} {value:+.3f}" for pair, value in results["positive_cosine"].items())
        lines += ["", f"Mean cosine of the positives (a negative one is a flipped sign): {cosines}"]
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
    by_pattern = results.get("imputation_by_pattern")
    if by_pattern:
        methods = list(next(iter(by_pattern.values())))
        lines += [
            "",
            "| observed pattern | " + " | ".join(f"{m} (cosine distance)" for m in methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for pattern, row in by_pattern.items():
            lines.append(f"| {pattern} | " + " | ".join(f"{row[m]:.3f}" for m in methods) + " |")
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
