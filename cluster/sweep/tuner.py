"""Running the sweep: Ray on loopback (or the cluster in RAY_ADDRESS), the Tune
experiment (new, or restored from the sweep folder), and the end-to-end `run_sweep`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from cluster.sweep.config import SweepConfig, SweepError, load_sweep, plan_fingerprint
from cluster.sweep.report import result_rows, write_results
from cluster.sweep.worker import run_benchmark_trial, run_trial
from data_pipeline.atomic import atomic_write_json


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.params.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec) if sweep.search == "grid" else tune.choice(spec)
        else:
            kind, (low, high) = next(iter(spec.items()))
            space[key] = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](
                low, high
            )
    return space


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ---------------------------------------------------------------------------
# Running the sweep
# ---------------------------------------------------------------------------
def loopback_only() -> None:
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
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010  (an attribute Ray reads, not one it declares)


def start_ray(sweep: SweepConfig) -> None:
    env_vars = {
        k: os.environ[k]
        for k in ("TORCH_EXTENSIONS_DIR", "CALMRL_CACHE", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
        if k in os.environ
    }
    if not sweep.use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    runtime_env = {"env_vars": env_vars}
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            ray.init(runtime_env=runtime_env)  # join the cluster (as under a KubeRay RayJob)
        return
    loopback_only()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return
    # Logical CPUs: enough for the concurrent trials (driver + workers), at least the machine's.
    need = sweep.max_concurrent_trials * (1 + sweep.workers_per_trial * sweep.cpus_per_worker)
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's placement-group cleaner
    # needs: without it a trial that Tune stops early (ASHA) leaks its workers' resources and the
    # next trial never starts (needs ray[default]).
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        configure_logging=False,
    )


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
            raise SweepError(
                f"{out} holds a sweep of a different plan (params, search, base config, "
                "overrides or eval split changed); use a new out_dir"
            )
        return True
    if resume == "always":
        raise SweepError(f"--resume: {exp_dir} holds no sweep to resume")
    return False


def build_tuner(sweep: SweepConfig, restore: bool) -> Any:
    """A new Tuner, or the restored one of an existing sweep folder (see the module doc)."""
    from ray import tune

    out = Path(sweep.out_dir)
    exp_dir = out / "tune"
    fingerprint = plan_fingerprint(sweep)
    plan = {
        "base": fingerprint["base"],
        "runs_dir": str(out / "runs"),
        "train_storage": str(out / "train"),
        "eval_split": sweep.eval_split,
        "report_every": sweep.report_every,
        "workers_per_trial": sweep.workers_per_trial,
        "use_gpu": sweep.use_gpu,
        "cpus_per_worker": sweep.cpus_per_worker,
        "benchmark": fingerprint["benchmark"],
    }
    trainable = tune.with_parameters(run_benchmark_trial if sweep.kind == "benchmark" else run_trial, plan=plan)
    if restore:
        print(f"sweep: resuming {exp_dir}", file=sys.stderr)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", fingerprint)
    scheduler = None
    if sweep.asha.enabled:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="step",
            metric=sweep.asha.metric,
            mode=sweep.asha.mode,
            max_t=sweep.asha.max_t or fingerprint["base"]["train"]["steps"],
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            max_concurrent_trials=sweep.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(out),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=1,
        ),
    )


def run_sweep(
    path: str | Path | SweepConfig, resume: str = "auto"
) -> tuple[SweepConfig, list[dict[str, Any]], dict[str, Path]]:
    """Run (or resume) the sweep of a sweep file (or an already checked SweepConfig);
    write and return the results."""
    if not os.environ.get("RAY_ADDRESS"):
        loopback_only()  # before Ray is imported
    import ray

    sweep = path if isinstance(path, SweepConfig) else load_sweep(path)
    if sweep.kind == "benchmark":  # the trials' shared stage-1 run, made once before any trial starts
        from evals.benchmark.tuning import prepare

        prepare(sweep.benchmark)
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
