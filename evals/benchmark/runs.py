"""The benchmark's runs: planning them, training and evaluating each, resuming a folder."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.contract import MODALITIES
from data_pipeline.missing import impose_missing
from evals.benchmark.memory import (
    MemorySplit,
    default_cache_dir,
    embed_memory,
    frozen_modalities,
    load_memory_split,
    memory_batches,
)
from evals.benchmark.presets import DatasetSpec, Preset
from evals.benchmark.report import markdown, write_report
from evals.evaluate import embedding_metrics
from pretrain.config import Config, load_config
from pretrain.trainer import build_trainer


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    method: str
    rate: float  # extra missing rate imposed on the training split (0 for the oracle)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.rate:g}-s{self.seed}"


def run_config(spec: DatasetSpec, preset: Preset, run: RunSpec, out_dir: Path, feature_dims: dict[str, int]) -> Config:
    method = "observed_only" if run.method == "oracle" else run.method
    overrides = [
        *preset.overrides,
        f"--data.shards={Path(spec.root) / 'train'}",
        f"--calibration.method={method}",
        f"--data.extra_missing={run.rate}",
        f"--data.extra_missing_seed={run.seed}",
        f"--data.seed={run.seed}",
        f"--train.seed={run.seed}",
        f"--train.out_dir={out_dir}",
    ]
    return load_config(spec.config, [*overrides, *feature_tower_overrides(feature_dims)])


def feature_tower_overrides(feature_dims: dict[str, int]) -> list[str]:
    """Frozen towers become `features` towers over their cached outputs, keeping the
    frozen tower's width, depth and learning-rate multiplier from the config."""
    return [
        override
        for m, dim in feature_dims.items()
        for override in (
            f"--model.{m}.name=features",
            f"--model.{m}.freeze=false",
            f"--model.{m}.options={{dim: {dim}}}",
        )
    ]


