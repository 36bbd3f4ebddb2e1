"""`calmrl benchmark`: its parts (in-memory batches, feature towers, paired
aggregation and the goal check), the quick preset end to end through the real
console script (resume included), and the tuning on the validation split."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline.contract import DataConfig
from evals.benchmark.aggregate import aggregate, goal_verdicts
from evals.benchmark.memory import MemorySplit, memory_batches
from evals.benchmark.presets import METHODS, OBJECTIVES
from evals.benchmark.tuning import search_space
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


def _result(objective, method, rate, seed, own, cos=0.5, **extra):
    summary = {"own_R@1": own, "cos_R@1": cos, **extra}
    return {"dataset": "d", "objective": objective, "method": method, "rate": rate, "seed": seed, "summary": summary}


def test_aggregate_pairs_by_seed_and_checks_the_goal():
    seeds = range(5)
    shift = {
        "shift_observed_only text": 0.6,
        "shift_calibrated text": 0.2,
        "shift_calibrated_refit text": 0.1,
        "shift_observed_only image+text": 0.4,
        "shift_calibrated image+text": 0.5,
        "impute_calmrl text": 0.1,
        "impute_mean_fill text": 0.5,
        "impute_random_fill text": 1.0,
        "impute_calmrl_refit text": 0.1,
    }
    rows = [_result("gram", "observed_only", 0.5, s, 0.40 + 0.02 * s) for s in seeds]
    rows += [_result("gram", "calmrl", 0.5, s, 0.41 + 0.02 * s + 0.001 * (s % 2), **shift) for s in seeds]
    rows += [_result("gram", "drop_incomplete", 0.5, s, 0.45 - 0.03 * s) for s in seeds]
    rows += [_result("pairwise", "stage1", 0.0, s, 0.3, cos=0.3) for s in seeds]
    summary = aggregate(rows, (0.5,))
    diff = summary["d"]["paired"]["gram"]["observed_only"]["0.5"]["own_R@1"]
    assert diff.n == 5 and math.isclose(diff.mean, 0.0104) and diff.above_zero  # small, but the same at every seed
    other = summary["d"]["paired"]["gram"]["drop_incomplete"]["0.5"]["own_R@1"]
    assert not other.above_zero and not other.below_zero  # seeds disagree: no decision
    assert summary["d"]["stage1"]["cos_R@1"].mean == 0.3
    checks = {v["check"].split(" ")[0]: v for v in goal_verdicts(summary) if v["objective"] == "gram"}
    assert checks["R@1"]["met"]
    assert not checks["anchor"]["met"] and checks["anchor"]["failing"] == ["image+text"]
    assert checks["imputation"]["met"]


@pytest.fixture(scope="module")
def small_factors(tmp_path_factory):
    out = tmp_path_factory.mktemp("factors")
    done = run_cli(
        *["data", "build", "--source", "factors", "--num-samples", "600", "--shard-size", "100"], "--out", str(out)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test ceiling mean R@1" in done.stdout
    return out


def quick_args(data: Path, out: Path, cache: Path) -> list[str]:
    return ["benchmark", "--preset", "quick", f"--data-root=factors={data}", "--out", str(out), "--cache", str(cache)]


@pytest.mark.timeout(900)
def test_quick_preset_end_to_end_and_resume(small_factors, tmp_path):
    out, cache = tmp_path / "bench", tmp_path / "cache"
    args = quick_args(small_factors, out, cache)
    done = run_cli(*args, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "benchmark 'quick': 32 runs" in done.stdout
    report = json.loads((out / "benchmark.json").read_text())
    runs = report["runs"]
    stage2 = [r for r in runs if r["method"] != "stage1"]
    assert len([r for r in runs if r["method"] == "stage1"]) == 2 and len(stage2) == 30
    assert {r["objective"] for r in stage2} == set(OBJECTIVES) and {r["method"] for r in stage2} == set(METHODS)
    for r in stage2:
        assert r["steps"] == 12 and math.isfinite(r["summary"]["own_R@1"]) and math.isfinite(r["summary"]["cos_R@1"])
        if r["method"] == "oracle":
            assert set(r["train_patterns"]) == {"image+text+audio"} and r["rate"] == 0.0
        else:  # keep_text: text always there, image, audio or both hidden
            assert r["rate"] == 0.5 and set(r["train_patterns"]) == {
                "image+text+audio",
                "text+audio",
                "image+text",
                "text",
            }
    by = {(r["objective"], r["method"], r["seed"]): r for r in stage2}
    for seed in (0, 1):  # every method sees the same incomplete data at a seed
        assert by[("gram", "calmrl", seed)]["train_patterns"] == by[("pmrl", "observed_only", seed)]["train_patterns"]
    calmrl = by[("gram", "calmrl", 0)]
    assert "shift_calibrated_refit" in calmrl["summary"] and "impute_calmrl_refit text" in calmrl["summary"]
    assert "impute_calmrl" not in by[("gram", "mean_fill", 0)]["summary"]
    assert set(calmrl["metrics"]["joint_retrieval"]) == {
        "volume:anchor->data",
        "volume:data->anchor",
        "anchor:anchor->data",
        "anchor:data->anchor",
    }
    table = (out / "benchmark.md").read_text()
    assert "| gram | calmrl |" in table and "ceiling" in table and "paired difference" in table
    assert (out / "benchmark.png").stat().st_size > 10_000
    assert len((out / "benchmark.csv").read_text().splitlines()) == 33
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    assert len(stamps) == 32

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "calibrator_capacity.py"
    capacity = subprocess.run(
        [sys.executable, str(script), str(out / "runs" / "factors" / "gram-calmrl-r0.5-s0"), "--latent", "2,6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert capacity.returncode == 0, capacity.stderr[-3000:]
    assert "latent   2:" in capacity.stdout and "latent   6:" in capacity.stdout
    assert "linear regression from one modality: image->text" in capacity.stdout
    assert "calibrator capacity: best held-out log-likelihood at latent" in capacity.stdout
    compare = subprocess.run(
        [sys.executable, str(script.with_name("compare_benchmarks.py")), str(out), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "| factors | gram | calmrl | 0.5 | own_R@1 |" in compare.stdout
    assert compare.stdout.rstrip().endswith("0 differences with a 95% interval off zero (✔ above, ✘ below)")

    again = run_cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")} == stamps  # nothing retrained

    other = run_cli(*args, "--train.lr=1e-2", timeout=300)
    assert other.returncode != 0 and "use a new --out" in other.stderr


@pytest.mark.timeout(600)
def test_tuning_chooses_on_the_validation_split_with_equal_budgets(small_factors, tmp_path):
    out = tmp_path / "bench"
    args = [
        *quick_args(small_factors, out, tmp_path / "cache"),
        "--tune",
        "--tune-trials",
        "2",
        "--objectives",
        "pmrl",
        "--methods",
        "observed_only,calmrl",
        "--seeds",
        "0",
    ]
    done = run_cli(*args, timeout=500, env={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    tuned = yaml.safe_load((out / "tuning" / "tuned.yaml").read_text())
    chosen = tuned["factors"]["pmrl"]
    assert set(chosen["observed_only"]) == set(search_space("pmrl", "observed_only"))
    assert set(chosen["calmrl"]) == set(search_space("pmrl", "calmrl"))
    for method in ("observed_only", "calmrl"):  # the same number of trials for every method
        trials = list((out / "tuning" / "factors" / f"pmrl-{method}" / "runs").iterdir())
        assert len(trials) == 2
    settings = json.loads((out / "settings.json").read_text())
    assert settings["tuned"]["factors"]["pmrl"]["calmrl"] == chosen["calmrl"]  # the benchmark ran with them


def test_residual_feature_tower_starts_as_the_identity():
    data = DataConfig()
    x = {"audio": torch.randn(5, 12)}
    options = {"dim": 12, "norm": False, "residual": True}
    tower = build_tower("audio", TowerConfig(name="features", width=32, depth=2, options=options), data, 0)
    assert tower.out_dim == 12 and torch.equal(tower(x), x["audio"])
    plain = build_tower("audio", TowerConfig(name="features", depth=0, options={"dim": 12, "norm": False}), data, 0)
    assert torch.equal(plain(x), x["audio"])
    with pytest.raises(ValueError, match="norm"):
        build_tower("audio", TowerConfig(name="features", options={"dim": 12, "norm": "no"}), data, 0)
