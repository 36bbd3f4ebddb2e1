"""Load a trained model from a checkpoint (any ZeRO stage) and embed a split."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from data_pipeline.reader import iterate_split
from pretrain.checkpoint import Checkpointer
from pretrain.completion import Completion
from pretrain.config import MODALITIES, Config, config_from_dict
from pretrain.model import MultiModalModel
from pretrain.trainer import vocab_size_of


def load_run(run_dir: str | Path, tag: str = "latest") -> tuple[Config, MultiModalModel, str]:
    """Rebuild the model of a run and load full fp32 weights from its ZeRO checkpoint."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = Path(run_dir)
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml"))
    ckpt = Checkpointer(run_dir / "checkpoints")
    tag = ckpt.resolve(tag)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.root), tag=tag)
    model = MultiModalModel(cfg.model, cfg.data, vocab_size_of(cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt.root / tag} does not match the model: "
                           f"missing {missing}, unexpected {unexpected}")
    model.eval()
    return cfg, model, tag


def load_completion(run_dir: str | Path, tag: str = "latest") -> Completion:
    """The run's completion state (calibrator or mean filler) at a checkpoint;
    it is the same on every rank, so rank 0's copy is read."""
    run_dir = Path(run_dir)
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml"))
    ckpt = Checkpointer(run_dir / "checkpoints")
    state = torch.load(ckpt.root / ckpt.resolve(tag) / "trainer_state_rank0.pt", map_location="cpu",
                       weights_only=False)
    completion = Completion(cfg.calibration, MODALITIES, cfg.model.embed_dim, seed=cfg.train.seed)
    completion.load_state_dict(state["completion"])
    return completion


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
    return {"emb": {m: torch.cat(v) for m, v in embs.items()}, "present": torch.cat(present),
            "label": torch.cat(labels), "key": keys}
