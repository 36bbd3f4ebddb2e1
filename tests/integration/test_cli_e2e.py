"""End to end through the real `calmrl` console script: build shards, train
with 2 processes under torchrun, evaluate the checkpoint."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO
from tests.helpers import run_cli as run


@pytest.mark.timeout(600)
def test_build_train_eval(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "run"
    built = run(
        "data", "build", "--source", "synthetic", "--out", str(data), "--num-samples", "600", "--shard-size", "60"
    )
    assert built.returncode == 0, built.stderr
    assert "train 480 samples in 8 shards" in built.stdout

    small = "--train.steps=8 --train.ckpt_every=4 --train.log_every=1 --data.batch_size=16 --model.text.depth=1"
    trained = run(
        "train",
        "configs/tiny_cpu.yaml",
        "--nproc",
        "2",
        f"--data.shards={data / 'train'}",
        f"--train.out_dir={runs}",
        *small.split(),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trained to step 8/8" in trained.stdout
    assert (runs / "checkpoints" / "latest").read_text() == "step_00000008"
    log = [json.loads(line) for line in (runs / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))

    # Continued training from that run: its weights, a fresh schedule, one process.
    continued = run(
        "train",
        "configs/tiny_cpu.yaml",
        "--init-from",
        f"{runs}:step_00000004",
        f"--data.shards={data / 'train'}",
        f"--train.out_dir={tmp_path / 'continued'}",
        "--train.steps=2",
        "--train.warmup_steps=1",
        "--data.batch_size=16",
        "--model.text.depth=1",
        "--loss.objective=gram",
        "--loss.pairwise_weight=1",
    )
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "trained to step 2/2" in continued.stdout
    recorded = (tmp_path / "continued" / "config.yaml").read_text()
    assert f"init_from: {runs}:step_00000004" in recorded
    missing = run("train", "configs/tiny_cpu.yaml", "--init-from", str(tmp_path / "nowhere"), timeout=60)
    assert missing.returncode == 2 and "not a calmrl run folder" in missing.stderr

    evaluated = run("eval", str(runs), "--data", str(data / "test"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((runs / "eval" / "eval.json").read_text())
    assert results["checkpoint"] == "step_00000008"
    assert set(results["retrieval"]) == {
        "image->text",
        "image->audio",
        "text->image",
        "text->audio",
        "audio->image",
        "audio->text",
    }
    for metrics in results["retrieval"].values():
        assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1.0
    assert "mean R@1" in evaluated.stdout
    shift = results["anchor_shift"]  # the run used CalMRL: both anchors are reported
    assert len(shift) == 6 and all("calibrated" in row for row in shift.values())
    assert set(results["imputation_error"]) == {"calmrl", "mean_fill", "random_fill"}
    assert set(results["zero_shot"]) == {"image", "audio"}
    assert (runs / "eval" / "eval.png").stat().st_size > 10_000 and (runs / "eval" / "eval.md").exists()


def test_typo_in_config_fails_at_start(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / "configs/tiny_cpu.yaml").read_text().replace("  lr:", "  lrr:"))
    result = run("train", str(bad), "--nproc", "2", timeout=60)
    assert result.returncode == 2
    assert "train.lrr" in result.stderr and str(bad) in result.stderr
