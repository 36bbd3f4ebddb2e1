"""Towers and the model: normalised embeddings, absent rows, the plug-in registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data_pipeline.contract import DataConfig
from pretrain.config import ModelConfig, TowerConfig
from pretrain.model import MultiModalModel
from pretrain.registry import TOWERS, Tower, register_tower
from pretrain.towers import build_tower


def batch(b: int = 5, data: DataConfig | None = None) -> dict[str, torch.Tensor]:
    data = data or DataConfig()
    frames = 1 + int(data.sample_rate * data.audio_seconds) // data.hop_length
    present = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)[:b]
    return {
        "image": torch.randn(b, 3, data.image_size, data.image_size),
        "text": torch.randint(1, 50, (b, data.max_text_len)),
        "text_mask": torch.ones(b, data.max_text_len, dtype=torch.bool),
        "audio": torch.randn(b, data.n_mels, frames),
        "present": present,
    }


def test_embeddings_are_unit_norm_where_present_and_zero_where_absent():
    model = MultiModalModel(ModelConfig(), DataConfig(), vocab_size=50)
    b = batch()
    out = model(b)
    for i, m in enumerate(model.modalities):
        norms = out["emb"][m].norm(dim=1)
        assert torch.allclose(norms[b["present"][:, i]], torch.ones(int(b["present"][:, i].sum())), atol=1e-5)
        assert (norms[~b["present"][:, i]] == 0).all()
    assert out["logit_scale"].shape == (1,)


def test_a_sample_encodes_the_same_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    model = MultiModalModel(ModelConfig(), DataConfig(), vocab_size=50).eval()
    b = batch()
    full = model(b)["emb"]["image"][0]
    alone = model({k: v[:1] for k, v in b.items()})["emb"]["image"][0]
    assert torch.allclose(full, alone, atol=1e-5)


def test_modality_absent_from_whole_batch_still_runs_its_tower():
    model = MultiModalModel(ModelConfig(), DataConfig(), vocab_size=50)
    b = batch()
    b["present"][:, 2] = False
    out = model(b)
    assert (out["emb"]["audio"] == 0).all()
    loss = sum(e.sum() for e in out["emb"].values())
    loss.backward()
    # Every audio parameter is in the graph (gradient zero, not None): ZeRO needs that.
    for name, p in model.towers["audio"].named_parameters():
        assert p.grad is not None, name


def test_registry_plugs_in_a_tower_by_name():
    @register_tower("image", "test_linear")
    def _build(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
        class Linear(Tower):
            modality = "image"

            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(3 * data.image_size**2, cfg.width)
                self.out_dim = cfg.width

            def forward(self, inputs):
                return self.proj(inputs["image"].flatten(1))

        return Linear()

    try:
        cfg = ModelConfig(image=TowerConfig(name="test_linear", width=16))
        model = MultiModalModel(cfg, DataConfig(), vocab_size=50)
        assert model(batch())["emb"]["image"].shape == (5, cfg.embed_dim)
    finally:
        TOWERS.pop(("image", "test_linear"))


def test_unknown_tower_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered: cnn"):
        build_tower("image", TowerConfig(name="nope"), DataConfig(), 50)


def test_optimizer_freezes_towers_and_scales_their_learning_rate():
    from pretrain.config import Config
    from pretrain.engine import build_optimizer

    cfg = Config()
    cfg.model.image.freeze = True
    cfg.model.text.lr_mult = 0.1
    model = MultiModalModel(cfg.model, cfg.data, vocab_size=50)
    opt = build_optimizer(model, cfg)
    in_opt = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("towers.image."):
            assert id(p) not in in_opt and not p.requires_grad, name
        elif name.startswith("towers.text."):
            assert in_opt[id(p)] == pytest.approx(0.1 * cfg.train.lr), name
        else:
            assert in_opt[id(p)] == pytest.approx(cfg.train.lr), name  # heads, other towers, logit scale


def test_dense_encode_equals_present_rows_only_and_keeps_gradients_finite():
    """`model.dense_encode` runs every tower on every row: the same embeddings and
    gradients as encoding the present rows only, also when an absent row's text is
    fully masked."""
    b = batch()
    b["text_mask"][1] = False  # row 1 has no text: every token masked
    b["text"][1] = 0
    results = []
    for dense in (False, True):
        torch.manual_seed(0)
        model = MultiModalModel(ModelConfig(dense_encode=dense), DataConfig(), vocab_size=50).eval()
        out = model(b)
        loss = sum((e * torch.linspace(0.1, 1.0, e.shape[1])).sum() for e in out["emb"].values())
        loss.backward()
        results.append(
            ({m: e.detach() for m, e in out["emb"].items()}, {n: p.grad for n, p in model.named_parameters()})
        )
    (sparse_emb, sparse_grads), (dense_emb, dense_grads) = results
    for m in sparse_emb:
        assert torch.allclose(sparse_emb[m], dense_emb[m], atol=1e-5), m
    for name, grad in sparse_grads.items():
        other = dense_grads[name]
        if grad is None:
            assert other is None or torch.count_nonzero(other) == 0, name
            continue
        assert other is not None and torch.isfinite(other).all(), name
        assert torch.allclose(grad, other, atol=1e-5), name
