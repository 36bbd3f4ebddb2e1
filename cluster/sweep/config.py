"""The sweep file: its schema, its checks, and the plan it resolves to.

See `cluster/sweep/__init__.py` for the file format. A sweep file is checked
in full before Ray starts: unknown keys, wrong types, swept keys that are not
config keys, and every swept value tried on the base config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.storage import is_remote
from evals.benchmark.tuning import BenchmarkTrial, resolve
from pretrain.config import Config, ConfigError, build_section, config_from_dict, deep_merge, load_config, nest_dotted

DISTRIBUTIONS = ("loguniform", "uniform", "randint")
STEP_METRICS = ("loss", "samples_per_s")  # in every report: the only ones ASHA can use


class SweepError(ConfigError):
    """A sweep file or sweep folder that cannot be used as written."""


@dataclass
class AshaConfig:
    enabled: bool = False
    grace_period: int = 10  # optimizer steps every trial runs before it may be stopped
    max_t: int = 0  # optimizer steps; 0: train.steps
    metric: str = "loss"
    mode: str = "min"
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    # "train": every trial a distributed training run of base_config (on shards), scored on
    # eval_split; "benchmark": every trial a stage-2 run of `calmrl benchmark` (the `benchmark`
    # section says which), scored on the benchmark's validation split.
    kind: str = "train"
    benchmark: BenchmarkTrial = field(default_factory=BenchmarkTrial)
    base_config: str = ""
    out_dir: str = ""
    search: str = "grid"
    num_samples: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    eval_split: str = ""
    metric: str = ""  # default: val/mean_R@1 with an eval split, else loss
    mode: str = ""  # default: max for val/ metrics, min otherwise
    workers_per_trial: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.0  # 0: 0.5 on CPU, 1 with GPUs
    max_concurrent_trials: int = 1
    report_every: int = 1
    max_failures: int = 0  # Tune retries of a failed trial
    asha: AshaConfig = field(default_factory=AshaConfig)


def _check_key(dotted: str, source: str) -> None:
    """A dotted key must name a leaf field of Config (not a section)."""
    node: Any = Config()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise SweepError(
                f"{source}: params/overrides key '{dotted}' is not a config key "
                "(use dotted keys such as calibration.method, train.lr)"
            )
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise SweepError(f"{source}: '{dotted}' is a config section; sweep one of its keys")


def _abs(path: str) -> str:
    return path if not path or is_remote(path) else str(Path(path).expanduser().resolve())


def _param_values(key: str, spec: Any, source: str) -> list[Any]:
    """Values of one parameter to check against the config (bounds for distributions)."""
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{source}: params.{key} is an empty list")
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, bounds = next(iter(spec.items()))
        if not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            and bounds[0] < bounds[1]
        ):
            raise SweepError(f"{source}: params.{key}: {kind} needs [low, high] with low < high, got {bounds!r}")
        if kind == "loguniform" and bounds[0] <= 0:
            raise SweepError(f"{source}: params.{key}: loguniform bounds must be positive")
        return [bounds[0], bounds[1] - 1 if kind == "randint" else bounds[1]]
    raise SweepError(
        f"{source}: params.{key} must be a list of values or one of "
        f"{{{', '.join(f'{d}: [low, high]' for d in DISTRIBUTIONS)}}}; put fixed values in "
        f"'overrides' (got {spec!r})"
    )


def load_sweep(path: str | Path, check_params: bool = True) -> SweepConfig:
    """Read and check a sweep file; paths become absolute. With `check_params`
    the base config is loaded and every swept value is tried on it."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    return sweep_from_dict(yaml.safe_load(path.read_text()), str(path), check_params)


