"""Continued training (`train.init_from`): weights from a run of any ZeRO stage,
a fresh optimizer and schedule, and clear errors for weights that do not fit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pretrain.config import ConfigError
from tests.helpers import run_distributed, tiny_config


def _source_then_continue(rank: int, world: int, shards: str, root: str, source_stage: int, target_stage: int):
    from pretrain.run_dir import RunDir
    from pretrain.trainer import build_trainer

    source = tiny_config(shards, f"{root}/source", train={"steps": 3, "warmup_steps": 1, "zero_stage": source_stage})
    build_trainer(source).fit()
    # lr 0 (AdamW's decay scales with it too): the continued run's weights stay the source's.
    target = tiny_config(
        shards,
        f"{root}/target",
        train={
            "steps": 2,
            "warmup_steps": 1,
            "zero_stage": target_stage,
            "lr": 0.0,
            "init_from": f"{root}/source",
            "init_calibrator": True,
        },
    )
    trainer = build_trainer(target)
    steps = [r.step for r in trainer.fit()]
    if rank != 0:
        return None
    _, before = RunDir(f"{root}/source").model_state()
    _, after = RunDir(f"{root}/target").model_state()
    same = all(torch.equal(before[k], after[k]) for k in before)
    source_cal = RunDir(f"{root}/source").load_completion().calibrator
    target_state = RunDir(f"{root}/target").rank_state()
    return steps, same, set(before) == set(after), source_cal is not None, target_state["step"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("source_stage,target_stage", [(1, 3), (3, 2), (2, 0)])
def test_init_from_any_zero_stage(synthetic_dir, tmp_path, source_stage, target_stage):
    results = run_distributed(
        _source_then_continue,
        2,
        tmp_path / "ipc",
        str(synthetic_dir / "train"),
        str(tmp_path),
        source_stage,
        target_stage,
        timeout=360,
    )
    steps, same, same_keys, had_calibrator, saved_step = results[0]
    assert steps == [1, 2] and saved_step == 2  # a fresh schedule: the new run counts from 0
    assert same_keys and same, "the continued run does not hold the source's weights"
    assert had_calibrator


def _init_errors(rank: int, world: int, shards: str, root: str):
    from pretrain.trainer import build_trainer

    build_trainer(tiny_config(shards, f"{root}/source", train={"steps": 1, "warmup_steps": 1})).fit()
    errors = {}
    cases: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "wider": ({"model": {"embed_dim": 48}}, {}),
        "subset_missing": ({}, {"init_keys": ["heads.*", "nothing.*"]}),
        "no_run": ({}, {"init_from": f"{root}/nowhere"}),
    }
    for name, (sections, train) in cases.items():
        cfg = tiny_config(
            shards,
            f"{root}/{name}",
            **sections,
            train={"steps": 1, "warmup_steps": 1, "init_from": f"{root}/source", **train},
        )
        try:
            build_trainer(cfg)
        except ConfigError as exc:
            errors[name] = str(exc)
    # A subset that exists loads: the heads only, towers of another width.
    cfg = tiny_config(
        shards,
        f"{root}/heads",
        model={"image": {"name": "cnn", "width": 16, "depth": 2}},
        train={"steps": 1, "warmup_steps": 1, "init_from": f"{root}/source", "init_keys": ["heads.text.*"]},
    )
    build_trainer(cfg)
    return errors


@pytest.mark.timeout(300)
def test_weights_that_do_not_fit_are_errors_naming_them(synthetic_dir, tmp_path):
    (errors,) = run_distributed(
        _init_errors, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(tmp_path), timeout=240
    )
    assert "shape" in errors["wider"] and "heads." in errors["wider"]
    assert "nothing.* select no weight" in errors["subset_missing"]
    assert "not a calmrl run folder" in errors["no_run"]
