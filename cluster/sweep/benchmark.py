"""`calmrl benchmark --tune`: the benchmark's hyperparameters, chosen by Ray Tune sweeps.

For every data set, objective and method of a preset: one benchmark sweep
(`kind: benchmark`) of `trials` random draws from that objective and method's
search space (evals.benchmark.tuning.search_space), each trial a stage-2 run at
the tuning rate and seed scored on the validation split by the objective's own
rule. Every method gets the same number of trials. The best draw of each
becomes that method's entry in the tuned-values file the benchmark reads.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from cluster.sweep.config import sweep_from_dict
from cluster.sweep.report import best_row
from cluster.sweep.tuner import loopback_only, run_sweep, start_ray
from data_pipeline.atomic import atomic_write
from evals.benchmark.presets import PRESETS, Preset
from evals.benchmark.tuning import BenchmarkTrial, search_space


def tune_benchmark(
    preset_name: str,
    preset: Preset,
    out: Path,
    trials: int,
    concurrent: int = 2,
    rate: float = 0.5,
    seed: int = 0,
    cache: str = "",
) -> Path:
    """Run the sweeps (resuming finished ones) and write OUT/tuned.yaml; returns its path."""
    if preset_name not in PRESETS:
        raise SystemExit(f"calmrl benchmark --tune: unknown preset {preset_name!r}")
    tuned: dict[str, Any] = {}
    lines: list[str] = []
    import ray

    loopback_only()
    started_here = not ray.is_initialized()
    try:
        _tune_all(preset_name, preset, out, trials, concurrent, rate, seed, cache, tuned, lines)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    path = out / "tuned.yaml"
    header = (
        f"# Chosen on the validation split by `calmrl benchmark --preset {preset_name} --tune "
        f"--tune-trials {trials}`:\n# {trials} random draws per data set, objective and method at missing "
        f"rate {rate:g}, seed {seed}, scored by each objective's own R@1.\n"
    )
    atomic_write(path, header + yaml.safe_dump(tuned, sort_keys=True))
    print("\n".join(lines))
    return path


def _tune_all(
    preset_name: str,
    preset: Preset,
    out: Path,
    trials: int,
    concurrent: int,
    rate: float,
    seed: int,
    cache: str,
    tuned: dict[str, Any],
    lines: list[str],
) -> None:
    """One sweep per data set, objective and method, on one Ray instance."""
    import ray

    for spec in preset.datasets:
        for objective in preset.objectives:
            for method in preset.methods:
                trial = BenchmarkTrial(
                    out=str(out / "stage1"),
                    preset=preset_name,
                    dataset=spec.name,
                    data_roots={spec.name: spec.root},
                    objective=objective,
                    method=method,
                    rate=rate,
                    seed=seed,
                    cache=cache,
                )
                tree = {
                    "kind": "benchmark",
                    "benchmark": asdict(trial),
                    "out_dir": str(out / spec.name / f"{objective}-{method}"),
                    "search": "random",
                    "num_samples": trials,
                    "params": search_space(objective, method),
                    "overrides": {},
                    "metric": "val/own_R@1",
                    "mode": "max",
                    "max_concurrent_trials": concurrent,
                    "cpus_per_worker": 1.0,
                }
                sweep = sweep_from_dict(tree, f"<tuning {spec.name} {objective} {method}>")
                if not ray.is_initialized():
                    start_ray(sweep)  # once for every sweep: run_sweep leaves a Ray it did not start running
                _, rows, _ = run_sweep(sweep)
                best = best_row(rows, sweep.metric, sweep.mode)
                if best is None:
                    raise SystemExit(
                        f"calmrl benchmark --tune: no trial of {spec.name} {objective} {method} "
                        f"finished; see {sweep.out_dir}"
                    )
                chosen = {k: _plain(best[k]) for k in sweep.params}
                tuned.setdefault(spec.name, {}).setdefault(objective, {})[method] = chosen
                lines.append(f"{spec.name} {objective} {method}: val own R@1 {best[sweep.metric]:.4f} with {chosen}")


def _plain(value: Any) -> Any:
    """Numbers as YAML prints them well (a tuned learning rate to 3 significant digits)."""
    if isinstance(value, float):
        return float(f"{value:.3g}")
    return value
