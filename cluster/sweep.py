"""`calmrl sweep SWEEP.yaml`: ablations as a Ray Tune sweep of distributed runs.

Every trial is a real distributed training run: a Tune function trainable
(`run_trial`) starts a Ray Train `TorchTrainer` with `workers_per_trial`
workers; each worker runs the calmrl DeepSpeed `Trainer` on the process group
Ray Train created (the trainer's `init_distributed` returns early when
torch.distributed is initialised, and DeepSpeed reuses that group). Workers
report the training loss every `report_every` steps and, at the end, the
validation metrics of the final checkpoint on `eval_split` (retrieval between
every pair of modalities on its complete instances, `evals.evaluate`, computed
by rank 0) together with a `ray.train.Checkpoint` of the run folder (Ray Train
keeps a report's metrics as the run's result only when it carries one).

The sweep file (paths are relative to the current directory, like a config's
`data.shards`):

    base_config: configs/tiny_cpu.yaml   # a calmrl config (load_config)
    out_dir: runs/sweep                  # the sweep folder
    search: grid                         # grid | random
    num_samples: 1                       # random: trials; grid: repeats of the grid
    params:                              # dotted config keys
      calibration.method: [calmrl, observed_only]   # grid axis / random choice
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}      # also {uniform: [a, b]}, {randint: [a, b]}
    overrides: {train.steps: 60}         # fixed for every trial (optional)
    eval_split: data/synthetic/val       # split for validation ("" skips it)
    metric: val/mean_R@1                 # what the table's "best" and the plot use
    mode: max
    workers_per_trial: 2
    use_gpu: false
    cpus_per_worker: 0.5                 # Ray CPUs per worker (0.5 on a small CPU box)
    max_concurrent_trials: 1
    report_every: 1                      # steps between loss reports
    asha: {enabled: false, grace_period: 10, max_t: 0, metric: loss, mode: min, reduction_factor: 2}

ASHA (`asha.enabled`) stops weak trials early on the training loss; its time
is the optimizer step (`grace_period`, `max_t` in steps; `max_t: 0` means
`train.steps`). Validation metrics exist only at a trial's end, so ASHA cannot
use them.

The sweep folder holds `sweep.json` (the resolved plan), `tune/` (Ray Tune's
experiment state), `runs/TRIAL_ID/` (each trial's calmrl run: config, log,
DeepSpeed checkpoints, eval), `train/` (Ray Train's copies of the reported
checkpoints) and, at the end, `results.csv`, `results.md` and `results.png`.

Resuming: when the sweep folder already holds a Tune experiment, `calmrl
sweep` resumes it automatically (`Tuner.restore`: finished trials are kept,
unfinished and errored ones restart, and a restarted trial resumes its calmrl
run from that run's latest checkpoint). `--resume` insists on resuming (an
error if there is nothing to resume); `--no-resume` refuses to touch an
existing experiment. A folder made from a different plan (other params,
search or base config) is never resumed: use a new `out_dir`.

Ray runs on loopback (`127.0.0.1`) on a fresh local instance, or joins the
cluster named by `RAY_ADDRESS` (as under a KubeRay RayJob); then `out_dir`
and every path must be on storage that all nodes share.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, ConfigError, _build, config_from_dict, load_config

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


# ---------------------------------------------------------------------------
# Loading and checking the sweep file
# ---------------------------------------------------------------------------
def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} -> {'a': {'b': 1}}."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_key(dotted: str, source: str) -> None:
    """A dotted key must name a leaf field of Config (not a section)."""
    node: Any = Config()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise SweepError(f"{source}: params/overrides key '{dotted}' is not a config key "
                             "(use dotted keys such as calibration.method, train.lr)")
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise SweepError(f"{source}: '{dotted}' is a config section; sweep one of its keys")


def _abs(path: str) -> str:
    from data_pipeline.storage import is_remote

    return path if not path or is_remote(path) else str(Path(path).expanduser().resolve())


def _param_values(key: str, spec: Any, source: str) -> list[Any]:
    """Values of one parameter to check against the config (bounds for distributions)."""
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{source}: params.{key} is an empty list")
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, bounds = next(iter(spec.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                and bounds[0] < bounds[1]):
            raise SweepError(f"{source}: params.{key}: {kind} needs [low, high] with low < high, got {bounds!r}")
        if kind == "loguniform" and bounds[0] <= 0:
            raise SweepError(f"{source}: params.{key}: loguniform bounds must be positive")
        return [bounds[0], bounds[1] - 1 if kind == "randint" else bounds[1]]
    raise SweepError(f"{source}: params.{key} must be a list of values or one of "
                     f"{{{', '.join(f'{d}: [low, high]' for d in DISTRIBUTIONS)}}}; put fixed values in "
                     f"'overrides' (got {spec!r})")


def load_sweep(path: str | Path, check_params: bool = True) -> SweepConfig:
    """Read and check a sweep file; paths become absolute. With `check_params`
    the base config is loaded and every swept value is tried on it."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict):
        raise SweepError(f"{source}: the top level must be a mapping")
    try:
        sweep: SweepConfig = _build(SweepConfig, tree, "", source)  # unknown keys and wrong types
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if not sweep.base_config:
        raise SweepError(f"{source}: 'base_config' (a calmrl config file) is required")
    if not sweep.out_dir:
        raise SweepError(f"{source}: 'out_dir' (the sweep folder) is required")
    if sweep.search not in ("grid", "random"):
        raise SweepError(f"{source}: 'search' must be grid or random (got {sweep.search!r})")
    if not sweep.params:
        raise SweepError(f"{source}: 'params' must name at least one config key to sweep")
    for name, low in (("num_samples", 1), ("workers_per_trial", 1), ("max_concurrent_trials", 1),
                      ("report_every", 1), ("max_failures", 0)):
        if getattr(sweep, name) < low:
            raise SweepError(f"{source}: '{name}' must be >= {low} (got {getattr(sweep, name)})")
    if sweep.cpus_per_worker < 0:
        raise SweepError(f"{source}: 'cpus_per_worker' must be >= 0")
    if not sweep.cpus_per_worker:
        sweep.cpus_per_worker = 1.0 if sweep.use_gpu else 0.5
    if not sweep.metric:
        sweep.metric = "val/mean_R@1" if sweep.eval_split else "loss"
    if not sweep.mode:
        sweep.mode = "max" if sweep.metric.startswith("val/") else "min"
    if sweep.mode not in ("min", "max") or sweep.asha.mode not in ("min", "max"):
        raise SweepError(f"{source}: 'mode' and 'asha.mode' must be min or max")
    if sweep.metric.startswith("val/") and not sweep.eval_split:
        raise SweepError(f"{source}: metric '{sweep.metric}' needs an 'eval_split'")
    if sweep.asha.enabled:
        if sweep.asha.metric not in STEP_METRICS:
            raise SweepError(f"{source}: asha.metric must be one of {', '.join(STEP_METRICS)} (reported every "
                             f"step); validation metrics exist only at a trial's end")
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
                    config_from_dict(_merge(base, _nest({key: value})), f"{source} (params.{key}={value!r})")
                except ConfigError as exc:
                    raise SweepError(str(exc)) from None
    else:
        for key, spec in sweep.params.items():
            _param_values(key, spec, source)
    return sweep


