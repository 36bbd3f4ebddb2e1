"""Extra missing modalities: deterministic per key, never empty, the asked-for
rate, and imposed on training streams only (evaluation sees every entry)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.contract import DataConfig
from data_pipeline.missing import impose_missing, keep_mask
from data_pipeline.reader import BatchLoader, iterate_split
from pretrain.config import ConfigError, load_config

KEYS = [f"sample{i:05d}" for i in range(4000)]
FULL = torch.ones(len(KEYS), 3, dtype=torch.bool)


def test_same_key_and_seed_same_fate_other_seed_differs():
    a = impose_missing(KEYS, FULL, 0.5, seed=1)
    assert torch.equal(a, impose_missing(KEYS, FULL, 0.5, seed=1))
    assert torch.equal(a[100:200], impose_missing(KEYS[100:200], FULL[100:200], 0.5, seed=1))  # order-free
    assert not torch.equal(a, impose_missing(KEYS, FULL, 0.5, seed=2))


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_instance_mode_hides_the_rate_and_keeps_one(rate):
    out = impose_missing(KEYS, FULL, rate, seed=0)
    assert out.any(1).all()
    incomplete = (~out.all(1)).float().mean().item()
    assert abs(incomplete - rate) < 0.03
    # every non-empty proper subset is drawn about equally (6 patterns)
    patterns = torch.unique(out[~out.all(1)], dim=0, return_counts=True)[1]
    assert len(patterns) == 6 and patterns.min() > 0.7 * patterns.max()


def test_entry_mode_hides_each_modality_independently():
    out = impose_missing(KEYS, FULL, 0.4, seed=0, mode="entry")
    assert out.any(1).all()
    hidden = (~out).float().mean(0)
    assert ((hidden - 0.4).abs() < 0.04).all(), hidden  # all-hidden draws (6.4%) keep one back


@pytest.mark.parametrize("rate", [0.5, 0.7])
def test_keep_text_mode_never_hides_text(rate):
    """The paper's data: text always there; image, audio or both missing."""
    out = impose_missing(KEYS, FULL, rate, seed=0, mode="keep_text")
    assert out[:, 1].all()  # text, in every sample
    incomplete = ~out.all(1)
    assert abs(incomplete.float().mean().item() - rate) < 0.03
    patterns = torch.unique(out[incomplete], dim=0, return_counts=True)
    assert {tuple(p.tolist()) for p in patterns[0]} == {(False, True, True), (True, True, False), (False, True, False)}
    assert patterns[1].min() > 0.7 * patterns[1].max()  # image, audio or both, about equally
    # A sample without text (or with text alone) keeps what it has.
    present = torch.tensor([[True, False, True], [False, True, False]] * 20)
    assert torch.equal(impose_missing(KEYS[:40], present, 1.0, seed=0, mode="keep_text"), present)


def test_never_adds_a_modality_and_leaves_single_modality_samples_alone():
    present = torch.tensor([[True, False, False], [False, True, True], [True, True, True]] * 50)
    keys = KEYS[: present.shape[0]]
    for mode in ("instance", "entry", "keep_text"):
        out = impose_missing(keys, present, 1.0, seed=3, mode=mode)
        assert not (out & ~present).any()
        assert torch.equal(out[0::3], present[0::3])
        assert (out.sum(1) >= 1).all() and (out[2::3].sum(1) < 3).all()
    assert torch.equal(impose_missing(keys, present, 0.0, seed=3), present)


def test_bad_rate_or_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rate"):
        keep_mask("k", [True, True], 1.5, 0)
    with pytest.raises(ValueError, match="mode"):
        keep_mask("k", [True, True], 0.5, 0, mode="rows")
    path = tmp_path / "c.yaml"
    path.write_text("data: {extra_missing: 0.5, extra_missing_mode: rows}\n")
    with pytest.raises(ConfigError, match="extra_missing_mode"):
        load_config(str(path), [])


def test_training_stream_hides_entries_and_evaluation_does_not(synthetic_dir):
    cfg = DataConfig(
        shards=str(synthetic_dir / "train"),
        batch_size=50,
        num_workers=0,
        shuffle_buffer=1,
        extra_missing=0.7,
        extra_missing_seed=5,
    )
    natural = {}
    for batch in iterate_split(cfg, synthetic_dir / "train", 100):
        natural.update({k: p for k, p in zip(batch["key"], batch["present"]) if k})
    loader = BatchLoader(cfg, rank=0, world_size=1)
    seen, natural_entries, kept_entries = 0, 0, 0
    for _ in range(8):
        batch = next(loader)
        for i, key in enumerate(batch["key"]):
            expected = torch.tensor(keep_mask(key, natural[key].tolist(), 0.7, 5))
            assert torch.equal(batch["present"][i], expected), key
            for j, m in ((0, "image"), (2, "audio")):
                if not batch["present"][i, j]:
                    assert (batch[m][i] == 0).all()
            natural_entries += int(natural[key].sum())
            kept_entries += int(batch["present"][i].sum())
            seen += 1
    assert seen == 400 and kept_entries < 0.8 * natural_entries
