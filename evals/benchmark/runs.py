"""Planning and running the benchmark: stage 1 per seed, stage 2 per run, resumable.

Layout of OUT:
    settings.json                         what the folder was made with (a rerun must match)
    runs/DATASET/stage1-sS/               stage-1 run folder (config, log, checkpoint, result.json)
    runs/DATASET/stage1-sS/features.pt    its towers' outputs on train/val/test (stage 2's inputs)
    runs/DATASET/OBJ-METHOD-rR-sS/        stage-2 run folders with result.json
    benchmark.{json,csv,md,png}           the report, rewritten after every run
A rerun skips every run whose result.json exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.shards import read_index
from evals.benchmark.memory import MemorySplit, default_cache_dir, frozen_modalities, load_memory_split
from evals.benchmark.presets import DatasetSpec, Preset
from evals.benchmark.report import markdown, write_report
from evals.benchmark.stages import RunSpec, run_stage1, run_stage2, stage1_config, stage2_config, stage_features
from pretrain.config import Config, ConfigError, load_config
from pretrain.run_dir import RunDir


@dataclass
class DatasetState:
    """What stage 2 of one data set needs from stage 1 of one seed."""

    features: dict[str, MemorySplit]  # train / val / test as the stage-1 towers' outputs
    stage1_dir: Path
    config: Config  # stage 1's


class SettingsMismatch(SystemExit):
    pass


def ensure_data(spec: DatasetSpec) -> None:
    """Build the data set's shards when they are not there (as `calmrl data build` does)."""
    root = Path(spec.root)
    if all((root / s / "index.json").is_file() for s in ("train", "val", "test")):
        return
    if not spec.source:
        raise SystemExit(
            f"calmrl benchmark: {root} has no train/, val/ and test/ splits with an index.json; "
            "build them with `calmrl data build`"
        )
    from data_pipeline.sources import SOURCES, BuildOptions

    print(f"benchmark: {root} has no shards; building them (calmrl data build --source {spec.source})")
    report = SOURCES[spec.source](BuildOptions(out=root, **spec.build_options))
    print(report.summary)


def tuned_overrides(preset: Preset) -> dict[str, Any]:
    """{dataset: {objective: {method: {dotted key: value}}}} chosen on the validation split."""
    if not preset.tuned:
        return {}
    path = Path(preset.tuned)
    if not path.is_file():
        raise ConfigError(f"tuned values {path} not found: run `calmrl benchmark --tune` or pass --tuned ''")
    return yaml.safe_load(path.read_text()) or {}


def run_overrides(preset: Preset, tuned: dict[str, Any], run: RunSpec) -> list[str]:
    chosen = tuned.get(run.dataset, {}).get(run.objective, {}).get(run.method, {})
    return [*(f"--{k}={json.dumps(v)}" for k, v in sorted(chosen.items())), *preset.stage2_overrides]


def check_settings(preset: Preset, out: Path, tuned: dict[str, Any]) -> None:
    """Resuming into `out` is only sound with the same settings: refuse otherwise.

    Seeds, rates, objectives and methods may grow (more runs); the data sets'
    configs and roots, the overrides and the tuned values must not change."""
    settings: dict[str, Any] = {
        "overrides": [list(preset.stage1_overrides), list(preset.stage2_overrides)],
        "tuned": tuned,
        "datasets": {
            d.name: {
                "root": str(Path(d.root).resolve()),
                "configs": [hashlib.sha256(Path(c).read_bytes()).hexdigest() for c in (d.stage1, d.stage2)],
            }
            for d in preset.datasets
        },
    }
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        for name, now in settings["datasets"].items():
            if name in before["datasets"] and before["datasets"][name] != now:
                raise SettingsMismatch(
                    f"calmrl benchmark: {out} holds {name} runs made with other configs or data "
                    f"root ({before['datasets'][name]}); use a new --out"
                )
        for key in ("overrides", "tuned"):
            if before.get(key) != json.loads(json.dumps(settings[key])):
                raise SettingsMismatch(
                    f"calmrl benchmark: {out} holds runs made with other {key} ({before.get(key)}); use a new --out"
                )
        settings["datasets"] = {**before["datasets"], **settings["datasets"]}
    atomic_write(path, json.dumps(settings, indent=1))


def plan_runs(preset: Preset, dataset: str) -> list[RunSpec]:
    runs = []
    for seed in preset.seeds:
        runs.append(RunSpec(dataset, "pairwise", "stage1", 0.0, seed))
        for objective in preset.objectives:
            for method in preset.methods:
                for rate in (0.0,) if method == "oracle" else preset.rates:
                    runs.append(RunSpec(dataset, objective, method, rate, seed))
    return runs


def _save_features(path: Path, features: dict[str, MemorySplit]) -> None:
    buffer = io.BytesIO()
    torch.save({k: vars(v) for k, v in features.items()}, buffer)
    atomic_write(path, buffer.getvalue())