def trial_base_config(sweep: SweepConfig) -> dict[str, Any]:
    """The base config plus the fixed overrides, as a plain tree with absolute local paths."""
    cfg = load_config(sweep.base_config)
    try:
        tree = config_from_dict(_merge(cfg.to_dict(), _nest(sweep.overrides)),
                                f"{sweep.base_config} (sweep overrides)").to_dict()
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    tree["data"]["shards"] = _abs(tree["data"]["shards"])  # trials run in other working directories
    if tree["metrics"]["enabled"]:
        tree["metrics"]["port"] = 0  # several trials' ranks share a node: any free port
    return tree


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.params.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec) if sweep.search == "grid" else tune.choice(spec)
        else:
            kind, (low, high) = next(iter(spec.items()))
            space[key] = {"loguniform": tune.loguniform, "uniform": tune.uniform,
                          "randint": tune.randint}[kind](low, high)
    return space


def plan_fingerprint(sweep: SweepConfig) -> dict[str, Any]:
    """What must not change between a sweep and its resumption."""
    return {"base": trial_base_config(sweep), "params": sweep.params, "search": sweep.search,
            "num_samples": sweep.num_samples, "workers_per_trial": sweep.workers_per_trial,
            "eval_split": sweep.eval_split, "asha": dataclasses.asdict(sweep.asha)}


