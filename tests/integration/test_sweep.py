"""`calmrl sweep`: the sweep file is checked before anything starts, and a real
2-trial grid sweep (each trial a 2-worker Ray Train + DeepSpeed run on gloo,
on loopback) finishes with a table, a CSV and a plot, and resumes."""

from __future__ import annotations

import csv
import math
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cluster.sweep.config import SweepError, load_sweep
from cluster.sweep.report import markdown_table, result_rows, summary_line, write_results
from cluster.sweep.tuner import param_space
from tests.helpers import (
    REPO,  # noqa: E402
    run_cli,
    tiny_config,
)


def write_base(tmp_path: Path, shards: str | Path) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(shards, tmp_path / "unused").to_dict()))
    return base


def write_sweep(tmp_path: Path, base: Path, **fields) -> Path:
    tree = {
        "base_config": str(base),
        "out_dir": str(tmp_path / "sweep"),
        "search": "grid",
        "params": {"calibration.method": ["calmrl", "observed_only"]},
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# --- the sweep file ----------------------------------------------------------
@pytest.mark.parametrize(
    "fields,message",
    [
        ({"params": {"data.extra_missing_rate": [0.1, 0.2]}}, "not a config key"),
        ({"params": {"calibration": ["calmrl"]}}, "config section"),
        ({"params": {"train.lr": 3e-4}}, "must be a list"),
        ({"params": {"train.lr": {"loguniform": [1e-2, 1e-4]}}}, "low < high"),
        ({"params": {"calibration.method": ["calmrl", "bogus"]}}, "calibration.method"),
        ({"params": {"train.zero_stage": [1, 5]}}, "train.zero_stage"),
        ({"search": "bayes"}, "grid or random"),
        ({"searchh": "grid"}, "unknown key 'searchh'"),
        ({"metric": "val/mean_R@1"}, "eval_split"),
        ({"asha": {"enabled": True, "metric": "val/mean_R@1"}}, "asha.metric"),
        ({"overrides": {"calibration.method": "calmrl"}}, "both swept"),
        ({"overrides": {"train.out_dir": "/elsewhere"}}, "set per trial"),
    ],
)
def test_bad_sweep_files_are_rejected(tmp_path, fields, message):
    base = write_base(tmp_path, tmp_path / "shards")
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, base, **fields))


