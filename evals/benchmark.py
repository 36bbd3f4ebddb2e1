"""`calmrl benchmark`: the missing-modality benchmark.

Five methods with the same encoders, steps and seeds:
  oracle           observed-only alignment on the complete training tuples,
                   with no extra missing entries (the upper reference);
  drop_incomplete  only complete tuples align;
  observed_only    align what is present (local anchors);
  mean_fill        missing vectors = the running mean of their modality;
  calmrl           missing vectors imputed by the calibrator (METHOD.md).
Each non-oracle method trains at every extra missing rate, imposed on the
training split by `data_pipeline.missing` (the same entries hidden for every
method at a given seed), and every run is evaluated on the complete test
instances: retrieval R@1 for all six ordered modality pairs, anchor shift
per missing pattern (without and, for CalMRL, with calibration) and
imputation error (CalMRL against mean- and random-fill).

How a run is made: each data set's train and test splits are read once,
through the real shard reader, into memory. Towers marked `freeze: true` in
the data set's config (the pretrained image and text towers of the Tux Paint
preset) are run once over those splits and their outputs cached on disk
(`~/.cache/calmrl/benchmark`, named by content); the runs then train
`features` towers (LayerNorm + `depth` GELU layers of `width`, taken from the
frozen tower's config) on the cached outputs: what training beside a frozen
tower computes, at a fraction of the cost. Every run is a real DeepSpeed
`Trainer` fed in-memory batches. Finished runs keep their `result.json`;
running the same command again skips them (resume).

Outputs in OUT: benchmark.json (every run and the summary), benchmark.csv
(one row per run), benchmark.md (the tables) and benchmark.png (R@1 against
the missing rate, one panel per data set).
"""
from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.config import MODALITIES, Config, TowerConfig, load_config

METHODS = ("oracle", "drop_incomplete", "observed_only", "mean_fill", "calmrl")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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
SYNTHETIC = DatasetSpec("synthetic", "synthetic", "data/synthetic-complete", str(CONFIG_DIR / "bench_synthetic.yaml"),
                        {"missing": (0.0, 0.0, 0.0), "num_samples": 2000, "shard_size": 200})
PRESETS: dict[str, Preset] = {
    "full": Preset("full", (TUXPAINT, SYNTHETIC)),
    "tuxpaint": Preset("tuxpaint", (TUXPAINT,)),
    "synthetic": Preset("synthetic", (SYNTHETIC,)),
    # Small enough for the test suite: every method, one rate, two seeds, few steps.
    "quick": Preset("quick", (SYNTHETIC,), rates=(0.5,), seeds=(0, 1),
                    overrides=("--train.steps=12", "--train.warmup_steps=2", "--calibration.warmup_steps=4",
                               "--data.batch_size=32", "--train.log_every=6")),
}


# ----------------------------------------------------------------------------- data in memory


@dataclass
class MemorySplit:
    """Every sample of a split as tensors of the batch contract (or cached features)."""

    inputs: dict[str, torch.Tensor]  # "image", "text", "text_mask", "audio" -> [N, ...]
    present: torch.Tensor  # [N, M] bool
    keys: list[str]
    label: torch.Tensor  # [N]

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows: torch.Tensor) -> "MemorySplit":
        return MemorySplit({k: v[rows] for k, v in self.inputs.items()}, self.present[rows],
                           [self.keys[i] for i in rows.tolist()], self.label[rows])

    def batch(self, rows: torch.Tensor, present: torch.Tensor | None = None) -> dict[str, Any]:
        """Rows as a batch; inputs of absent modalities are zeroed, so nothing hidden leaks."""
        present = (self.present if present is None else present)[rows]
        out: dict[str, Any] = {"present": present, "label": self.label[rows],
                               "key": [self.keys[i] for i in rows.tolist()]}
        for name, value in self.inputs.items():
            j = MODALITIES.index(name.split("_")[0])
            v = value[rows]
            mask = present[:, j].reshape(-1, *([1] * (v.ndim - 1)))
            out[name] = v * mask.to(v.dtype) if v.dtype != torch.bool else v & mask
        return out


def frozen_modalities(cfg: Config) -> list[str]:
    return [m for m in MODALITIES if getattr(cfg.model, m).freeze]


