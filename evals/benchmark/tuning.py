"""Choosing the benchmark's hyperparameters on the validation split, the same budget per method.

What decides a comparison (learning rate, the pairwise term's weight, PMRL's
tau1, gradient through the imputation, which rows are imputed, the
imputed-pair weight) is searched per data set, objective and method with the
same number of trials for every method (`search_space`), each trial a stage-2
run scored on the validation split; the test split is never used for choosing.
`cluster.sweep` runs the trials as a Ray Tune sweep (`kind: benchmark`);
this module holds the search spaces and what one trial does.

The calibrator's latent size is not searched: it is the capacity of a
generative model, and scoring it by one seed's R@1 chose sizes (8, 16) whose
exact fits impute the hidden modalities worse than a linear regression from
the observed one and move single-observed anchors further off than the local
anchor (measured on the validation split, docs/benchmark.md "Why the latent
size is fixed"). It is fixed in the stage-2 configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.benchmark.memory import MemorySplit, default_cache_dir, frozen_modalities, load_memory_split
from evals.benchmark.presets import PRESETS, DatasetSpec, Preset, customise
from evals.benchmark.runs import ensure_data, run_overrides, stage1
from evals.benchmark.stages import RunSpec, run_stage2, stage2_config
from pretrain.config import load_config

TUNE_SPLIT = "val"


@dataclass
class BenchmarkTrial:
    """Which stage-2 run a sweep's trials vary (the `benchmark:` section of a sweep file)."""

    out: str = ""  # a benchmark folder: the seed's stage-1 run and features are made there once, then reused
    preset: str = "factors"
    dataset: str = ""  # a data set of the preset (default: its first)
    data_roots: dict[str, str] = field(default_factory=dict)
    objective: str = "gram"
    method: str = "calmrl"
    rate: float = 0.5
    seed: int = 0
    cache: str = ""  # frozen-tower feature cache (default: the cache folder's benchmark/)


def search_space(objective: str, method: str) -> dict[str, Any]:
    """The hyperparameters searched for one objective and method (a sweep's `params`)."""
    space: dict[str, Any] = {"train.lr": {"loguniform": [2.0e-4, 2.0e-3]}}
    if objective in ("gram", "pmrl"):
        space["loss.pairwise_weight"] = [0.5, 1.0, 2.0]
    if objective == "pmrl":
        # the reference's temperatures (tau1 0.05, tau2 0.1) are in the space: with the pairwise
        # term kept they do not saturate (measured: docs/benchmark.md, "Ablations")
        space["loss.pmrl_tau1"] = [0.05, 0.2, 0.5, 1.0]
        space["loss.pmrl_tau2"] = [0.1, 1.0]
    if objective == "pairwise" and method in ("calmrl", "mean_fill"):
        space["loss.imputed_pair_weight"] = [0.3, 1.0]
    if method == "calmrl":
        space["calibration.grad_through_imputation"] = [False, True]
        space["calibration.impute_min_observed"] = [1, 2]
    return space


def resolve(trial: BenchmarkTrial) -> tuple[Preset, DatasetSpec]:
    if trial.preset not in PRESETS:
        raise ValueError(f"benchmark trial: unknown preset {trial.preset!r}; choose from {', '.join(PRESETS)}")
    preset = customise(PRESETS[trial.preset], roots=[f"{k}={v}" for k, v in trial.data_roots.items()], tuned="")
    names = [d.name for d in preset.datasets]
    name = trial.dataset or names[0]
    if name not in names:
        raise ValueError(f"benchmark trial: data set {name!r} is not in preset {trial.preset!r} ({', '.join(names)})")
    return preset, next(d for d in preset.datasets if d.name == name)


def _raw_splits(preset: Preset, spec: DatasetSpec, cache: str) -> tuple[dict[str, MemorySplit], dict[str, int]]:
    ensure_data(spec)
    base = load_config(spec.stage1, [*preset.stage1_overrides, f"--data.shards={Path(spec.root) / 'train'}"])
    frozen = frozen_modalities(base)
    folder = Path(cache) if cache else default_cache_dir()
    raw = {s: load_memory_split(base, Path(spec.root) / s, folder, frozen) for s in ("train", "val", "test")}
    return raw, {m: int(raw["train"].inputs[m].shape[1]) for m in frozen}


def prepare(trial: BenchmarkTrial) -> None:
    """Train (or find) the trial's stage-1 run and its features before any trial starts."""
    preset, spec = resolve(trial)
    raw, frozen_dims = _raw_splits(preset, spec, trial.cache)
    stage1(spec, preset, trial.seed, Path(trial.out), raw, frozen_dims, TUNE_SPLIT, [])


def run_trial(trial: BenchmarkTrial, params: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """One stage-2 run with `params` (dotted config keys), scored on the validation split."""
    preset, spec = resolve(trial)
    raw, frozen_dims = _raw_splits(preset, spec, trial.cache)
    state = stage1(spec, preset, trial.seed, Path(trial.out), raw, frozen_dims, TUNE_SPLIT, [])
    run = RunSpec(spec.name, trial.objective, trial.method, 0.0 if trial.method == "oracle" else trial.rate, trial.seed)
    overrides = [*run_overrides(preset, {}, run), *(f"--{k}={json.dumps(v)}" for k, v in sorted(params.items()))]
    feature_dims = {m: int(v.shape[1]) for m, v in state.features["train"].inputs.items()}
    cfg = stage2_config(spec, run, overrides, run_dir, state.stage1_dir, feature_dims, state.config)
    result = run_stage2(cfg, run, state.features["train"], state.features[TUNE_SPLIT], spec.missing_mode)
    s = result["summary"]
    return {
        "step": float(result["steps"]),
        "loss": float(result["loss_last"]),
        "val/own_R@1": s["own_R@1"],
        "val/cos_R@1": s["cos_R@1"],
        "val/volume_R@1": s["volume_R@1"],
        "val/anchor_R@1": s["anchor_R@1"],
    }
