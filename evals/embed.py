"""Embedding every sample of a split with a model (in one process, in order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.reader import iterate_split
from pretrain.config import Config
from pretrain.model import MultiModalModel


@torch.no_grad()
def embed_split(model: MultiModalModel, cfg: Config, split_dir: str | Path, batch_size: int = 256) -> dict[str, Any]:
    """Embeddings of every sample: {modality: [N, D]}, present [N, M], labels, keys."""
    embs: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    present, labels, keys = [], [], []
    for batch in iterate_split(cfg.data, split_dir, batch_size):
        real = torch.tensor([k != "" for k in batch["key"]])
        out = model(batch)["emb"]
        for m in MODALITIES:
            embs[m].append(out[m][real])
        present.append(batch["present"][real])
        labels.append(batch["label"][real])
        keys += [k for k in batch["key"] if k]
    return {
        "emb": {m: torch.cat(v) for m, v in embs.items()},
        "present": torch.cat(present),
        "label": torch.cat(labels),
        "key": keys,
    }
