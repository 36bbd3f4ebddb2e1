"""The benchmark's two stages, one run each (docs/benchmark.md, "Protocol").

Stage 1, once per seed: pairwise InfoNCE on the complete training split (the
contrastive pretraining that published results start from). Its towers are
then frozen: their outputs on every split are the inputs of stage 2.

Stage 2, per seed x objective x method x missing rate: continued training
from the stage-1 heads (`train.init_from` with `train.init_keys`) with the
objective, on the training split with the rate's entries hidden (the same
entries for every method at a seed), a `features` tower per modality that
starts as the identity. Every run is a real DeepSpeed trainer
(`build_trainer`) fed in-memory batches, and is evaluated on the complete
instances of the evaluation split: cosine retrieval, each objective's own rule,
the positives' mean cosine, anchor shift and imputation error per missing
pattern, with the run's calibrator and with an exact refit on the final
training features.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.missing import impose_missing
from evals.benchmark.memory import MemorySplit, embed_memory, memory_batches, tower_outputs
from evals.benchmark.presets import DatasetSpec
from evals.evaluate import embedding_metrics
from pretrain.calibration import Calibrator
from pretrain.config import Config, load_config
from pretrain.model import MultiModalModel
from pretrain.step import StepResult
from pretrain.trainer import Trainer, build_trainer


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    objective: str  # "pairwise" for stage 1
    method: str  # "stage1" for stage 1
    rate: float  # imposed missing rate (0 for stage 1 and the oracle)
    seed: int

    @property
    def stage(self) -> int:
        return 1 if self.method == "stage1" else 2

    @property
    def name(self) -> str:
        if self.stage == 1:
            return f"stage1-s{self.seed}"
        return f"{self.objective}-{self.method}-r{self.rate:g}-s{self.seed}"


def feature_tower_overrides(feature_dims: dict[str, int], base: Config, identity: bool) -> list[str]:
    """Modalities given as features become `features` towers over them: with `identity`
    (stage 2) the tower starts as the identity (no norm; its adapter, if the config has
    one, starts at zero); otherwise (frozen backbones in stage 1) it normalises them."""
    out = []
    for m, dim in feature_dims.items():
        tower = getattr(base.model, m)
        options: dict[str, Any] = {**tower.options, "dim": dim} if identity else {"dim": dim}
        if identity:
            options.setdefault("norm", False)
        out += [f"--model.{m}.name=features", f"--model.{m}.freeze=false", f"--model.{m}.options={json.dumps(options)}"]
    return out


def stage1_config(
    spec: DatasetSpec, overrides: tuple[str, ...], seed: int, out_dir: Path, frozen_dims: dict[str, int]
) -> Config:
    base = load_config(spec.stage1, [*overrides, f"--data.shards={Path(spec.root) / 'train'}"])
    return load_config(
        spec.stage1,
        [
            *overrides,
            f"--data.shards={Path(spec.root) / 'train'}",
            "--loss.objective=pairwise",
            "--calibration.method=observed_only",
            "--data.extra_missing=0",
            f"--data.seed={seed}",
            f"--train.seed={seed}",
            f"--train.out_dir={out_dir}",
            *feature_tower_overrides(frozen_dims, base, False),
        ],
    )


def stage2_config(
    spec: DatasetSpec,
    run: RunSpec,
    overrides: list[str],
    out_dir: Path,
    stage1_dir: Path,
    feature_dims: dict[str, int],
    stage1: Config,
) -> Config:
    """The run's config: the stage-2 file over stage 1's data settings (decoding and
    tokenizer stay those of the towers), then the tuned values and overrides, then
    what the run is (objective, method, rate, seed, features, init_from)."""
    method = "observed_only" if run.method == "oracle" else run.method
    under = {"data": dict(stage1.data.__dict__)}
    common = [f"--data.shards={Path(spec.root) / 'train'}", f"--model.embed_dim={stage1.model.embed_dim}", *overrides]
    base = load_config(spec.stage2, common, base=under)
    return load_config(
        spec.stage2,
        [
            *common,
            f"--loss.objective={run.objective}",
            f"--calibration.method={method}",
            f"--data.extra_missing={run.rate}",
            f"--data.extra_missing_mode={spec.missing_mode}",
            f"--data.extra_missing_seed={run.seed}",
            f"--data.seed={run.seed}",
            f"--train.seed={run.seed}",
            f"--train.out_dir={out_dir}",
            f"--train.init_from={stage1_dir}",
            "--train.init_keys=[heads.*, log_logit_scale]",
            *feature_tower_overrides(feature_dims, base, True),
        ],
        base=under,
    )


def summarise_metrics(metrics: dict[str, Any], objective: str) -> dict[str, float]:
    """The flat figures of one run that the tables aggregate."""
    joint = metrics.get("joint_retrieval", {})

    def both(rule: str) -> float:
        values = [joint[k]["R@1"] for k in (f"{rule}:anchor->data", f"{rule}:data->anchor") if k in joint]
        return sum(values) / len(values) if values else math.nan

    row: dict[str, float] = {"cos_R@1": metrics["mean_R@1"], "volume_R@1": both("volume"), "anchor_R@1": both("anchor")}
    row["own_R@1"] = {"gram": row["volume_R@1"], "pmrl": row["anchor_R@1"]}.get(objective, row["cos_R@1"])
    for pair, m in metrics["retrieval"].items():
        row[f"R@1 {pair}"] = m["R@1"]
    for pair, value in metrics.get("positive_cosine", {}).items():
        row[f"cos+ {pair}"] = value
    shift = metrics.get("anchor_shift", {})
    for kind in ("observed_only", "calibrated", "calibrated_refit"):
        values = [r[kind] for r in shift.values() if kind in r]
        if values:
            row[f"shift_{kind}"] = sum(values) / len(values)
            row.update({f"shift_{kind} {p}": r[kind] for p, r in shift.items()})
    for pattern, methods in metrics.get("imputation_by_pattern", {}).items():
        for method, value in methods.items():
            row[f"impute_{method} {pattern}"] = value
    by_method: dict[str, list[float]] = {}
    for methods in metrics.get("imputation_by_pattern", {}).values():
        for method, value in methods.items():
            by_method.setdefault(method, []).append(value)
    row.update({f"impute_{m}": sum(v) / len(v) for m, v in by_method.items()})
    return row


def training_diagnostics(history: list[StepResult], after: int) -> dict[str, float]:
    """Means over the logged steps after step `after` of what the objective saw in
    training: the batches' anchor shift (local and calibrated) and positive cosines."""
    logged = [r for r in history if r.logged and r.step > after]
    out: dict[str, float] = {}
    for key in sorted({k for r in logged for k in {**r.anchor_shift, **r.positive_cosine}}):
        values = [
            {**r.anchor_shift, **r.positive_cosine}[key]
            for r in logged
            if key in {**r.anchor_shift, **r.positive_cosine}
        ]
        out[f"train {key}"] = sum(values) / len(values)
    return out


