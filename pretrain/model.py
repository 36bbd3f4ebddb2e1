"""The multimodal model: one tower + projection head per modality, a learnable
logit scale, and L2-normalised embeddings in a shared space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.contract import MODALITIES, DataConfig
from pretrain.config import Config, ModelConfig
from pretrain.rng import seed_everything
from pretrain.towers import build_tower

# A batch entry `<modality>_features` [B, F] holds that modality's tower outputs computed
# beforehand (a frozen tower's feature cache, pretrain/feature_cache.py): `encode` then
# runs only the head on it. Same values as running the tower; no tower time.
FEATURES_SUFFIX = "_features"


class MultiModalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, data: DataConfig, vocab_size: int):
        super().__init__()
        self.modalities = MODALITIES
        towers = {m: build_tower(m, getattr(cfg, m), data, vocab_size) for m in self.modalities}
        self.towers = nn.ModuleDict(towers)
        self.heads = nn.ModuleDict({m: nn.Linear(towers[m].out_dim, cfg.embed_dim) for m in self.modalities})
        # Shape (1,), not a 0-dim scalar: deepspeed 0.19.8 cannot flatten 0-dim parameters.
        self.log_logit_scale = nn.Parameter(
            torch.tensor([math.log(cfg.logit_scale_init)]), requires_grad=cfg.logit_scale_learnable
        )
        self.max_log_logit_scale = math.log(cfg.logit_scale_max)
        self.dense_encode = cfg.dense_encode

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def encode(self, modality: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings [B, D] of `modality`; rows where it is absent are zeros.

        Only present rows go through the tower. A batch with none of this
        modality still runs the tower on one (zero) row and keeps its output in
        the graph with weight zero: under ZeRO-3 every rank must enter every
        module's forward and backward, or the parameter gathers hang.
        """
        present = batch["present"][:, self.modalities.index(modality)]
        if self.dense_encode:
            return self._encode_dense(modality, batch, present)
        rows = present.nonzero(as_tuple=True)[0]
        empty = rows.numel() == 0
        if empty:
            rows = torch.zeros(1, dtype=torch.long, device=present.device)
        inputs = {
            k: v.index_select(0, rows)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k.startswith(modality)
        }
        feats = self.heads[modality](self.tower_outputs(modality, inputs))
        emb = F.normalize(feats.float(), dim=-1)
        if empty:
            emb = emb * 0.0
        out = emb.new_zeros(present.shape[0], emb.shape[1])
        return out.index_copy(0, rows, emb)

    def tower_outputs(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the head reads: the tower's outputs, or the cached ones when the batch has them."""
        cached = inputs.get(modality + FEATURES_SUFFIX)
        if cached is not None:
            head = self.heads[modality]
            assert isinstance(head, nn.Linear)
            return cached.to(head.weight.dtype)
        return self.towers[modality](inputs)

    def _encode_dense(self, modality: str, batch: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """`encode` with the tower run on every row (`model.dense_encode`): same values on
        the present rows, zeros elsewhere, and shapes that never depend on the data.

        Absent rows' boolean masks (e.g. `text_mask`) are set all-true first: in attention
        implementations where a fully masked row gives NaN (torch 2.13's own gives zeros,
        other towers' may not), `where` would drop that output but NaN would still flow
        back into the weights through the dropped branch."""
        inputs = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and key.startswith(modality):
                if value.dtype == torch.bool:
                    value = value | ~present.view(-1, *([1] * (value.dim() - 1)))
                inputs[key] = value
        emb = F.normalize(self.heads[modality](self.tower_outputs(modality, inputs)).float(), dim=-1)
        return torch.where(present.unsqueeze(1), emb, torch.zeros((), dtype=emb.dtype, device=emb.device))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, object]:
        # The logit scale is read inside forward: under ZeRO-3 a parameter is
        # only materialised while its module's forward runs.
        return {"emb": {m: self.encode(m, batch) for m in self.modalities}, "logit_scale": self.logit_scale()}


def build_model(cfg: Config, vocab_size: int) -> MultiModalModel:
    """The run's model; `train.seed` makes the initial weights identical on every rank."""
    seed_everything(cfg.train.seed)
    return MultiModalModel(cfg.model, cfg.data, vocab_size)