def _cache_name(cfg: Config, split_dir: Path, frozen: list[str]) -> str:
    """A cache file named by everything that decides its content: the split's
    index (its shards and counts), the data settings and the frozen towers."""
    index = hashlib.sha256((split_dir / "index.json").read_bytes()).hexdigest()
    what = {"index": index, "split": str(split_dir.resolve()),
            "data": {k: v for k, v in asdict(cfg.data).items()
                     if k not in ("shards", "batch_size", "num_workers") and not k.startswith("extra_missing")},
            "towers": {m: [getattr(cfg.model, m).name, getattr(cfg.model, m).options] for m in frozen}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{split_dir.parent.name}-{split_dir.name}-{digest}.pt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CALMRL_CACHE", Path.home() / ".cache" / "calmrl")) / "benchmark"


@torch.no_grad()
def load_memory_split(cfg: Config, split_dir: str | Path, cache_dir: Path, frozen: list[str]) -> MemorySplit:
    """Read a split through the real reader; replace frozen modalities by their tower's outputs.

    Cached in `cache_dir` (written to a temporary name, then renamed)."""
    from data_pipeline.reader import BadInputLog, iterate_split
    from pretrain.model import MultiModalModel
    from pretrain.trainer import vocab_size_of

    path = cache_dir / _cache_name(cfg, Path(split_dir), frozen)
    if path.is_file():
        return MemorySplit(**torch.load(path, weights_only=False))
    towers = {}
    if frozen:
        model = MultiModalModel(cfg.model, cfg.data, vocab_size_of(cfg)).eval()
        towers = {m: model.towers[m] for m in frozen}
    parts: dict[str, list[torch.Tensor]] = {}
    present, labels, keys = [], [], []
    bad = BadInputLog()
    batches = iterate_split(cfg.data, split_dir, 64, bad)
    for batch in tqdm(batches, desc=f"read {split_dir}" + (f" ({', '.join(frozen)} features)" if frozen else ""),
                      unit="batch", leave=False):
        real = torch.tensor([k != "" for k in batch["key"]])
        inputs = {k: v[real] for k, v in batch.items()
                  if isinstance(v, torch.Tensor) and k.split("_")[0] in MODALITIES}
        for m, tower in towers.items():
            feats = tower({k: v for k, v in inputs.items() if k.startswith(m)})
            for k in [k for k in inputs if k.startswith(m)]:
                del inputs[k]
            inputs[m] = feats.float()
        for k, v in inputs.items():
            parts.setdefault(k, []).append(v)
        present.append(batch["present"][real])
        labels.append(batch["label"][real])
        keys += [k for k in batch["key"] if k]
    if not keys:
        raise RuntimeError(f"split {split_dir} holds no readable sample ({bad.count} bad)")
    split = MemorySplit({k: torch.cat(v) for k, v in parts.items()}, torch.cat(present), keys, torch.cat(labels))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save(asdict(split), tmp)
    os.replace(tmp, path)
    return split


def memory_batches(split: MemorySplit, present: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Endless epochs of shuffled full batches (the last partial batch of an epoch is dropped)."""
    n = len(split)
    if n < batch_size:
        raise ValueError(f"{n} training samples cannot fill a batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield split.batch(order[start:start + batch_size], present)


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    method: str
    rate: float  # extra missing rate imposed on the training split (0 for the oracle)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.rate:g}-s{self.seed}"


def run_config(spec: DatasetSpec, preset: Preset, run: RunSpec, out_dir: Path,
               feature_dims: dict[str, int]) -> Config:
    method = "observed_only" if run.method == "oracle" else run.method
    overrides = [*preset.overrides, f"--data.shards={Path(spec.root) / 'train'}",
                 f"--calibration.method={method}", f"--data.extra_missing={run.rate}",
                 f"--data.extra_missing_seed={run.seed}", f"--data.seed={run.seed}", f"--train.seed={run.seed}",
                 f"--train.out_dir={out_dir}"]
    cfg = load_config(spec.config, overrides)
    for m, dim in feature_dims.items():  # frozen towers -> `features` towers over their cached outputs,
        frozen = getattr(cfg.model, m)  # with the frozen tower's width and depth
        setattr(cfg.model, m, TowerConfig(name="features", width=frozen.width, depth=frozen.depth,
                                          options={"dim": dim}, lr_mult=frozen.lr_mult))
    return cfg


@torch.no_grad()
def embed_memory(model: torch.nn.Module, split: MemorySplit, device: torch.device,
                 batch_size: int = 256) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in split.batch(rows).items()}
        emb = model(batch)["emb"]
        for m in MODALITIES:
            out[m].append(emb[m].float().cpu())
    return {m: torch.cat(v) for m, v in out.items()}


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
    from data_pipeline.missing import impose_missing
    from evals.evaluate import embedding_metrics
    from pretrain.trainer import Trainer

    present = impose_missing(train.keys, train.present, run.rate, run.seed, cfg.data.extra_missing_mode)
    rows = torch.arange(len(train))
    if run.method == "oracle":  # complete tuples of the natural data, nothing hidden
        rows = present.all(1).nonzero(as_tuple=True)[0]
    data = train.select(rows)
    present = present[rows]
    started = time.perf_counter()
    trainer = Trainer(cfg, batches=memory_batches(data, present, cfg.data.batch_size, run.seed), progress=False)
    history = trainer.fit()
    train_s = time.perf_counter() - started
    model = trainer.engine.module.eval()
    emb = embed_memory(model, test, trainer.device)
    metrics = embedding_metrics(emb, test.present, trainer.completion.calibrator)
    patterns: dict[str, int] = {}
    for p in present.tolist():
        name = "+".join(m for m, on in zip(MODALITIES, p) if on)
        patterns[name] = patterns.get(name, 0) + 1
    result = {**asdict(run), "train_samples": len(data), "train_patterns": patterns, "steps": trainer.step,
              "loss_first": history[0].loss, "loss_last": history[-1].loss, "train_s": train_s,
              "summary": summarise_run(metrics), "metrics": metrics}
    del trainer, model
    gc.collect()
    return result


# ----------------------------------------------------------------------------- aggregation


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{dataset: {method: {rate: {metric: [mean, std, n]}}}} over seeds."""
    groups: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"], r["rate"]), []).append(r["summary"])
    out: dict[str, Any] = {}
    for (dataset, method, rate), rows in sorted(groups.items()):
        metrics = sorted({k for row in rows for k in row})
        cell = {k: [*_mean_std([row.get(k, float("nan")) for row in rows]), len(rows)] for k in metrics}
        out.setdefault(dataset, {}).setdefault(method, {})[f"{rate:g}"] = cell
    return out


def goal_verdicts(summary: dict[str, Any], rates: tuple[str, ...] = ("0.5", "0.7")) -> list[dict[str, Any]]:
    """Issue 5's goal, per data set and rate: CalMRL's mean R@1 above observed-only
    and above drop-incomplete by more than the seed spread (the larger of the two
    standard deviations), and calibrated anchor shift and CalMRL imputation error
    below their references."""
    verdicts = []
    for dataset, methods in summary.items():
        for rate in rates:
            cal = methods.get("calmrl", {}).get(rate)
            if cal is None:
                continue
            for baseline in ("observed_only", "drop_incomplete"):
                other = methods.get(baseline, {}).get(rate)
                if other is None:
                    continue
                margin = cal["mean_R@1"][0] - other["mean_R@1"][0]
                spread = max(cal["mean_R@1"][1], other["mean_R@1"][1])
                verdicts.append({"dataset": dataset, "rate": rate, "versus": baseline, "margin": margin,
                                 "spread": spread, "met": margin > spread})
            if "anchor_shift_calibrated" in cal:
                verdicts.append({"dataset": dataset, "rate": rate, "versus": "anchor shift (observed-only anchor)",
                                 "margin": cal["anchor_shift_observed"][0] - cal["anchor_shift_calibrated"][0],
                                 "spread": cal["anchor_shift_calibrated"][1],
                                 "met": cal["anchor_shift_calibrated"][0] < cal["anchor_shift_observed"][0]})
            if "imputation_cos_calmrl" in cal:
                best_fill = min(cal["imputation_cos_mean_fill"][0], cal["imputation_cos_random_fill"][0])
                verdicts.append({"dataset": dataset, "rate": rate, "versus": "imputation error (best of mean/random fill)",
                                 "margin": best_fill - cal["imputation_cos_calmrl"][0],
                                 "spread": cal["imputation_cos_calmrl"][1],
                                 "met": cal["imputation_cos_calmrl"][0] < best_fill})
    return verdicts


def _cell(stat: list[float] | None) -> str:
    if stat is None or math.isnan(stat[0]):
        return "-"
    return f"{stat[0]:.3f} ± {stat[1]:.3f}"


def markdown(summary: dict[str, Any], verdicts: list[dict[str, Any]], rates: list[str]) -> str:
    lines: list[str] = []
    for dataset, methods in summary.items():
        lines += [f"### {dataset}: mean R@1 over the six modality pairs (complete test instances; mean ± std over seeds)",
                  "", "| method | " + " | ".join(f"missing {r}" for r in rates) + " |",
                  "|---|" + "---|" * len(rates)]
        for method in METHODS:
            if method not in methods:
                continue
            if method == "oracle":
                cells = [_cell(next(iter(methods[method].values()))["mean_R@1"])] * len(rates)
            else:
                cells = [_cell(methods[method].get(r, {}).get("mean_R@1")) for r in rates]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        cal = methods.get("calmrl", {})
        if cal:
            lines += ["", f"{dataset}, CalMRL runs: mean anchor shift over missing patterns and mean imputation "
                          "cosine distance over hidden modalities", "",
                      "| missing | anchor shift observed-only | anchor shift calibrated | "
                      "imputation CalMRL | mean-fill | random-fill |", "|---|---|---|---|---|---|"]
            for r in rates:
                c = cal.get(r, {})
                lines.append(f"| {r} | " + " | ".join(_cell(c.get(k)) for k in (
                    "anchor_shift_observed", "anchor_shift_calibrated", "imputation_cos_calmrl",
                    "imputation_cos_mean_fill", "imputation_cos_random_fill")) + " |")
        lines.append("")
    if verdicts:
        lines += ["### Goal (CalMRL better by more than the seed spread)", "",
                  "| data set | missing | versus | margin | spread | met |", "|---|---|---|---|---|---|"]
        for v in verdicts:
            lines.append(f"| {v['dataset']} | {v['rate']} | {v['versus']} | {v['margin']:+.3f} | "
                         f"{v['spread']:.3f} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.2), squeeze=False)
    for ax, (dataset, methods) in zip(axes[0], summary.items()):
        for method in METHODS:
            if method not in methods:
                continue
            if method == "oracle":
                mean, std, _ = next(iter(methods[method].values()))["mean_R@1"]
                ax.axhline(mean, color="black", ls="--", label=f"oracle (complete data) {mean:.3f}")
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
                continue
            rates = sorted(methods[method], key=float)
            ax.errorbar([float(r) for r in rates], [methods[method][r]["mean_R@1"][0] for r in rates],
                        yerr=[methods[method][r]["mean_R@1"][1] for r in rates], marker="o", capsize=3,
                        label=method, lw=2.5 if method == "calmrl" else 1.2)
        ax.set_title(f"{dataset}: mean R@1 (test, complete)")
        ax.set_xlabel("extra missing rate imposed on the training split")
        ax.set_ylabel("mean R@1 over 6 modality pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(results: list[dict[str, Any]], out: Path, rates: list[str]) -> tuple[dict[str, Any], list]:
    summary = aggregate(results)
    verdicts = goal_verdicts(summary)
    write_atomic(out / "benchmark.json", json.dumps({"summary": summary, "goal": verdicts, "runs": results}, indent=1))
    columns = sorted({k for r in results for k in r["summary"]})
    with open(out / ".tmp-benchmark.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "method", "rate", "seed", "train_samples", "steps", "train_s", *columns])
        for r in results:
            writer.writerow([r["dataset"], r["method"], r["rate"], r["seed"], r["train_samples"], r["steps"],
                             f"{r['train_s']:.1f}", *[r["summary"].get(c, "") for c in columns]])
    os.replace(out / ".tmp-benchmark.csv", out / "benchmark.csv")
    write_atomic(out / "benchmark.md", markdown(summary, verdicts, rates))
    plot(summary, out / "benchmark.png")
    return summary, verdicts


# ----------------------------------------------------------------------------- the command


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
    settings = {"overrides": list(preset.overrides),
                "datasets": {d.name: {"root": str(Path(d.root).resolve()),
                                      "config": hashlib.sha256(Path(d.config).read_bytes()).hexdigest()}
                             for d in preset.datasets}}
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        for name, now in settings["datasets"].items():
            if name in before["datasets"] and before["datasets"][name] != now:
                raise SettingsMismatch(f"calmrl benchmark: {out} holds {name} runs made with another config or data "
                                       f"root ({before['datasets'][name]}); use a new --out")
        if before["overrides"] != settings["overrides"]:
            raise SettingsMismatch(f"calmrl benchmark: {out} holds runs made with overrides {before['overrides']}, "
                                   f"not {settings['overrides']}; use a new --out")
        settings["datasets"] = {**before["datasets"], **settings["datasets"]}
    write_atomic(path, json.dumps(settings, indent=1))


def plan_runs(preset: Preset, datasets: tuple[DatasetSpec, ...]) -> list[RunSpec]:
    runs = []
    for spec in datasets:
        for method in preset.methods:
            for rate in ((0.0,) if method == "oracle" else preset.rates):
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
                write_atomic(done, json.dumps(result, indent=1))
                results.append(result)
                bar.update(1)
                bar.write(f"{spec.name:>9} {run.name:<26} mean R@1 {result['summary']['mean_R@1']:.3f}  "
                          f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}  ({result['train_s']:.0f} s)")
                write_report(results, out, rates)  # the report is current after every run
    summary, verdicts = write_report(results, out, rates)
    met = sum(v["met"] for v in verdicts)
    print(markdown(summary, verdicts, rates))
    print(f"benchmark '{preset.name}': {len(results)} runs in {(time.perf_counter() - started) / 60:.1f} min; "
          f"goal checks met {met}/{len(verdicts)}; tables {out / 'benchmark.md'}, plot {out / 'benchmark.png'}")
    return {"summary": summary, "goal": verdicts, "runs": results}


def add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="the missing-modality benchmark: 5 methods x missing rates x seeds",
                       description=__doc__ + "\nExtra --section.key=value arguments override every run's config "
                       "(ablations, e.g. --loss.objective=gram --calibration.latent_dim=8).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS),
                   help="full (Tux Paint and synthetic), tuxpaint, synthetic, or quick (the test suite's)")
    p.add_argument("--out", default=None, help="output folder (default runs/benchmark-PRESET); reruns resume")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=DIR",
                   help="where a data set's shards are (e.g. synthetic=/tmp/syn); built there when missing")
    p.add_argument("--cache", default=None, help="where frozen-tower outputs are cached "
                   "(default $CALMRL_CACHE/benchmark or ~/.cache/calmrl/benchmark); named by content")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--rates", default=None, help="comma-separated extra missing rates (default: the preset's)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")


def cmd_benchmark(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """`overrides` (--section.key=value) apply to every run, after the preset's own."""
    preset = PRESETS[args.preset]
    roots = {}
    for item in args.data_root:
        name, sep, root = item.partition("=")
        if not sep or name not in {d.name for d in preset.datasets}:
            raise SystemExit(f"calmrl benchmark: --data-root '{item}': expected NAME=DIR with NAME one of "
                             f"{', '.join(d.name for d in preset.datasets)}")
        roots[name] = root
    changes: dict[str, Any] = {"datasets": tuple(replace(d, root=roots.get(d.name, d.root)) for d in preset.datasets),
                               "overrides": (*preset.overrides, *(overrides or []))}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.rates:
        changes["rates"] = tuple(float(r) for r in args.rates.split(","))
    if args.methods:
        methods = tuple(args.methods.split(","))
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise SystemExit(f"calmrl benchmark: unknown method(s) {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(METHODS)}")
        changes["methods"] = methods
    preset = replace(preset, **changes)
    run_benchmark(preset, Path(args.out or f"runs/benchmark-{args.preset}"), Path(args.cache) if args.cache else None)
    return 0