def _train(cfg: Config, data: MemorySplit, present: torch.Tensor, seed: int) -> tuple[Trainer, list[StepResult], float]:
    started = time.perf_counter()
    trainer = build_trainer(cfg, batches=memory_batches(data, present, cfg.data.batch_size, seed))
    history = trainer.fit()
    return trainer, history, time.perf_counter() - started


def _pattern_counts(present: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in present.tolist():
        name = "+".join(m for m, on in zip(MODALITIES, row) if on)
        counts[name] = counts.get(name, 0) + 1
    return counts


def run_stage1(
    cfg: Config, run: RunSpec, train: MemorySplit, evaluations: dict[str, MemorySplit]
) -> tuple[dict[str, Any], Trainer]:
    """Pairwise pretraining on the complete tuples of the training split, scored on each of
    `evaluations` (validation and test: tuning and the benchmark share the run)."""
    rows = train.present.all(1).nonzero(as_tuple=True)[0]
    data = train.select(rows)
    trainer, history, seconds = _train(cfg, data, data.present, run.seed)
    model = trainer.model.eval()
    by_split = {
        name: embedding_metrics(embed_memory(model, split, trainer.device), split.present, None)
        for name, split in evaluations.items()
    }
    result = {
        **asdict(run),
        "stage": 1,
        "train_samples": len(data),
        "steps": trainer.step,
        "loss_first": history[0].loss,
        "loss_last": history[-1].loss,
        "train_s": seconds,
        "summaries": {name: summarise_metrics(m, "pairwise") for name, m in by_split.items()},
        "metrics_by_split": by_split,
    }
    return result, trainer


def stage_features(trainer: Trainer, splits: dict[str, MemorySplit]) -> dict[str, MemorySplit]:
    model = trainer.model.eval()
    assert isinstance(model, MultiModalModel)
    return {name: tower_outputs(model, split, trainer.device) for name, split in splits.items()}


def run_stage2(
    cfg: Config, run: RunSpec, train: MemorySplit, evaluation: MemorySplit, missing_mode: str
) -> dict[str, Any]:
    """Continued training of one method with one objective on incomplete data."""
    present = impose_missing(train.keys, train.present, run.rate, run.seed, missing_mode)
    rows = torch.arange(len(train))
    if run.method == "oracle":  # complete tuples of the natural data, nothing hidden
        rows = present.all(1).nonzero(as_tuple=True)[0]
    data, present = train.select(rows), present[rows]
    trainer, history, seconds = _train(cfg, data, present, run.seed)
    model = trainer.model.eval()
    calibrator = trainer.completion.calibrator
    refit: Calibrator | None = None
    if calibrator is not None:  # EM to convergence on the final features of the training data
        refit = calibrator.converted(torch.float64)
        train_emb = embed_memory(model, data, trainer.device)
        refit.fit_exact(train_emb, present, max_iters=2000)
    emb = embed_memory(model, evaluation, trainer.device)
    metrics = embedding_metrics(emb, evaluation.present, calibrator, refit=refit)
    summary = summarise_metrics(metrics, run.objective)
    summary.update(training_diagnostics(history, cfg.calibration.warmup_steps))
    result = {
        **asdict(run),
        "stage": 2,
        "train_samples": len(data),
        "train_patterns": _pattern_counts(present),
        "steps": trainer.step,
        "loss_first": history[0].loss,
        "loss_last": history[-1].loss,
        "train_s": seconds,
        "summary": summary,
        "metrics": metrics,
        "calibrator_fit": trainer.completion.fit_history[-1:] if calibrator is not None else [],
    }
    del trainer, model
    gc.collect()
    return result
