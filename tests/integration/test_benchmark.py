"""`calmrl benchmark`: its parts (in-memory batches, feature towers, the
aggregation and the goal check) and the `--quick` preset end to end through
the real console script, including resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_pipeline.contract import DataConfig
from evals.benchmark.aggregate import aggregate, goal_verdicts
from evals.benchmark.memory import MemorySplit, memory_batches
from evals.benchmark.presets import METHODS
from pretrain.config import TowerConfig
from pretrain.towers import build_tower
from tests.helpers import run_cli


def _split(n: int = 10) -> MemorySplit:
    gen = torch.Generator().manual_seed(0)
    return MemorySplit(
        inputs={
            "image": torch.rand(n, 3, 4, 4, generator=gen) + 0.1,
            "text": torch.randint(1, 9, (n, 5)),
            "text_mask": torch.ones(n, 5, dtype=torch.bool),
            "audio": torch.rand(n, 8) + 0.1,
        },
        present=torch.ones(n, 3, dtype=torch.bool),
        keys=[f"k{i}" for i in range(n)],
        label=torch.arange(n),
    )


def test_batches_zero_what_is_hidden_and_cover_each_epoch():
    split = _split()
    present = split.present.clone()
    present[::2, 0] = False  # image hidden on even rows
    present[1::2, 1] = False  # text hidden on odd rows
    stream = memory_batches(split, present, batch_size=5, seed=0)
    epoch = [next(stream), next(stream)]
    assert sorted(k for b in epoch for k in b["key"]) == sorted(split.keys)
    for b in epoch:
        rows = [int(k[1:]) for k in b["key"]]
        assert torch.equal(b["present"], present[rows])
        assert (b["image"][~b["present"][:, 0]] == 0).all() and (b["image"][b["present"][:, 0]] > 0).all()
        assert (b["text"][~b["present"][:, 1]] == 0).all() and not b["text_mask"][~b["present"][:, 1]].any()
        assert torch.equal(b["audio"], split.inputs["audio"][rows])
    with pytest.raises(ValueError, match="cannot fill a batch"):
        next(memory_batches(split, present, batch_size=11, seed=0))


def test_feature_tower_shapes_and_options():
    data = DataConfig()
    x = {"image": torch.randn(4, 20)}
    assert build_tower("image", TowerConfig(name="features", depth=0, options={"dim": 20}), data, 0)(x).shape == (4, 20)
    tower = build_tower("image", TowerConfig(name="features", width=7, depth=2, options={"dim": 20}), data, 0)
    assert tower.out_dim == 7 and tower(x).shape == (4, 7)
    with pytest.raises(ValueError, match="dim"):
        build_tower("text", TowerConfig(name="features"), data, 0)


def _result(dataset, method, rate, seed, r1, **extra):
    return {"dataset": dataset, "method": method, "rate": rate, "seed": seed, "summary": {"mean_R@1": r1, **extra}}


def test_aggregate_and_goal_verdicts():
    rows = [
        _result(
            "d",
            "calmrl",
            0.5,
            s,
            r,
            anchor_shift_observed=0.6,
            anchor_shift_calibrated=0.2 + s / 100,
            imputation_cos_calmrl=0.1,
            imputation_cos_mean_fill=0.5,
            imputation_cos_random_fill=1.0,
        )
        for s, r in enumerate([0.50, 0.52, 0.54])
    ]
    rows += [_result("d", "observed_only", 0.5, s, r) for s, r in enumerate([0.40, 0.41, 0.42])]
    rows += [_result("d", "drop_incomplete", 0.5, s, r) for s, r in enumerate([0.50, 0.55, 0.60])]
    summary = aggregate(rows)
    mean, std, n = summary["d"]["calmrl"]["0.5"]["mean_R@1"]
    assert (n, round(mean, 6), round(std, 6)) == (3, 0.52, 0.02)
    verdicts = {v["versus"].split(" ")[0]: v for v in goal_verdicts(summary, rates=("0.5",))}
    assert verdicts["observed_only"]["met"] and math.isclose(verdicts["observed_only"]["margin"], 0.11)
    assert not verdicts["drop_incomplete"]["met"]  # margin -0.03, spread 0.05
    assert verdicts["anchor"]["met"] and verdicts["imputation"]["met"]


@pytest.mark.timeout(900)
def test_quick_preset_end_to_end_and_resume(synthetic_dir, tmp_path):
    out, cache = tmp_path / "bench", tmp_path / "cache"
    args = [
        "benchmark",
        "--preset",
        "quick",
        f"--data-root=synthetic={synthetic_dir}",
        "--out",
        str(out),
        "--cache",
        str(cache),
    ]
    done = run_cli(*args, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "benchmark 'quick': 10 runs" in done.stdout
    report = json.loads((out / "benchmark.json").read_text())
    runs = report["runs"]
    assert sorted({r["method"] for r in runs}) == sorted(METHODS) and len(runs) == 10
    for r in runs:
        assert r["steps"] == 12 and all(math.isfinite(v) for v in r["summary"].values())
        assert r["metrics"]["num_complete"] > 10
        if r["method"] == "oracle":
            assert set(r["train_patterns"]) == {"image+text+audio"} and r["rate"] == 0.0
        else:
            assert r["rate"] == 0.5 and len(r["train_patterns"]) == 7
    by = {(r["method"], r["seed"]): r for r in runs}
    for seed in (0, 1):  # every method sees the same incomplete data at a seed
        assert by[("calmrl", seed)]["train_patterns"] == by[("observed_only", seed)]["train_patterns"]
    assert by[("calmrl", 0)]["train_patterns"] != by[("calmrl", 1)]["train_patterns"]
    assert "anchor_shift_calibrated" in by[("calmrl", 0)]["summary"]
    assert "imputation_cos_calmrl" not in by[("mean_fill", 0)]["summary"]
    table = (out / "benchmark.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and "missing 0.5" in table
    assert (out / "benchmark.png").stat().st_size > 10_000
    assert len((out / "benchmark.csv").read_text().splitlines()) == 11
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    assert len(stamps) == 10

    again = run_cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")} == stamps  # nothing retrained
    assert json.loads((out / "benchmark.json").read_text())["summary"] == report["summary"]

    other = run_cli(*args, "--train.lr=1e-2", timeout=300)
    assert other.returncode != 0 and "use a new --out" in other.stderr