def sweep_from_dict(tree: Any, source: str, check_params: bool = True) -> SweepConfig:
    """A checked SweepConfig from the tree of a sweep file (see `load_sweep`)."""
    if not isinstance(tree, dict):
        raise SweepError(f"{source}: the top level must be a mapping")
    try:
        sweep: SweepConfig = build_section(SweepConfig, tree, source)  # unknown keys and wrong types
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if sweep.kind not in ("train", "benchmark"):
        raise SweepError(f"{source}: 'kind' must be train or benchmark (got {sweep.kind!r})")
    if not sweep.out_dir:
        raise SweepError(f"{source}: 'out_dir' (the sweep folder) is required")
    if sweep.kind == "benchmark":
        _check_benchmark(sweep, source)
    if not sweep.base_config:
        raise SweepError(f"{source}: 'base_config' (a calmrl config file) is required")
    if sweep.search not in ("grid", "random"):
        raise SweepError(f"{source}: 'search' must be grid or random (got {sweep.search!r})")
    if not sweep.params:
        raise SweepError(f"{source}: 'params' must name at least one config key to sweep")
    for name, low in (
        ("num_samples", 1),
        ("workers_per_trial", 1),
        ("max_concurrent_trials", 1),
        ("report_every", 1),
        ("max_failures", 0),
    ):
        if getattr(sweep, name) < low:
            raise SweepError(f"{source}: '{name}' must be >= {low} (got {getattr(sweep, name)})")
    if sweep.cpus_per_worker < 0:
        raise SweepError(f"{source}: 'cpus_per_worker' must be >= 0")
    if not sweep.cpus_per_worker:
        sweep.cpus_per_worker = 1.0 if sweep.use_gpu else 0.5
    if not sweep.metric:
        sweep.metric = "val/mean_R@1" if sweep.eval_split else "loss"
        if sweep.kind == "benchmark":
            sweep.metric = "val/own_R@1"
    if not sweep.mode:
        sweep.mode = "max" if sweep.metric.startswith("val/") else "min"
    if sweep.mode not in ("min", "max") or sweep.asha.mode not in ("min", "max"):
        raise SweepError(f"{source}: 'mode' and 'asha.mode' must be min or max")
    if sweep.metric.startswith("val/") and not sweep.eval_split and sweep.kind == "train":
        raise SweepError(f"{source}: metric '{sweep.metric}' needs an 'eval_split'")
    if sweep.asha.enabled:
        if sweep.asha.metric not in STEP_METRICS:
            raise SweepError(
                f"{source}: asha.metric must be one of {', '.join(STEP_METRICS)} (reported every "
                f"step); validation metrics exist only at a trial's end"
            )
        if sweep.asha.grace_period < 1 or sweep.asha.reduction_factor < 2 or sweep.asha.max_t < 0:
            raise SweepError(f"{source}: asha needs grace_period >= 1, reduction_factor >= 2, max_t >= 0")
    for key in (*sweep.params, *sweep.overrides):
        _check_key(key, source)
    if "train.out_dir" in sweep.params or "train.out_dir" in sweep.overrides:
        raise SweepError(f"{source}: train.out_dir is set per trial (out_dir/runs/TRIAL_ID); set 'out_dir' instead")
    both = set(sweep.params) & set(sweep.overrides)
    if both:
        raise SweepError(f"{source}: {', '.join(sorted(both))} both swept (params) and fixed (overrides)")
    sweep.base_config = _abs(sweep.base_config)
    sweep.out_dir = _abs(sweep.out_dir)
    sweep.eval_split = _abs(sweep.eval_split)
    if check_params:
        base = trial_base_config(sweep)
        for key, spec in sweep.params.items():
            for value in _param_values(key, spec, source):
                try:
                    config_from_dict(deep_merge(base, nest_dotted({key: value})), f"{source} (params.{key}={value!r})")
                except ConfigError as exc:
                    raise SweepError(str(exc)) from None
    else:
        for key, spec in sweep.params.items():
            _param_values(key, spec, source)
    return sweep


def _check_benchmark(sweep: SweepConfig, source: str) -> None:
    """A benchmark sweep: its trial is resolvable; base_config defaults to the data set's
    stage-2 config (so swept keys are checked against it); stage 1 lives in benchmark.out."""
    trial = sweep.benchmark
    try:
        _, spec = resolve(trial)
    except ValueError as exc:
        raise SweepError(f"{source}: {exc}") from None
    from evals.benchmark.presets import METHODS, OBJECTIVES

    if trial.objective not in OBJECTIVES or trial.method not in METHODS:
        raise SweepError(
            f"{source}: benchmark.objective must be one of {', '.join(OBJECTIVES)} and "
            f"benchmark.method one of {', '.join(METHODS)}"
        )
    sweep.base_config = sweep.base_config or spec.stage2
    trial.out = _abs(trial.out or str(Path(sweep.out_dir) / "stage1"))
    trial.data_roots = {k: _abs(v) for k, v in trial.data_roots.items()}
    trial.cache = _abs(trial.cache)


def trial_base_config(sweep: SweepConfig) -> dict[str, Any]:
    """The base config plus the fixed overrides, as a plain tree with absolute local paths."""
    cfg = load_config(sweep.base_config)
    try:
        tree = config_from_dict(
            deep_merge(cfg.to_dict(), nest_dotted(sweep.overrides)), f"{sweep.base_config} (sweep overrides)"
        ).to_dict()
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    tree["data"]["shards"] = _abs(tree["data"]["shards"])  # trials run in other working directories
    if tree["metrics"]["enabled"]:
        tree["metrics"]["port"] = 0  # several trials' ranks share a node: any free port
    return tree


def plan_fingerprint(sweep: SweepConfig) -> dict[str, Any]:
    """What must not change between a sweep and its resumption."""
    return {
        "base": trial_base_config(sweep),
        "params": sweep.params,
        "search": sweep.search,
        "num_samples": sweep.num_samples,
        "workers_per_trial": sweep.workers_per_trial,
        "eval_split": sweep.eval_split,
        "asha": dataclasses.asdict(sweep.asha),
        "kind": sweep.kind,
        "benchmark": dataclasses.asdict(sweep.benchmark) if sweep.kind == "benchmark" else {},
    }