def summarise_run(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat figures of one run that the tables aggregate."""
    row: dict[str, float] = {"mean_R@1": metrics["mean_R@1"]}
    for pair, m in metrics["retrieval"].items():
        row[f"R@1 {pair}"] = m["R@1"]
    shift = metrics.get("anchor_shift", {})
    if shift:
        row["anchor_shift_observed"] = sum(r["observed_only"] for r in shift.values()) / len(shift)
        if all("calibrated" in r for r in shift.values()):
            row["anchor_shift_calibrated"] = sum(r["calibrated"] for r in shift.values()) / len(shift)
    for method, per_modality in metrics.get("imputation_error", {}).items():
        row[f"imputation_cos_{method}"] = sum(v["cosine"] for v in per_modality.values()) / len(per_modality)
    return row


def train_and_evaluate(cfg: Config, train: MemorySplit, test: MemorySplit, run: RunSpec) -> dict[str, Any]:
    present = impose_missing(train.keys, train.present, run.rate, run.seed, cfg.data.extra_missing_mode)
    rows = torch.arange(len(train))
    if run.method == "oracle":  # complete tuples of the natural data, nothing hidden
        rows = present.all(1).nonzero(as_tuple=True)[0]
    data = train.select(rows)
    present = present[rows]
    started = time.perf_counter()
    trainer = build_trainer(cfg, batches=memory_batches(data, present, cfg.data.batch_size, run.seed))
    history = trainer.fit()
    train_s = time.perf_counter() - started
    model = trainer.model.eval()
    emb = embed_memory(model, test, trainer.device)
    metrics = embedding_metrics(emb, test.present, trainer.completion.calibrator)
    patterns: dict[str, int] = {}
    for p in present.tolist():
        name = "+".join(m for m, on in zip(MODALITIES, p) if on)
        patterns[name] = patterns.get(name, 0) + 1
    result = {
        **asdict(run),
        "train_samples": len(data),
        "train_patterns": patterns,
        "steps": trainer.step,
        "loss_first": history[0].loss,
        "loss_last": history[-1].loss,
        "train_s": train_s,
        "summary": summarise_run(metrics),
        "metrics": metrics,
    }
    del trainer, model
    gc.collect()
    return result


def ensure_data(spec: DatasetSpec) -> None:
    """Build the data set's shards when they are not there (as `calmrl data build` does)."""
    if (Path(spec.root) / "train" / "index.json").is_file() and (Path(spec.root) / "test" / "index.json").is_file():
        return
    from data_pipeline.sources import SOURCES, BuildOptions

    print(f"benchmark: {spec.root} has no shards; building them (calmrl data build --source {spec.source})")
    report = SOURCES[spec.source](BuildOptions(out=Path(spec.root), **spec.build_options))
    print(report.summary)


class SettingsMismatch(SystemExit):
    pass


def check_settings(preset: Preset, out: Path) -> None:
    """Resuming into `out` is only sound with the same settings: refuse otherwise.

    Seeds, rates and methods may grow (more runs); the data sets' configs and
    roots and the overrides must be the same as when `out` was started."""
    settings: dict[str, Any] = {
        "overrides": list(preset.overrides),
        "datasets": {
            d.name: {
                "root": str(Path(d.root).resolve()),
                "config": hashlib.sha256(Path(d.config).read_bytes()).hexdigest(),
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
                    f"calmrl benchmark: {out} holds {name} runs made with another config or data "
                    f"root ({before['datasets'][name]}); use a new --out"
                )
        if before["overrides"] != settings["overrides"]:
            raise SettingsMismatch(
                f"calmrl benchmark: {out} holds runs made with overrides {before['overrides']}, "
                f"not {settings['overrides']}; use a new --out"
            )
        settings["datasets"] = {**before["datasets"], **settings["datasets"]}
    atomic_write(path, json.dumps(settings, indent=1))


def plan_runs(preset: Preset, datasets: tuple[DatasetSpec, ...]) -> list[RunSpec]:
    runs = []
    for spec in datasets:
        for method in preset.methods:
            for rate in (0.0,) if method == "oracle" else preset.rates:
                for seed in preset.seeds:
                    runs.append(RunSpec(spec.name, method, rate, seed))
    return runs


def run_benchmark(preset: Preset, out: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Every run of the preset not already in `out`, then the report. Frozen-tower
    outputs are cached in `cache_dir` (default ~/.cache/calmrl/benchmark)."""
    out.mkdir(parents=True, exist_ok=True)
    check_settings(preset, out)
    cache_dir = cache_dir or default_cache_dir()
    datasets = preset.datasets
    runs = plan_runs(preset, datasets)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    rates = [f"{r:g}" for r in preset.rates]
    with tqdm(total=len(runs), desc="benchmark", unit="run", dynamic_ncols=True) as bar:
        for spec in datasets:
            ensure_data(spec)
            base = load_config(spec.config, [*preset.overrides, f"--data.shards={Path(spec.root) / 'train'}"])
            frozen = frozen_modalities(base)
            train = load_memory_split(base, Path(spec.root) / "train", cache_dir, frozen)
            test = load_memory_split(base, Path(spec.root) / "test", cache_dir, frozen)
            feature_dims = {m: int(train.inputs[m].shape[1]) for m in frozen}
            for run in (r for r in runs if r.dataset == spec.name):
                run_dir = out / "runs" / spec.name / run.name
                done = run_dir / "result.json"
                if done.is_file():
                    results.append(json.loads(done.read_text()))
                    bar.update(1)
                    continue
                cfg = run_config(spec, preset, run, run_dir, feature_dims)
                result = train_and_evaluate(cfg, train, test, run)
                atomic_write(done, json.dumps(result, indent=1))
                results.append(result)
                bar.update(1)
                bar.write(
                    f"{spec.name:>9} {run.name:<26} mean R@1 {result['summary']['mean_R@1']:.3f}  "
                    f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}  ({result['train_s']:.0f} s)"
                )
                write_report(results, out, rates)  # the report is current after every run
    summary, verdicts = write_report(results, out, rates)
    met = sum(v["met"] for v in verdicts)
    print(markdown(summary, verdicts, rates))
    print(
        f"benchmark '{preset.name}': {len(results)} runs in {(time.perf_counter() - started) / 60:.1f} min; "
        f"goal checks met {met}/{len(verdicts)}; tables {out / 'benchmark.md'}, plot {out / 'benchmark.png'}"
    )
    return {"summary": summary, "goal": verdicts, "runs": results}
