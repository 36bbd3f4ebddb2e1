"""`calmrl eval`: on a split's embeddings from a checkpoint,
- retrieval R@1/5/10 and median rank for every ordered pair of modalities on
  complete instances;
- zero-shot classification where the index names classes;
- anchor shift per missing pattern, without and with the run's calibrator;
- imputation error of CalMRL against mean-fill and random-fill;
written as JSON (machines), a Markdown table and a PNG (people)."""
from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path
from typing import Any

import torch

from evals.anchor_shift import anchor_shift
from data_pipeline.reader import open_split
from evals.embed import embed_split, load_completion, load_run
from evals.imputation import imputation_error
from evals.plots import plot_eval
from evals.retrieval import retrieval_metrics
from evals.zero_shot import class_embeddings, zero_shot_accuracy
from pretrain.calibration import Calibrator
from pretrain.config import MODALITIES


def evaluate_run(run_dir: str | Path, split_dir: str | Path, tag: str = "latest") -> dict[str, Any]:
    cfg, model, tag = load_run(run_dir, tag)
    data = embed_split(model, cfg, split_dir)
    calibrator = load_completion(run_dir, tag).calibrator  # None unless the run used CalMRL
    results: dict[str, Any] = {"run": str(run_dir), "checkpoint": tag, "split": str(split_dir),
                               **embedding_metrics(data["emb"], data["present"], calibrator)}
    split = open_split(split_dir, cfg.data.tokenizer)
    classes = split.index.get("classes")
    if classes:
        template = split.index.get("prompt_template", "{}")
        class_emb = class_embeddings(model, cfg, split.tokenizer_json, [template.format(c) for c in classes])
        results["zero_shot"] = zero_shot_accuracy(data["emb"], data["present"], data["label"], class_emb)
    return results


def embedding_metrics(emb: dict[str, torch.Tensor], present: torch.Tensor,
                      calibrator: Calibrator | None) -> dict[str, Any]:
    """Retrieval between every ordered pair of modalities on complete instances,
    anchor shift per pattern and imputation error (with `calibrator` when there
    is one), and the mean R@1 over the pairs."""
    complete = present.all(1)
    results: dict[str, Any] = {"num_samples": int(present.shape[0]), "num_complete": int(complete.sum()),
                               "retrieval": {}}
    for a, b in permutations(MODALITIES, 2):
        results["retrieval"][f"{a}->{b}"] = retrieval_metrics(emb[a][complete], emb[b][complete])
    if int(complete.sum()) > 1:
        complete_emb = {m: emb[m][complete] for m in MODALITIES}
        results["anchor_shift"] = anchor_shift(complete_emb, calibrator, MODALITIES)
        # mean-fill uses each modality's mean over every sample holding it
        means = {m: emb[m][present[:, j]].mean(0) for j, m in enumerate(MODALITIES)}
        results["imputation_error"] = imputation_error(complete_emb, calibrator, MODALITIES, means)
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
    if "imputation_error" in results:
        methods = list(results["imputation_error"])
        lines += ["", "| hidden modality | " + " | ".join(f"{m} cos / mse" for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for modality in results["imputation_error"][methods[0]]:
            cells = [f"{results['imputation_error'][m][modality]['cosine']:.3f} / "
                     f"{results['imputation_error'][m][modality]['mse']:.3f}" for m in methods]
            lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    if results.get("zero_shot"):
        lines += ["", "| zero-shot | top-1 | chance | n |", "|---|---|---|---|"]
        for modality, row in results["zero_shot"].items():
            lines.append(f"| {modality} | {row['top1']:.3f} | {row['chance']:.3f} | {row['n']} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    (out_dir / "eval.md").write_text(markdown_table(results) + "\n")
    plot_eval(results, out_dir / "eval.png")
    return out_dir / "eval.json"
