"""The benchmark's data sets and presets: what runs, on which data, with which settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.runtime import REPO_ROOT

METHODS = ("oracle", "drop_incomplete", "observed_only", "mean_fill", "calmrl")
CONFIG_DIR = REPO_ROOT / "configs"


@dataclass(frozen=True)
class DatasetSpec:
    """One data set of the benchmark: where its shards are and how to train on it."""

    name: str
    source: str  # a `calmrl data build` source, used when the shards are not there yet
    root: str  # holds train/ and test/
    config: str  # the base config of every run (a YAML in configs/)
    build_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    datasets: tuple[DatasetSpec, ...]
    methods: tuple[str, ...] = METHODS
    rates: tuple[float, ...] = (0.3, 0.5, 0.7)
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()  # config overrides for every run (e.g. fewer steps)


TUXPAINT = DatasetSpec("tuxpaint", "tuxpaint", "data/tuxpaint", str(CONFIG_DIR / "bench_tuxpaint.yaml"))
# Synthetic data are generated complete, so the imposed rates are the only gaps
# and the oracle trains on every sample.
SYNTHETIC = DatasetSpec(
    "synthetic",
    "synthetic",
    "data/synthetic-complete",
    str(CONFIG_DIR / "bench_synthetic.yaml"),
    {"missing": (0.0, 0.0, 0.0), "num_samples": 2000, "shard_size": 200},
)
PRESETS: dict[str, Preset] = {
    "full": Preset("full", (TUXPAINT, SYNTHETIC)),
    "tuxpaint": Preset("tuxpaint", (TUXPAINT,)),
    "synthetic": Preset("synthetic", (SYNTHETIC,)),
    # Small enough for the test suite: every method, one rate, two seeds, few steps.
    "quick": Preset(
        "quick",
        (SYNTHETIC,),
        rates=(0.5,),
        seeds=(0, 1),
        overrides=(
            "--train.steps=12",
            "--train.warmup_steps=2",
            "--calibration.warmup_steps=4",
            "--data.batch_size=32",
            "--train.log_every=6",
        ),
    ),
}
