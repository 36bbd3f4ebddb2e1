"""The benchmark's data sets and presets: what runs, on which data, with which settings.

A data set names its shards (built with `calmrl data build` when missing), a
stage-1 config (towers, data decoding, the pairwise pretraining) and a
stage-2 config (continued training over the stage-1 towers' features). A
preset names the data sets, objectives, methods, imposed missing rates and
seeds, plus overrides for every run of a stage (the test suite's quick preset
shortens everything).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.runtime import REPO_ROOT

METHODS = ("oracle", "drop_incomplete", "observed_only", "mean_fill", "calmrl")
OBJECTIVES = ("pairwise", "gram", "pmrl")
CONFIG_DIR = REPO_ROOT / "configs" / "benchmark"


@dataclass(frozen=True)
class DatasetSpec:
    """One data set of the benchmark: where its shards are and how to train on it."""

    name: str
    source: str  # a `calmrl data build` source, used when the shards are not there yet
    root: str  # holds train/, val/ and test/
    stage1: str  # config of the pairwise pretraining (towers, data, steps)
    stage2: str  # config of the continued training (objective settings, steps, calibration)
    build_options: dict[str, Any] = field(default_factory=dict)
    missing_mode: str = "keep_text"  # data.extra_missing_mode of the imposed gaps


@dataclass(frozen=True)
class Preset:
    name: str
    datasets: tuple[DatasetSpec, ...]
    objectives: tuple[str, ...] = OBJECTIVES
    methods: tuple[str, ...] = METHODS
    rates: tuple[float, ...] = (0.5, 0.7)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    stage1_overrides: tuple[str, ...] = ()  # for every stage-1 run
    stage2_overrides: tuple[str, ...] = ()  # for every stage-2 run (after the tuned values)
    tuned: str = str(CONFIG_DIR / "tuned.yaml")  # values chosen on the validation split ("" for none)


# Synthetic data with headroom (data_pipeline/factors.py), built complete: the
# imposed rates are its only gaps and the oracle sees every sample.
FACTORS = DatasetSpec(
    "factors",
    "factors",
    "data/factors",
    str(CONFIG_DIR / "factors_stage1.yaml"),
    str(CONFIG_DIR / "factors_stage2.yaml"),
    {"num_samples": 8000, "shard_size": 400},
)
TUXPAINT = DatasetSpec(
    "tuxpaint",
    "tuxpaint",
    "data/tuxpaint",
    str(CONFIG_DIR / "tuxpaint_stage1.yaml"),
    str(CONFIG_DIR / "tuxpaint_stage2.yaml"),
)
QUICK = (
    "--train.steps=12",
    "--train.warmup_steps=2",
    "--calibration.warmup_steps=4",
    "--data.batch_size=32",
    "--train.log_every=6",
)
PRESETS: dict[str, Preset] = {
    "full": Preset("full", (FACTORS, TUXPAINT)),
    "factors": Preset("factors", (FACTORS,)),
    "tuxpaint": Preset("tuxpaint", (TUXPAINT,)),
    # Small enough for the test suite: every objective and method, one rate, two seeds, few steps.
    "quick": Preset(
        "quick", (FACTORS,), rates=(0.5,), seeds=(0, 1), stage1_overrides=QUICK, stage2_overrides=QUICK, tuned=""
    ),
}


def _choose(kind: str, text: str | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    if not text:
        return None
    chosen = tuple(text.split(","))
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise SystemExit(f"calmrl benchmark: unknown {kind} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def customise(
    preset: Preset,
    *,
    roots: Sequence[str] = (),
    data: str | None = None,
    stage1: str | None = None,
    stage2: str | None = None,
    seeds: str | None = None,
    rates: str | None = None,
    methods: str | None = None,
    objectives: str | None = None,
    tuned: str | None = None,
    overrides: Sequence[str] = (),
) -> Preset:
    """The preset with the command line's changes: data roots (NAME=DIR), or any data set
    `calmrl data build` made (`data` with its `stage1` config), seeds, rates, methods,
    objectives, the tuned-values file, and overrides for every stage-2 run."""
    from dataclasses import replace

    datasets = preset.datasets
    if data:
        if not stage1:
            raise SystemExit("calmrl benchmark: --data needs --config (the stage-1 config of that data)")
        name = Path(data).resolve().name
        datasets = (DatasetSpec(name, "", data, stage1, stage2 or str(CONFIG_DIR / "stage2.yaml")),)
    given = {}
    for item in roots:
        name, sep, root = item.partition("=")
        if not sep or name not in {d.name for d in datasets}:
            raise SystemExit(
                f"calmrl benchmark: --data-root '{item}': expected NAME=DIR with NAME one of "
                f"{', '.join(d.name for d in datasets)}"
            )
        given[name] = root
    changes: dict[str, Any] = {
        "datasets": tuple(replace(d, root=given.get(d.name, d.root)) for d in datasets),
        "stage2_overrides": (*preset.stage2_overrides, *overrides),
    }
    if seeds:
        changes["seeds"] = tuple(int(s) for s in seeds.split(","))
    if rates:
        changes["rates"] = tuple(float(r) for r in rates.split(","))
    changes["methods"] = _choose("method(s)", methods, METHODS) or preset.methods
    changes["objectives"] = _choose("objective(s)", objectives, OBJECTIVES) or preset.objectives
    if tuned is not None:
        changes["tuned"] = tuned
    elif data:
        changes["tuned"] = ""  # values tuned for the presets' data sets do not carry over
    return replace(preset, **changes)