# ---------------------------------------------------------------------------
# What runs on the Ray workers
# ---------------------------------------------------------------------------
def _validation_metrics(results: dict[str, Any]) -> dict[str, float]:
    out = {"val/mean_R@1": results["mean_R@1"], "val/num_complete": results["num_complete"]}
    pairs = results["retrieval"]
    for k in ("R@5", "R@10"):
        values = [m[k] for m in pairs.values()]
        out[f"val/mean_{k}"] = sum(values) / len(values) if values else float("nan")
    for pair, m in pairs.items():
        out[f"val/R@1/{pair}"] = m["R@1"]
    return out


def _last_logged_loss(out_dir: Path) -> float:
    log = out_dir / "log.jsonl"
    if log.is_file():
        lines = log.read_text().splitlines()
        if lines:
            return float(json.loads(lines[-1])["loss"])
    return float("nan")


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the calmrl Trainer, reporting to Ray as it goes."""
    import ray.train

    from pretrain.trainer import Trainer

    cfg = config_from_dict(loop_config["config"], "<sweep trial>")
    out_dir = Path(cfg.train.out_dir)
    every = int(loop_config["report_every"])
    # A restarted trial (resumed sweep, retried failure) continues its own run.
    resume = "latest" if (out_dir / "checkpoints" / "latest").is_file() else None
    trainer = Trainer(cfg)  # joins Ray's process group (init_distributed returns early)

    plain_step = trainer.train_step

    def step_and_report():
        stats = plain_step()
        # Every rank reports the same number of times: report is a barrier in Ray Train.
        if stats.step % every == 0 and stats.step < cfg.train.steps:
            ray.train.report({"step": stats.step, "loss": stats.loss, "samples_per_s": stats.samples_per_s})
        return stats

    trainer.train_step = step_and_report  # fit() keeps its loop, logs and checkpoints
    history = trainer.fit(resume=resume)
    metrics: dict[str, Any] = {"step": trainer.step,
                               "loss": history[-1].loss if history else _last_logged_loss(out_dir)}
    if history:
        metrics["samples_per_s"] = sum(h.samples_per_s for h in history) / len(history)
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        if loop_config["eval_split"]:
            from evals.evaluate import evaluate_run, write_results

            results = evaluate_run(out_dir, loop_config["eval_split"])
            write_results(results, out_dir / "eval")
            metrics.update(_validation_metrics(results))
        # The run folder (config, log, DeepSpeed checkpoints, eval) is self-contained: `calmrl eval` reads it.
        checkpoint = ray.train.Checkpoint.from_directory(str(out_dir))
    ray.train.report(metrics, checkpoint=checkpoint)


def run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """A Tune function trainable: one distributed run of the trial's config."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    tree = _merge(plan["base"], _nest(params))
    tree["train"]["out_dir"] = str(Path(plan["runs_dir"]) / trial_id)
    cfg = config_from_dict(tree, f"<trial {trial_id}>")
    resources = {"CPU": plan["cpus_per_worker"]}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "eval_split": plan["eval_split"],
                           "report_every": plan["report_every"]},
        scaling_config=ray.train.ScalingConfig(num_workers=plan["workers_per_trial"], use_gpu=plan["use_gpu"],
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=plan["train_storage"],
            callbacks=[TuneReportCallback()],  # forwards every worker report to this trial
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ---------------------------------------------------------------------------
# Running the sweep
# ---------------------------------------------------------------------------
def _loopback_only() -> None:
    """Make a local Ray instance use 127.0.0.1 for every node address.

    Ray 2.60 turns `_node_ip_address="127.0.0.1"` into the machine's external
    address (`resolve_ip_for_localhost`) unless "clusters" are disabled; with
    them disabled the node address, and so Ray Train's MASTER_ADDR for the
    torch process group, is the loopback address. The flag is read when Ray is
    imported: set it in the environment (inherited by Ray's processes) and on
    the module if this process imported Ray already."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def start_ray(sweep: SweepConfig) -> None:
    env_vars = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "CALMRL_CACHE", "AWS_ENDPOINT_URL",
                                           "S3_ENDPOINT_URL") if k in os.environ}
    if not sweep.use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    runtime_env = {"env_vars": env_vars}
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            ray.init(runtime_env=runtime_env)  # join the cluster (as under a KubeRay RayJob)
        return
    _loopback_only()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return
    # Logical CPUs: enough for the concurrent trials (driver + workers), at least the machine's.
    need = sweep.max_concurrent_trials * (1 + sweep.workers_per_trial * sweep.cpus_per_worker)
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's placement-group cleaner
    # needs: without it a trial that Tune stops early (ASHA) leaks its workers' resources and the
    # next trial never starts (needs ray[default]).
    ray.init(_node_ip_address="127.0.0.1", num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
             include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env,
             configure_logging=False)


def should_restore(sweep: SweepConfig, resume: str) -> bool:
    """Whether to restore the Tune experiment in out_dir (`resume`: auto | always | never).

    Checked before Ray starts: a refusal costs nothing."""
    from ray.tune import Tuner

    out = Path(sweep.out_dir)
    exp_dir = out / "tune"
    plan_file = out / "sweep.json"
    if Tuner.can_restore(str(exp_dir)):
        if resume == "never":
            raise SweepError(f"{out} already holds a sweep; drop --no-resume to resume it, or use a new out_dir")
        fingerprint = json.loads(json.dumps(plan_fingerprint(sweep)))
        if plan_file.is_file() and json.loads(plan_file.read_text()) != fingerprint:
            raise SweepError(f"{out} holds a sweep of a different plan (params, search, base config, "
                             "overrides or eval split changed); use a new out_dir")
        return True
    if resume == "always":
        raise SweepError(f"--resume: {exp_dir} holds no sweep to resume")
    return False


def build_tuner(sweep: SweepConfig, restore: bool) -> Any:
    """A new Tuner, or the restored one of an existing sweep folder (see the module doc)."""
    from ray import tune

    from data_pipeline.shards import atomic_write_json

    out = Path(sweep.out_dir)
    exp_dir = out / "tune"
    fingerprint = plan_fingerprint(sweep)
    plan = {"base": fingerprint["base"], "runs_dir": str(out / "runs"), "train_storage": str(out / "train"),
            "eval_split": sweep.eval_split, "report_every": sweep.report_every,
            "workers_per_trial": sweep.workers_per_trial, "use_gpu": sweep.use_gpu,
            "cpus_per_worker": sweep.cpus_per_worker}
    trainable = tune.with_parameters(run_trial, plan=plan)
    if restore:
        print(f"sweep: resuming {exp_dir}", file=sys.stderr)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", fingerprint)
    scheduler = None
    if sweep.asha.enabled:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", metric=sweep.asha.metric, mode=sweep.asha.mode,
                                  max_t=sweep.asha.max_t or fingerprint["base"]["train"]["steps"],
                                  grace_period=sweep.asha.grace_period,
                                  reduction_factor=sweep.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=sweep.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(out),
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  verbose=1),
    )


# ---------------------------------------------------------------------------
# Results: CSV, Markdown, plot
# ---------------------------------------------------------------------------
def result_rows(grid: Any, sweep: SweepConfig) -> list[dict[str, Any]]:
    steps = int(trial_base_config(sweep)["train"]["steps"])
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        row: dict[str, Any] = {"trial": trial_id}
        for key in sweep.params:
            row[key] = (result.config or {}).get(key)
        reached = metrics.get("step")
        if result.error is not None:
            row["status"] = "error"
        elif reached is not None and reached < steps:
            row["status"] = f"stopped at step {reached}"
        else:
            row["status"] = "done"
        for key, value in metrics.items():
            if key in ("step", "loss", "samples_per_s", "checkpoint_path") or key.startswith("val/"):
                row[key] = value
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:200] if str(result.error).strip() else "error"
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _columns(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[str]:
    first = ["trial", *sweep.params, "status", "step", "loss", "samples_per_s"]
    val_main = ["val/mean_R@1", "val/mean_R@5", "val/mean_R@10", "val/num_complete"]
    keys = {k for r in rows for k in r}
    rest = sorted(k for k in keys if k not in first and k not in val_main and k not in ("checkpoint_path", "error"))
    return [c for c in first + val_main if c in keys] + rest + [c for c in ("checkpoint_path", "error") if c in keys]


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    from data_pipeline.shards import atomic_write_bytes
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def markdown_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    shown = [c for c in ["step", "loss", "val/mean_R@1", "val/mean_R@5", "val/mean_R@10", "val/num_complete"]
             if any(c in r for r in rows)]
    if sweep.metric not in shown and any(sweep.metric in r for r in rows):
        shown.append(sweep.metric)
    lines = [f"# Sweep {sweep.out_dir}", "",
             f"search: {sweep.search}, {len(rows)} trials, {sweep.workers_per_trial} workers each; "
             f"metric {sweep.metric} ({sweep.mode})", "",
             "| trial | params | status | " + " | ".join(shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for r in rows:
        params = ", ".join(f"{k}={_fmt(r.get(k))}" for k in sweep.params)
        lines.append(f"| {r['trial']} | {params} | {r['status']} | " + " | ".join(_fmt(r.get(c)) for c in shown) + " |")
    best = best_row(rows, sweep.metric, sweep.mode)
    if best is not None:
        params = ", ".join(f"{k}={_fmt(best.get(k))}" for k in sweep.params)
        lines += ["", f"Best by {sweep.metric} ({sweep.mode}): trial {best['trial']} ({params}): "
                      f"{_fmt(best[sweep.metric])}"]
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        lines.append(f"\nTrial {r['trial']} failed: {r['error']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], sweep: SweepConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={_fmt(r.get(k))}" for k in sweep.params) or r["trial"] for r in rows]
    values = [r.get(sweep.metric) if isinstance(r.get(sweep.metric), (int, float)) else float("nan") for r in rows]
    best = best_row(rows, sweep.metric, sweep.mode)
    colours = ["tab:orange" if best is not None and r is best else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4.0))
    bars = ax.bar(range(len(rows)), [0.0 if math.isnan(v) else v for v in values], color=colours)
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if math.isnan(v) else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center",
                       fontsize=8)
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{Path(sweep.out_dir).name}: {sweep.metric} per trial ({'higher' if sweep.mode == 'max' else 'lower'}"
                 " is better)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Path]:
    from data_pipeline.shards import atomic_write_bytes

    out = Path(sweep.out_dir)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png"}
    write_csv(rows, _columns(rows, sweep), paths["csv"])
    atomic_write_bytes(paths["md"], markdown_table(rows, sweep).encode())
    plot(rows, sweep, paths["png"])
    return paths


def summary_line(rows: list[dict[str, Any]], sweep: SweepConfig, paths: dict[str, Path]) -> str:
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "error" for r in rows)
    best = best_row(rows, sweep.metric, sweep.mode)
    best_text = "no trial reported it"
    if best is not None:
        params = ", ".join(f"{k}={_fmt(best.get(k))}" for k in sweep.params)
        best_text = f"{_fmt(best[sweep.metric])} ({params}, trial {best['trial']})"
    return (f"sweep {sweep.out_dir}: {done}/{len(rows)} trials done, {failed} failed; "
            f"best {sweep.metric} {best_text}; table {paths['md']}")


def run_sweep(path: str | Path, resume: str = "auto") -> tuple[SweepConfig, list[dict[str, Any]], dict[str, Path]]:
    """Run (or resume) the sweep of a sweep file; write and return the results."""
    if not os.environ.get("RAY_ADDRESS"):
        _loopback_only()  # before Ray is imported
    import ray

    sweep = load_sweep(path)
    restore = should_restore(sweep, resume)
    started_here = not ray.is_initialized()
    start_ray(sweep)
    try:
        grid = build_tuner(sweep, restore).fit()
        rows = result_rows(grid, sweep)
        return sweep, rows, write_results(rows, sweep)
    finally:
        if started_here:
            ray.shutdown()  # also flushes the workers' logs, so the summary comes last


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="run a Ray Tune sweep of distributed training runs",
                              description="Run (or resume) the sweep a SWEEP.yaml describes; see cluster/sweep.py.")
    p.add_argument("sweep_file")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="resume", action="store_const", const="always", default="auto",
                       help="resume the sweep in out_dir (an error if there is none); the default resumes "
                            "when there is one and starts a new sweep otherwise")
    group.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                       help="never resume: an error if out_dir already holds a sweep")
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep, rows, paths = run_sweep(args.sweep_file, args.resume)
    print(summary_line(rows, sweep, paths))
    return 1 if any(r["status"] == "error" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.sweep SWEEP.yaml` (the same as `calmrl sweep`)."""
    parser = argparse.ArgumentParser(prog="python -m cluster.sweep")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_sweep(args)
    except ConfigError as exc:
        print(f"calmrl: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
