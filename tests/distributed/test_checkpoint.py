"""A crash in the middle of a save never leaves a broken `latest`; a damaged checkpoint,
a full or read-only disk and a different number of ranks are survived (pretrain/checkpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import mounted_tmpfs, run_distributed, tiny_config


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


# -- damaged checkpoints ---------------------------------------------------------------
def _resume_past_damage(rank: int, world: int, shards: str, out_dir: str):
    import warnings

    from pretrain.checkpoint import CheckpointError, CheckpointWarning
    from pretrain.trainer import build_trainer

    build_trainer(tiny_config(shards, out_dir, train={"steps": 3, "stop_at": 2, "ckpt_every": 1})).fit()
    root = Path(out_dir) / "checkpoints"
    (root / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()  # lost after the save
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [h.step for h in build_trainer(tiny_config(shards, out_dir, train={"steps": 3})).fit(resume="latest")]
    warned = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    try:
        build_trainer(tiny_config(shards, out_dir, train={"steps": 3})).fit(resume="step_00000002")
        error = None
    except CheckpointError as e:
        error = str(e)
    return steps, warned, dirs, error


@pytest.mark.timeout(300)
def test_damaged_latest_falls_back_and_a_damaged_tag_is_named(synthetic_dir, tmp_path):
    ((steps, warned, dirs, error),) = run_distributed(
        _resume_past_damage, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(tmp_path / "run"), timeout=260
    )
    assert steps == [2, 3]  # resumed from step 1, the newest intact checkpoint
    assert len(warned) == 1
    assert "step_00000002" in warned[0] and "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing" in warned[0]
    assert "resuming from step_00000001" in warned[0]
    assert dirs == ["step_00000002", "step_00000003"]
    assert error is not None
    assert "checkpoint step_00000002 is damaged" in error and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in error
    assert "--resume step_00000003" in error


# -- a full or read-only disk during a save ----------------------------------------------
def _save_until_the_disk_fails(rank: int, world: int, shards: str, out_dir: str, read_only_after: int):
    from pretrain.checkpoint import CheckpointError
    from pretrain.trainer import build_trainer
    from tests.helpers import remount

    train = {"steps": 3, "ckpt_every": 1}
    if read_only_after:
        train["stop_at"] = read_only_after
    trainer = build_trainer(tiny_config(shards, out_dir, train=train))
    try:
        trainer.fit()
        if read_only_after:
            remount(Path(out_dir).parent, read_only=True)
            trainer.step += 1
            trainer.save()
        return None, trainer.step
    except CheckpointError as e:
        return str(e), trainer.step
    finally:
        if read_only_after:
            remount(Path(out_dir).parent, read_only=False)


def _assert_previous_checkpoint_intact(root: Path) -> None:
    from pretrain.checkpoint import Checkpointer

    assert (root / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000001"]  # no .tmp-* left
    assert Checkpointer(root).verify("step_00000001").ok


@pytest.mark.timeout(300)
def test_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(synthetic_dir, tmp_path):
    # One checkpoint of the tiny model at 1 rank is ~0.6 MB: the first save fits on 1 MiB, the second does not.
    with mounted_tmpfs(tmp_path / "disk", size="1m") as disk:
        ((error, step),) = run_distributed(
            _save_until_the_disk_fails, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(disk / "run"), 0
        )
        assert step == 2 and error is not None
        assert f"could not save checkpoint step_00000002 in {disk / 'run' / 'checkpoints'}" in error
        assert "Free space there: " in error and "needs about" in error
        needed = int(error.split("needs about ")[1].split("(")[1].split(" bytes")[0])
        assert needed == json.loads((disk / "run/checkpoints/step_00000001/manifest.json").read_text())["total_bytes"]
        _assert_previous_checkpoint_intact(disk / "run" / "checkpoints")


@pytest.mark.timeout(300)
def test_read_only_disk_during_save_is_a_clear_error(synthetic_dir, tmp_path):
    with mounted_tmpfs(tmp_path / "disk", size="8m") as disk:
        ((error, step),) = run_distributed(
            _save_until_the_disk_fails, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(disk / "run"), 1
        )
        assert step == 2 and error is not None
        assert "could not save checkpoint step_00000002" in error and "Read-only file system" in error
        _assert_previous_checkpoint_intact(disk / "run" / "checkpoints")


# -- resuming on a different number of ranks -----------------------------------------------
def _train_and_save(rank: int, world: int, shards: str, out_dir: str, stage: int):
    from pretrain.trainer import build_trainer

    build_trainer(tiny_config(shards, out_dir, train={"steps": 6, "stop_at": 2, "zero_stage": stage})).fit()


def _resume_resharded(rank: int, world: int, shards: str, out_dir: str, stage: int, resave: str):
    import math

    from pretrain.checkpoint import Checkpointer
    from pretrain.trainer import build_trainer

    trainer = build_trainer(tiny_config(shards, out_dir, train={"steps": 6, "stop_at": 3, "zero_stage": stage}))
    state = trainer.checkpointer.load(trainer.engine, "latest")
    # The loaded engine as this world size writes it, to compare with what the old world wrote.
    Checkpointer(resave).save(trainer.engine, int(state["step"]), {"world_size": world})
    trainer.step = int(state["step"])  # the lead's resume does this and re-divides `loaders`
    trainer.completion.load_state_dict(state["completion"])
    history = trainer.fit()
    summary = {k: state[k] for k in ("step", "world_size", "resharded")}
    summary["loaders"] = len(state["loaders"])
    summary["has_loader"] = "loader" in state
    summary["steps"] = [h.step for h in history]
    summary["finite"] = all(h.loss is not None and math.isfinite(h.loss) for h in history)
    return summary


def _consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weight and Adam moments (and step), independent of how many ranks wrote them."""
    from pretrain.checkpoint import convert_to_universal

    out: dict[str, torch.Tensor] = {}
    model_file = folder / "mp_rank_00_model_states.pt"
    if not any(folder.glob("*optim_states.pt")):  # ZeRO 0: module and torch optimizer in one file
        saved = torch.load(model_file, map_location="cpu", weights_only=False)
        names = list(saved["module"])
        for name, value in saved["module"].items():
            out[f"{name}/fp32"] = value.float()
        for index, moments in saved["optimizer"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{index}/{key}"] = torch.as_tensor(moments[key]).float()
        assert len(names) >= len(saved["optimizer"]["state"])
        return out
    universal = folder.parent / f"{folder.parent.name}-{folder.name}-check"
    convert_to_universal(folder, universal / "u")
    for param in sorted((universal / "u" / "zero").iterdir()):
        if not param.is_dir():
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            path = param / f"{key}.pt"
            if path.is_file():
                value = torch.load(path, map_location="cpu", weights_only=False)
                out[f"{param.name}/{key}"] = torch.as_tensor(value["param"] if isinstance(value, dict) else value)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    # ZeRO 1 shares ZeRO 2's optimizer code (stage_1_and_2.py); the fault suite resumes a ZeRO-1
    # run 2 -> 1 -> 2 ranks through the CLI (tests/integration/test_faults.py).
    ("stage", "saved_by", "resumed_by"),
    [(2, 2, 1), (2, 1, 2), (3, 2, 1), (0, 2, 1)],
)
def test_resume_on_a_different_number_of_ranks(synthetic_dir, tmp_path, stage, saved_by, resumed_by):
    shards, run = str(synthetic_dir / "train"), tmp_path / "run"
    run_distributed(_train_and_save, saved_by, tmp_path / "ipc", shards, str(run), stage, timeout=280)
    (result, *_) = run_distributed(
        _resume_resharded, resumed_by, tmp_path / "ipc", shards, str(run), stage, str(tmp_path / "resaved"), timeout=280
    )
    assert result == {
        "step": 2,
        "world_size": saved_by,
        "resharded": True,
        "loaders": saved_by,
        "has_loader": False,
        "steps": [3],
        "finite": True,
    }
    before = _consolidated(run / "checkpoints" / "step_00000002")
    after = _consolidated(tmp_path / "resaved" / "step_00000002")
    assert sorted(before) == sorted(after)
    assert any(k.endswith("exp_avg_sq") for k in before)  # moments are there to compare
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed when resumed by {resumed_by} ranks"
    assert any(bool(v.abs().sum() > 0) for k, v in before.items() if k.endswith("/exp_avg"))
    if stage:
        assert (run / "checkpoints" / "step_00000002.universal" / "manifest.json").is_file()  # converted once
