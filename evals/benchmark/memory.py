"""A split in memory: every sample read once through the real reader, frozen towers' outputs cached.

Towers marked `freeze: true` in a data set's config (the pretrained image and
text towers of the Tux Paint preset) are run once over a split and their
outputs cached on disk (the cache folder's `benchmark/`, named by content);
runs then train `features` towers over the cached outputs: what training beside
a frozen tower computes, at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.cache import cache_dir
from data_pipeline.contract import MODALITIES
from data_pipeline.reader import iterate_split
from data_pipeline.split import vocab_size
from data_pipeline.tar_reading import BadInputLog
from pretrain.config import Config
from pretrain.model import MultiModalModel


@dataclass
class MemorySplit:
    """Every sample of a split as tensors of the batch contract (or cached features)."""

    inputs: dict[str, torch.Tensor]  # "image", "text", "text_mask", "audio" -> [N, ...]
    present: torch.Tensor  # [N, M] bool
    keys: list[str]
    label: torch.Tensor  # [N]

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows: torch.Tensor) -> MemorySplit:
        return MemorySplit(
            {k: v[rows] for k, v in self.inputs.items()},
            self.present[rows],
            [self.keys[i] for i in rows.tolist()],
            self.label[rows],
        )

    def batch(self, rows: torch.Tensor, present: torch.Tensor | None = None) -> dict[str, Any]:
        """Rows as a batch; inputs of absent modalities are zeroed, so nothing hidden leaks."""
        present = (self.present if present is None else present)[rows]
        out: dict[str, Any] = {
            "present": present,
            "label": self.label[rows],
            "key": [self.keys[i] for i in rows.tolist()],
        }
        for name, value in self.inputs.items():
            j = MODALITIES.index(name.split("_")[0])
            v = value[rows]
            mask = present[:, j].reshape(-1, *([1] * (v.ndim - 1)))
            out[name] = v * mask.to(v.dtype) if v.dtype != torch.bool else v & mask
        return out


def frozen_modalities(cfg: Config) -> list[str]:
    return [m for m in MODALITIES if getattr(cfg.model, m).freeze]


def _cache_name(cfg: Config, split_dir: Path, frozen: list[str]) -> str:
    """A cache file named by everything that decides its content: the split's
    index (its shards and counts), the data settings and the frozen towers."""
    index = hashlib.sha256((split_dir / "index.json").read_bytes()).hexdigest()
    what = {
        "index": index,
        "split": str(split_dir.resolve()),
        "data": {
            k: v
            for k, v in asdict(cfg.data).items()
            if k not in ("shards", "batch_size", "num_workers") and not k.startswith("extra_missing")
        },
        "towers": {m: [getattr(cfg.model, m).name, getattr(cfg.model, m).options] for m in frozen},
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{split_dir.parent.name}-{split_dir.name}-{digest}.pt"


def default_cache_dir() -> Path:
    return cache_dir("benchmark")


@torch.no_grad()
def load_memory_split(cfg: Config, split_dir: str | Path, cache: Path, frozen: list[str]) -> MemorySplit:
    """Read a split through the real reader; replace frozen modalities by their tower's outputs.

    Cached in `cache` (written atomically)."""
    path = cache / _cache_name(cfg, Path(split_dir), frozen)
    if path.is_file():
        return MemorySplit(**torch.load(path, weights_only=False))
    towers = {}
    if frozen:
        model = MultiModalModel(cfg.model, cfg.data, vocab_size(cfg.data)).eval()
        towers = {m: model.towers[m] for m in frozen}
    parts: dict[str, list[torch.Tensor]] = {}
    present, labels, keys = [], [], []
    bad = BadInputLog()
    batches = iterate_split(cfg.data, split_dir, 64, bad)
    for batch in tqdm(
        batches,
        desc=f"read {split_dir}" + (f" ({', '.join(frozen)} features)" if frozen else ""),
        unit="batch",
        leave=False,
    ):
        real = torch.tensor([k != "" for k in batch["key"]])
        inputs = {k: v[real] for k, v in batch.items() if isinstance(v, torch.Tensor) and k.split("_")[0] in MODALITIES}
        for m, tower in towers.items():
            feats = tower({k: v for k, v in inputs.items() if k.startswith(m)})
            for k in [k for k in inputs if k.startswith(m)]:
                del inputs[k]
            inputs[m] = feats.float()
        for k, v in inputs.items():
            parts.setdefault(k, []).append(v)
        present.append(batch["present"][real])
        labels.append(batch["label"][real])
        keys += [k for k in batch["key"] if k]
    if not keys:
        raise RuntimeError(f"split {split_dir} holds no readable sample ({bad.count} bad)")
    split = MemorySplit({k: torch.cat(v) for k, v in parts.items()}, torch.cat(present), keys, torch.cat(labels))
    buffer = io.BytesIO()
    torch.save(asdict(split), buffer)
    atomic_write(path, buffer.getvalue())
    return split


def memory_batches(split: MemorySplit, present: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Endless epochs of shuffled full batches (the last partial batch of an epoch is dropped)."""
    n = len(split)
    if n < batch_size:
        raise ValueError(f"{n} training samples cannot fill a batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield split.batch(order[start : start + batch_size], present)


@torch.no_grad()
def embed_memory(
    model: torch.nn.Module, split: MemorySplit, device: torch.device, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in split.batch(rows).items()}
        emb = model(batch)["emb"]
        for m in MODALITIES:
            out[m].append(emb[m].float().cpu())
    return {m: torch.cat(v) for m, v in out.items()}


@torch.no_grad()
def tower_outputs(
    model: MultiModalModel, split: MemorySplit, device: torch.device, batch_size: int = 256
) -> MemorySplit:
    """The split as its towers' outputs (what the heads read): the inputs of continued
    training over frozen towers. A modality a sample lacks gets zeros."""
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in split.batch(rows).items()}
        for j, m in enumerate(MODALITIES):
            inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k.split("_")[0] == m}
            out = model.towers[m](inputs).float()
            parts[m].append((out * batch["present"][:, j : j + 1].to(out.dtype)).cpu())
    return MemorySplit({m: torch.cat(v) for m, v in parts.items()}, split.present, split.keys, split.label)
