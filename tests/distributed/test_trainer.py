"""The DeepSpeed trainer on 2 gloo processes: every ZeRO stage learns, a rank
without a modality does not hang ZeRO-3, and resume is exact. Calibration
(CalMRL, imputing after 3 warm-up steps) is on in all of them (tests.helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run_distributed, tiny_config


def _train(
    rank: int,
    world: int,
    shards: str,
    out_dir: str,
    train: dict,
    drop_audio_on_rank: int = -1,
    sections: dict | None = None,
):
    from data_pipeline.reader import BatchLoader
    from pretrain.trainer import build_trainer

    cfg = tiny_config(shards, out_dir, train=train, **(sections or {}))
    batches = None
    if rank == drop_audio_on_rank:

        def without_audio(loader):
            for batch in loader:
                batch["present"][:, 2] = False
                batch["audio"].zero_()
                yield batch

        batches = without_audio(BatchLoader(cfg.data, rank, world))
    trainer = build_trainer(cfg, batches=batches)
    history = trainer.fit()
    return [h.loss for h in history]


def train_two_ranks(
    synthetic_dir,
    tmp_path,
    train: dict,
    drop_audio_on_rank: int = -1,
    sections: dict | None = None,
    timeout: float = 240,
) -> list[list[float]]:
    """Each rank's loss curve of a 2-rank run on the synthetic train split (into tmp_path/run)."""
    return run_distributed(
        _train,
        2,
        tmp_path / "ipc",
        str(synthetic_dir / "train"),
        str(tmp_path / "run"),
        train,
        drop_audio_on_rank,
        sections,
        timeout=timeout,
    )


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_with_falling_loss(synthetic_dir, tmp_path, stage):
    losses = train_two_ranks(synthetic_dir, tmp_path, {"zero_stage": stage, "steps": 30}, timeout=360)
    assert losses[0] == pytest.approx(losses[1])  # both ranks log the global loss
    curve = losses[0]
    assert len(curve) == 30
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.3, f"ZeRO-{stage}: loss {first:.3f} -> {last:.3f} did not fall"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000030"
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 30


@pytest.mark.timeout(300)
def test_zero3_rank_without_audio_completes(synthetic_dir, tmp_path):
    losses = train_two_ranks(synthetic_dir, tmp_path, {"zero_stage": 3, "steps": 6}, drop_audio_on_rank=1)
    assert len(losses[0]) == len(losses[1]) == 6  # steps 4-6 impute the audio rank 1 lacks
    assert all(torch.isfinite(torch.tensor(losses[0])))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "objective,method",
    [("gram", "calmrl"), ("pmrl", "calmrl"), ("pairwise", "mean_fill"), ("pairwise", "drop_incomplete")],
)
def test_objectives_and_baselines_train(synthetic_dir, tmp_path, objective, method):
    sections = {"loss": {"objective": objective}, "calibration": {"method": method, "warmup_steps": 2}}
    losses = train_two_ranks(synthetic_dir, tmp_path, {"zero_stage": 3, "steps": 6}, sections=sections)
    assert losses[0] == pytest.approx(losses[1]) and len(losses[0]) == 6
    assert all(torch.isfinite(torch.tensor(losses[0])))
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    last = __import__("json").loads(log[-1])
    imputed = sum(last[f"imputed/{m}"] for m in ("image", "text", "audio"))
    assert (imputed > 0) == (method in ("calmrl", "mean_fill"))


def _fp32_weights(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=(ckpt / "latest").read_text())


def _stop_and_resume(rank: int, world: int, shards: str, out_dir: str, train: dict):
    from pretrain.trainer import build_trainer

    cfg = tiny_config(shards, out_dir, train={**train, "stop_at": 10}, data={"num_workers": 2})
    first = build_trainer(cfg).fit()
    cfg = tiny_config(shards, out_dir, train=train, data={"num_workers": 2})
    second = build_trainer(cfg)
    rest = second.fit(resume="latest")
    return [h.step for h in first], [h.step for h in rest]


def _uninterrupted(rank: int, world: int, shards: str, out_dir: str, train: dict):
    from pretrain.trainer import build_trainer

    cfg = tiny_config(shards, out_dir, train=train, data={"num_workers": 2})
    return [h.step for h in build_trainer(cfg).fit()]


@pytest.mark.timeout(500)
def test_stop_resume_equals_uninterrupted(synthetic_dir, tmp_path):
    train = {"zero_stage": 3, "steps": 20, "grad_accum": 2, "ckpt_every": 5}
    shards = str(synthetic_dir / "train")
    run_distributed(_uninterrupted, 2, tmp_path / "ipc", shards, str(tmp_path / "full"), train, timeout=240)
    steps = run_distributed(_stop_and_resume, 2, tmp_path / "ipc", shards, str(tmp_path / "split"), train, timeout=240)
    assert steps[0] == (list(range(1, 11)), list(range(11, 21)))
    full, split = _fp32_weights(tmp_path / "full"), _fp32_weights(tmp_path / "split")
    assert full.keys() == split.keys()
    for name in full:
        assert torch.allclose(full[name], split[name], atol=1e-6, rtol=0), name
    # And the runs did move away from the initial weights (the check can fail).
    log = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert len(log) == 20
