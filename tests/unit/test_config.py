"""Typed config: presets load, overrides apply, mistakes name the key and file."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config, parse_overrides
from tests.helpers import REPO


@pytest.mark.parametrize(
    "preset",
    sorted({*(REPO / "configs").glob("*.yaml"), *(REPO / "configs/benchmark").glob("*_stage*.yaml")}),
    ids=lambda p: p.name,
)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.train.steps > 0 and cfg.data.batch_size > 0


def test_overrides_apply_with_types():
    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        ["--train.lr=3e-4", "--train.zero_stage=3", "--model.text.depth=1", "--train.betas=[0.8, 0.9]"],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.zero_stage == 3 and cfg.model.text.depth == 1 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.text.name == "transformer"  # a nested override keeps the block's other fields


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_config(path).train.lr == pytest.approx(3e-4)


def test_typo_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lrr" in str(err.value) and str(path) in str(err.value)


def test_typo_key_in_override_is_named():
    with pytest.raises(ConfigError, match="train.setps"):
        load_config(REPO / "configs/tiny_cpu.yaml", ["--train.setps=3"])


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match="'data.batch_size' must be int"):
        load_config(path)


def test_bad_choice_is_rejected():
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(REPO / "configs/tiny_cpu.yaml", ["--train.zero_stage=5"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["--train.lr"])
