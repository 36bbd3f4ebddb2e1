"""Zero-shot accuracy and imputation error on constructed embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from evals.imputation import imputation_error
from evals.zero_shot import zero_shot_accuracy
from pretrain.calibration import Calibrator


def test_zero_shot_counts_only_labelled_rows_holding_the_modality():
    classes = F.normalize(torch.eye(4, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 3, -1, 2])
    image = classes[torch.tensor([0, 1, 3, 3, 0, 2])]  # rows 0, 1, 5 right; row 2 wrong; row 3 absent
    present = torch.tensor([[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    emb = {"image": image, "text": torch.zeros(6, 8), "audio": classes[labels.clamp_min(0)]}
    acc = zero_shot_accuracy(emb, present, labels, classes)
    assert acc["image"] == {"top1": 0.75, "n": 4, "chance": 0.25}
    assert acc["audio"]["top1"] == 1.0 and acc["audio"]["n"] == 1


def test_calibrated_imputation_beats_mean_and_random_fill():
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(600, 4, generator=g)
    emb = {
        m: F.normalize(latent @ torch.randn(4, 16, generator=g) + 0.05 * torch.randn(600, 16, generator=g), dim=1)
        for m in MODALITIES
    }
    calibrator = Calibrator(list(MODALITIES), 16, 4, seed=0)
    calibrator.fit(emb, torch.ones(600, 3, dtype=torch.bool), 30)
    err = imputation_error(emb, calibrator, MODALITIES)
    for m in MODALITIES:
        assert err["calmrl"][m]["cosine"] < 0.5 * err["mean_fill"][m]["cosine"]
        assert err["mean_fill"][m]["cosine"] < err["random_fill"][m]["cosine"]
        assert abs(err["random_fill"][m]["mse"] - 2 * err["random_fill"][m]["cosine"]) < 1e-5  # unit vectors