def _load_features(path: Path) -> dict[str, MemorySplit]:
    saved = torch.load(path, weights_only=False)
    return {k: MemorySplit(**v) for k, v in saved.items()}


def stage1(
    spec: DatasetSpec,
    preset: Preset,
    seed: int,
    out: Path,
    raw: dict[str, MemorySplit],
    frozen_dims: dict[str, int],
    evaluation: str,
    results: list[dict[str, Any]],
) -> DatasetState:
    """The seed's stage-1 run (trained unless its result and features are on disk); its
    result joins `results` with the `evaluation` split's summary."""
    run = RunSpec(spec.name, "pairwise", "stage1", 0.0, seed)
    run_dir = out / "runs" / spec.name / run.name
    done, features_file = run_dir / "result.json", run_dir / "features.pt"
    if done.is_file() and features_file.is_file():
        result = json.loads(done.read_text())
        state = DatasetState(_load_features(features_file), run_dir, RunDir(run_dir).config())
    else:
        cfg = stage1_config(spec, preset.stage1_overrides, seed, run_dir, frozen_dims)
        result, trainer = run_stage1(cfg, run, raw["train"], {"val": raw["val"], "test": raw["test"]})
        features = stage_features(trainer, raw)
        _save_features(features_file, features)
        atomic_write(done, json.dumps(result, indent=1))
        state = DatasetState(features, run_dir, cfg)
    results.append({**result, "summary": result["summaries"][evaluation]})
    return state


def run_benchmark(
    preset: Preset, out: Path, cache: Path | None = None, evaluation: str = "test", only: list[RunSpec] | None = None
) -> dict[str, Any]:
    """Every run of the preset not already in `out`, then the report. `evaluation`
    names the split that scores the runs ("val" when choosing hyperparameters: the
    test split is never used for choosing). `only` restricts stage 2 to those runs."""
    out.mkdir(parents=True, exist_ok=True)
    tuned = tuned_overrides(preset)
    check_settings(preset, out, tuned)
    cache = cache or default_cache_dir()
    results: list[dict[str, Any]] = []
    datasets: dict[str, Any] = {}
    started = time.perf_counter()
    plans = {
        spec.name: [r for r in plan_runs(preset, spec.name) if only is None or r.stage == 1 or r in only]
        for spec in preset.datasets
    }
    with tqdm(total=sum(len(p) for p in plans.values()), desc="benchmark", unit="run", dynamic_ncols=True) as bar:
        for spec in preset.datasets:
            ensure_data(spec)
            base = load_config(spec.stage1, [*preset.stage1_overrides, f"--data.shards={Path(spec.root) / 'train'}"])
            frozen = frozen_modalities(base)
            raw = {
                split: load_memory_split(base, Path(spec.root) / split, cache, frozen)
                for split in ("train", "val", "test")
            }
            frozen_dims = {m: int(raw["train"].inputs[m].shape[1]) for m in frozen}
            n_eval = int(raw[evaluation].present.all(1).sum())
            datasets[spec.name] = {
                "split": evaluation,
                "n_eval": n_eval,
                "chance": 1.0 / max(n_eval, 1),
                "ceiling": read_index(Path(spec.root) / evaluation).get("ceiling"),
            }
            for seed in preset.seeds:
                state = stage1(spec, preset, seed, out, raw, frozen_dims, evaluation, results)
                bar.update(1)
                feature_dims = {m: int(v.shape[1]) for m, v in state.features["train"].inputs.items()}
                for run in (r for r in plans[spec.name] if r.stage == 2 and r.seed == seed):
                    run_dir = out / "runs" / spec.name / run.name
                    done = run_dir / "result.json"
                    if done.is_file():
                        results.append(json.loads(done.read_text()))
                        bar.update(1)
                        continue
                    cfg = stage2_config(
                        spec,
                        run,
                        run_overrides(preset, tuned, run),
                        run_dir,
                        state.stage1_dir,
                        feature_dims,
                        state.config,
                    )
                    result = run_stage2(
                        cfg, run, state.features["train"], state.features[evaluation], spec.missing_mode
                    )
                    atomic_write(done, json.dumps(result, indent=1))
                    results.append(result)
                    bar.update(1)
                    s = result["summary"]
                    bar.write(
                        f"{spec.name:>9} {run.name:<34} own R@1 {s['own_R@1']:.3f}  cos R@1 {s['cos_R@1']:.3f}"
                        f"  ({result['train_s']:.0f} s)"
                    )
                write_report(results, out, preset, datasets)  # the report is current after every seed
    report = write_report(results, out, preset, datasets)
    print(markdown(report))
    verdicts = report["goal"]
    met = sum(v["met"] for v in verdicts)
    print(
        f"benchmark '{preset.name}': {len(results)} runs in {(time.perf_counter() - started) / 60:.1f} min; "
        f"goal checks met {met}/{len(verdicts)}; tables {out / 'benchmark.md'}, plot {out / 'benchmark.png'}"
    )
    return report