def test_search_spaces(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    base = write_base(tmp_path, "relative/shards")
    params = {
        "calibration.method": ["calmrl", "mean_fill"],
        "train.lr": {"loguniform": [1e-4, 3e-3]},
        "calibration.latent_dim": {"randint": [4, 17]},
        "loss.imputed_pair_weight": {"uniform": [0.2, 1.0]},
    }
    grid = load_sweep(write_sweep(tmp_path, base, params=params))
    space = param_space(grid)
    assert space["calibration.method"] == {"grid_search": ["calmrl", "mean_fill"]}
    assert isinstance(space["train.lr"], Float) and isinstance(space["calibration.latent_dim"], Integer)
    assert (grid.metric, grid.mode, grid.cpus_per_worker) == ("loss", "min", 0.5)
    assert Path(grid.out_dir).is_absolute() and Path(grid.base_config).is_absolute()

    rand = load_sweep(write_sweep(tmp_path, base, params=params, search="random", num_samples=5, eval_split="val"))
    assert isinstance(param_space(rand)["calibration.method"], Categorical)
    assert (rand.metric, rand.mode) == ("val/mean_R@1", "max")
    from cluster.sweep.config import trial_base_config

    # Trials run in other working directories: local paths become absolute.
    assert trial_base_config(rand)["data"]["shards"] == str((Path.cwd() / "relative/shards").resolve())


def test_example_sweep_file_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    sweep = load_sweep(REPO / "configs" / "sweeps" / "example.yaml")
    assert sweep.search == "grid" and len(param_space(sweep)) == 2
    assert sweep.out_dir == str(REPO / "runs" / "sweep_example")


def test_results_table_csv_and_plot_from_results(tmp_path):
    """Results of finished, early-stopped and failed trials (no Ray needed)."""
    base = write_base(tmp_path, tmp_path / "shards")
    sweep = load_sweep(write_sweep(tmp_path, base, eval_split="val", overrides={"train.steps": 8}))
    Path(sweep.out_dir).mkdir(parents=True)
    grid = [
        SimpleNamespace(
            metrics={"trial_id": "t_1", "step": 8, "loss": 2.5, "val/mean_R@1": 0.25},
            config={"calibration.method": "calmrl"},
            error=None,
            path="/x/t_1",
        ),
        SimpleNamespace(
            metrics={"trial_id": "t_2", "step": 4, "loss": 3.0},
            config={"calibration.method": "observed_only"},
            error=None,
            path="/x/t_2",
        ),
        SimpleNamespace(
            metrics=None,
            config={"calibration.method": "mean_fill"},
            error=RuntimeError("Traceback ...\nValueError: boom"),
            path="/x/t_3",
        ),
    ]
    rows = result_rows(grid, sweep)
    assert [r["status"] for r in rows] == ["done", "stopped at step 4", "error"]
    paths = write_results(rows, sweep)
    table = paths["md"].read_text()
    assert "| t_1 | calibration.method=calmrl | done | 8 | 2.5 | 0.25 |" in table
    assert "Best by val/mean_R@1 (max): trial t_1" in table and "ValueError: boom" in table
    assert len(list(csv.DictReader(paths["csv"].open()))) == 3
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1/3 trials done, 1 failed; best val/mean_R@1 0.25" in summary_line(rows, sweep, paths)
    assert markdown_table([], sweep).startswith("# Sweep")


# --- a real sweep ------------------------------------------------------------
def run_sweep_cli(sweep_file: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    """`calmrl sweep` with Ray's output and ours as one stream (`stdout`)."""
    done = run_cli("sweep", str(sweep_file), *extra, timeout=timeout, env={"RAY_AUTH_MODE": "disabled"})
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout + done.stderr, None)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_grid_sweep_of_distributed_runs(synthetic_dir, tmp_path):
    base = write_base(tmp_path, synthetic_dir / "train")
    sweep_file = write_sweep(
        tmp_path,
        base,
        overrides={"train.steps": 6, "train.warmup_steps": 2, "calibration.warmup_steps": 2},
        eval_split=str(synthetic_dir / "val"),
        workers_per_trial=2,
        use_gpu=False,
        cpus_per_worker=0.5,
        max_concurrent_trials=1,
        report_every=2,
    )
    done = run_sweep_cli(sweep_file, timeout=330)
    assert done.returncode == 0, done.stdout[-6000:]
    summary = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("sweep "))
    assert summary.startswith(f"sweep {tmp_path / 'sweep'}: 2/2 trials done, 0 failed; best val/mean_R@1"), summary

    # Ray Train's worker addresses (its MASTER_ADDR) are the loopback address only.
    addresses = set(re.findall(r"\(ip=([0-9a-f.:]+), pid=", done.stdout))
    assert addresses == {"127.0.0.1"}, addresses

    out = tmp_path / "sweep"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2
    assert sorted(r["calibration.method"] for r in rows) == ["calmrl", "observed_only"]
    for row in rows:
        assert row["status"] == "done" and row["step"] == "6" and math.isfinite(float(row["loss"]))
        assert 0.0 <= float(row["val/mean_R@1"]) <= 1.0 and int(row["val/num_complete"]) > 0
        run = out / "runs" / row["trial"]
        assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
        assert (run / "eval" / "eval.json").is_file()
        log = (run / "log.jsonl").read_text().splitlines()
        assert len(log) == 6  # both ranks trained 6 steps; rank 0 logged them
        # The checkpoint Ray Train kept is the self-contained run folder.
        assert (Path(row["checkpoint_path"]) / "checkpoints" / "latest").is_file()
    table = (out / "results.md").read_text()
    for row in rows:
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row['trial']} |"))
        assert f"calibration.method={row['calibration.method']}" in line
        assert f"{float(row['val/mean_R@1']):.4g}" in line  # the trial's validation metric
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The folder resumes: every trial is finished, so nothing reruns and the results are the same.
    again = run_sweep_cli(sweep_file, timeout=60)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "sweep: resuming" in again.stdout
    assert [r["val/mean_R@1"] for r in csv.DictReader((out / "results.csv").open())] == [
        r["val/mean_R@1"] for r in rows
    ]
    refused = run_sweep_cli(sweep_file, "--no-resume", timeout=30)
    assert refused.returncode == 2 and "already holds a sweep" in refused.stdout
