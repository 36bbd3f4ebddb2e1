"""Anchor shift: definition checks, and on trained synthetic embeddings the
calibrated anchor is closer to the complete-instance anchor than the local one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from pretrain.anchor_shift import anchor_shift, leading_left_singular_vectors
from tests.helpers import run_distributed, tiny_config


def test_leading_vector_matches_svd_and_sign_rule():
    z = torch.randn(5, 6, 3)
    u = leading_left_singular_vectors(z)
    ref = torch.linalg.svd(z).U[:, :, 0]
    assert torch.allclose(u.abs(), ref.abs(), atol=1e-5)
    assert ((u * z.mean(2)).sum(1) >= 0).all()


def test_no_shift_when_modalities_agree():
    v = F.normalize(torch.randn(10, 8), dim=1)
    shift = anchor_shift(dict.fromkeys(MODALITIES, v), None, MODALITIES)
    assert set(shift) == {"image", "text", "audio", "image+text", "image+audio", "text+audio"}
    assert all(row["observed_only"] < 1e-5 for row in shift.values())


def _train_and_measure(rank: int, world: int, shards: str, val: str, out_dir: str):
    from evals.embed import embed_split
    from pretrain.run_dir import RunDir
    from pretrain.trainer import build_trainer

    cfg = tiny_config(
        shards,
        out_dir,
        train={"steps": 40, "lr": 3e-3},
        calibration={"warmup_steps": 10, "latent_dim": 8},
        data={"batch_size": 32},
    )
    build_trainer(cfg).fit()
    cfg, model, _ = RunDir(out_dir).load_model()
    data = embed_split(model, cfg, val)
    complete = data["present"].all(1)
    emb = {m: data["emb"][m][complete] for m in MODALITIES}
    return anchor_shift(emb, RunDir(out_dir).load_completion().calibrator, MODALITIES)


@pytest.mark.timeout(400)
def test_calibration_reduces_anchor_shift_on_synthetic_data(synthetic_dir, tmp_path):
    (shift,) = run_distributed(
        _train_and_measure,
        1,
        tmp_path / "ipc",
        str(synthetic_dir / "train"),
        str(synthetic_dir / "val"),
        str(tmp_path / "run"),
        timeout=360,
    )
    print({k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in shift.items()})
    mean_local = sum(r["observed_only"] for r in shift.values()) / len(shift)
    mean_cal = sum(r["calibrated"] for r in shift.values()) / len(shift)
    assert mean_cal < mean_local
    single = [r for name, r in shift.items() if "+" not in name]
    assert all(r["calibrated"] < r["observed_only"] for r in single)
