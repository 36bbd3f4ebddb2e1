"""`calmrl eval`'s measurements: on a split's embeddings from a checkpoint,
- retrieval R@1/5/10 and median rank for every ordered pair of modalities on
  complete instances;
- zero-shot classification where the index names classes;
- anchor shift per missing pattern, without and with the run's calibrator;
- imputation error of CalMRL against mean-fill and random-fill.
`evals.report` writes them as JSON (machines), a Markdown table and a PNG (people)."""

from __future__ import annotations

from itertools import combinations, permutations
from pathlib import Path
from typing import Any

import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.split import open_split
from evals.embed import embed_split
from evals.imputation import imputation_error, imputation_error_by_pattern
from evals.retrieval import anchor_scores, joint_retrieval, retrieval_metrics, volume_scores
from evals.zero_shot import class_embeddings, zero_shot_accuracy
from pretrain.anchor_shift import anchor_shift
from pretrain.calibration import Calibrator
from pretrain.run_dir import RunDir


def evaluate_run(run_dir: str | Path, split_dir: str | Path, tag: str = "latest") -> dict[str, Any]:
    run = RunDir(run_dir)
    cfg, model, tag = run.load_model(tag)
    data = embed_split(model, cfg, split_dir)
    calibrator = run.load_completion(tag).calibrator  # None unless the run used CalMRL
    results: dict[str, Any] = {
        "run": str(run_dir),
        "checkpoint": tag,
        "split": str(split_dir),
        **embedding_metrics(data["emb"], data["present"], calibrator),
    }
    split = open_split(split_dir, cfg.data.tokenizer)
    classes = split.index.get("classes")
    if classes:
        template = split.index.get("prompt_template", "{}")
        class_emb = class_embeddings(model, cfg, split.tokenizer_json, [template.format(c) for c in classes])
        results["zero_shot"] = zero_shot_accuracy(data["emb"], data["present"], data["label"], class_emb)
    return results


def embedding_metrics(
    emb: dict[str, torch.Tensor],
    present: torch.Tensor,
    calibrator: Calibrator | None,
    refit: Calibrator | None = None,
    anchor: str = "text",
) -> dict[str, Any]:
    """On the complete instances: cosine retrieval between every ordered pair of
    modalities and its mean R@1; the joint rules (GRAM's volume and PMRL's
    leading vector, `anchor` against the other modalities together); the mean
    cosine of each pair's positives (a sign flip shows as a negative value);
    anchor shift and imputation error per missing pattern with `calibrator`
    (the run's state) and `refit` (e.g. an exact EM fit on the final training
    features) when given."""
    complete = present.all(1)
    results: dict[str, Any] = {
        "num_samples": int(present.shape[0]),
        "num_complete": int(complete.sum()),
        "retrieval": {},
    }
    for a, b in permutations(MODALITIES, 2):
        results["retrieval"][f"{a}->{b}"] = retrieval_metrics(emb[a][complete], emb[b][complete])
    # Every item holding both modalities of a pair (more items than the complete ones: the
    # number a user of one pair, e.g. image <-> text search, would see).
    results["pair_retrieval"] = {}
    for a, b in permutations(MODALITIES, 2):
        both = present[:, MODALITIES.index(a)] & present[:, MODALITIES.index(b)]
        if int(both.sum()) > 1:
            results["pair_retrieval"][f"{a}->{b}"] = retrieval_metrics(emb[a][both], emb[b][both])
    r1 = [v["R@1"] for v in results["retrieval"].values()]
    results["mean_R@1"] = sum(r1) / len(r1) if r1 else float("nan")
    if int(complete.sum()) > 1:
        complete_emb = {m: emb[m][complete].float() for m in MODALITIES}
        results["positive_cosine"] = {
            f"{a}-{b}": float((complete_emb[a] * complete_emb[b]).sum(1).mean()) for a, b in combinations(MODALITIES, 2)
        }
        others = [complete_emb[m] for m in MODALITIES if m != anchor]
        results["joint_retrieval"] = {
            **joint_retrieval(volume_scores(complete_emb[anchor], others), "volume"),
            **joint_retrieval(anchor_scores(complete_emb[anchor], others), "anchor"),
        }
        calibrators = {"calmrl": calibrator} if calibrator is not None else {}
        if refit is not None:
            calibrators["calmrl_refit"] = refit
        results["anchor_shift"] = anchor_shift(
            complete_emb, calibrator, MODALITIES, {"refit": refit} if refit is not None else None
        )
        # mean-fill uses each modality's mean over every sample holding it
        means = {m: emb[m][present[:, j]].mean(0) for j, m in enumerate(MODALITIES)}
        results["imputation_error"] = imputation_error(complete_emb, calibrator, MODALITIES, means)
        results["imputation_by_pattern"] = imputation_error_by_pattern(complete_emb, calibrators, MODALITIES, means)
    return results
