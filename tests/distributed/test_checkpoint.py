"""A crash in the middle of a save never leaves a broken `latest`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_distributed, tiny_config


def _crash_during_second_save(rank: int, world: int, shards: str, out_dir: str):
    from pretrain.trainer import build_trainer

    cfg = tiny_config(shards, out_dir, train={"steps": 4, "stop_at": 2})
    trainer = build_trainer(cfg)
    trainer.fit()  # complete checkpoint at step 2
    real_save = trainer.engine.save_checkpoint

    def save_then_die(save_dir, tag=None, **kw):
        real_save(save_dir, tag=tag, **kw)  # the files are written...
        raise OSError("node lost power")  # ...but the run dies before the save completes

    trainer.engine.save_checkpoint = save_then_die
    trainer.step = 3
    with pytest.raises(OSError):
        trainer.save()
    root = Path(out_dir) / "checkpoints"
    after_crash = {
        "latest": (root / "latest").read_text(),
        "dirs": sorted(p.name for p in root.iterdir() if p.is_dir()),
    }
    # A fresh trainer resumes from the last complete checkpoint and trains on.
    resumed = build_trainer(tiny_config(shards, out_dir, train={"steps": 4}))
    steps = [h.step for h in resumed.fit(resume="latest")]
    after_resume = sorted(p.name for p in root.iterdir() if p.is_dir())
    return after_crash, steps, after_resume


@pytest.mark.timeout(240)
def test_crash_mid_save_keeps_latest_complete(synthetic_dir, tmp_path):
    ((after_crash, steps, after_resume),) = run_distributed(
        _crash_during_second_save, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(tmp_path / "run"), timeout=200
    )
    assert after_crash["latest"] == "step_00000002"
    assert after_crash["dirs"] == [".tmp-step_00000003", "step_00000002"]
    assert steps == [3, 4]
    assert after_resume == ["step_00000002", "step_00000004"]  # the partial save was cleared


def _auto_resume(rank: int, world: int, shards: str, out_dir: str):
    from pretrain.trainer import build_trainer

    fresh = [
        h.step for h in build_trainer(tiny_config(shards, out_dir, train={"steps": 4, "stop_at": 2})).fit(resume="auto")
    ]
    again = [h.step for h in build_trainer(tiny_config(shards, out_dir, train={"steps": 4})).fit(resume="auto")]
    return fresh, again


@pytest.mark.timeout(240)
def test_resume_auto_starts_fresh_then_continues(synthetic_dir, tmp_path):
    (result,) = run_distributed(
        _auto_resume, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(tmp_path / "run"), timeout=200
    )
    assert result == ([1, 2], [3, 4])
