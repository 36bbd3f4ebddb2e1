"""model.cache_frozen: frozen towers' outputs computed once, shared by the ranks, cached on
disk; training on them gives the losses of training without the cache."""

from __future__ import annotations

import json
from typing import Any

import torch

from pretrain.feature_cache import build_feature_cache, cached_modalities
from pretrain.model import FEATURES_SUFFIX, build_model
from tests.helpers import run_distributed, tiny_config


def _config(shards, out, cache: bool):
    return tiny_config(
        shards,
        out,
        model={"image": {"name": "cnn", "width": 32, "depth": 2, "freeze": True}, "cache_frozen": cache},
        train={"steps": 3, "zero_stage": 2, "log_every": 1},
        data={"batch_size": 8},
    )


def _train_both(rank: int, world: int, shards: str, root: str) -> dict:
    from data_pipeline.split import vocab_size
    from pretrain.runtime import device_for_rank
    from pretrain.trainer import build_trainer

    out: dict[Any, Any] = {}
    for cache in (False, True):
        cfg = _config(shards, f"{root}/run-{cache}", cache)
        trainer = build_trainer(cfg)
        history = trainer.fit()
        out[cache] = [h.loss for h in history]
        if cache:
            assert trainer.feature_cache is not None
            out["cached_rows"] = len(trainer.feature_cache)
            model = build_model(cfg, vocab_size(cfg.data))
            again = build_feature_cache(model, cfg, device_for_rank(), rank, world)  # from disk now
            assert again is not None
            out["same_after_reload"] = torch.equal(again.features["image"], trainer.feature_cache.features["image"])
    return out


def test_cached_training_equals_uncached(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CALMRL_CACHE", str(tmp_path / "cache"))
    shards = str(synthetic_dir / "train")
    results = run_distributed(_train_both, 2, tmp_path / "dist", shards, str(tmp_path))
    index = json.loads((synthetic_dir / "train" / "index.json").read_text())
    for r in results:
        assert r["cached_rows"] == index["num_samples"]  # every rank holds the whole table
        assert r["same_after_reload"]
        for a, b in zip(r[False], r[True]):
            assert abs(a - b) < 1e-4, (r[False], r[True])
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1


def test_cached_features_are_the_tower_outputs(synthetic_dir, tmp_path):
    from data_pipeline.reader import iterate_split
    from data_pipeline.split import vocab_size

    cfg = _config(synthetic_dir / "train", tmp_path, True)
    assert cached_modalities(cfg) == ["image"]

    model = build_model(cfg, vocab_size(cfg.data)).eval()
    batch = next(iterate_split(cfg.data, synthetic_dir / "train", 16))
    with torch.no_grad():
        plain = model(batch)["emb"]["image"]
        feats = model.towers["image"]({"image": batch["image"]})
        cached = model({**batch, "image" + FEATURES_SUFFIX: feats})["emb"]["image"]
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)
