"""`calmrl eval`: retrieval between every ordered pair of modalities on the
complete instances of a split, written as JSON and a Markdown table."""
from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path
from typing import Any

from evals.anchor_shift import anchor_shift
from evals.embed import embed_split, load_completion, load_run
from evals.retrieval import retrieval_metrics
from pretrain.config import MODALITIES


def evaluate_run(run_dir: str | Path, split_dir: str | Path, tag: str = "latest") -> dict[str, Any]:
    cfg, model, tag = load_run(run_dir, tag)
    data = embed_split(model, cfg, split_dir)
    complete = data["present"].all(1)
    results: dict[str, Any] = {"run": str(run_dir), "checkpoint": tag, "split": str(split_dir),
                               "num_samples": len(data["key"]), "num_complete": int(complete.sum()),
                               "retrieval": {}}
    for a, b in permutations(MODALITIES, 2):
        q, k = data["emb"][a][complete], data["emb"][b][complete]
        results["retrieval"][f"{a}->{b}"] = retrieval_metrics(q, k)
    if int(complete.sum()) > 0:
        calibrator = load_completion(run_dir, tag).calibrator  # None unless the run used CalMRL
        complete_emb = {m: data["emb"][m][complete] for m in MODALITIES}
        results["anchor_shift"] = anchor_shift(complete_emb, calibrator, MODALITIES)
    r1 = [v["R@1"] for v in results["retrieval"].values()]
    results["mean_R@1"] = sum(r1) / len(r1) if r1 else float("nan")
    return results


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| query -> key | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
    for pair, m in results["retrieval"].items():
        lines.append(f"| {pair} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.0f} |")
    if "anchor_shift" in results:
        lines += ["", "| observed pattern | anchor shift, observed only | anchor shift, calibrated |", "|---|---|---|"]
        for pattern, row in results["anchor_shift"].items():
            cal = f"{row['calibrated']:.3f}" if "calibrated" in row else "-"
            lines.append(f"| {pattern} | {row['observed_only']:.3f} | {cal} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    (out_dir / "eval.md").write_text(markdown_table(results) + "\n")
    return out_dir / "eval.json"
