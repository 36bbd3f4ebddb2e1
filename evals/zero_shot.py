"""Zero-shot classification: embed one caption per class with the text tower
and label each image / audio embedding by its nearest class caption."""

from __future__ import annotations

import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.tokenizer import load_tokenizer
from pretrain.config import Config
from pretrain.model import MultiModalModel


@torch.no_grad()
def class_embeddings(model: MultiModalModel, cfg: Config, tokenizer_json: str, prompts: list[str]) -> torch.Tensor:
    tok = load_tokenizer(tokenizer_json, cfg.data.max_text_len)
    enc = tok.encode_batch(prompts)
    n = len(prompts)
    batch = {
        "text": torch.tensor([e.ids for e in enc], dtype=torch.long),
        "text_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.bool),
        "present": torch.tensor([[False, True, False]] * n),
    }
    return model.encode("text", batch)


def zero_shot_accuracy(
    emb: dict[str, torch.Tensor], present: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Top-1 accuracy per non-text modality over samples holding it and a label."""
    out = {}
    for j, m in enumerate(MODALITIES):
        if m == "text":
            continue
        rows = present[:, j] & (labels >= 0)
        if not bool(rows.any()):
            continue
        predicted = (emb[m][rows] @ classes.T).argmax(1)
        out[m] = {
            "top1": float((predicted == labels[rows]).float().mean()),
            "n": int(rows.sum()),
            "chance": 1.0 / classes.shape[0],
        }
    return out
