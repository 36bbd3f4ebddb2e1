"""Frozen towers' outputs computed once per sample (`model.cache_frozen`).

A frozen pretrained tower (EfficientNet-Lite0, MiniLM) gives the same output
for a sample at every step, and on a CPU it costs far more than everything
else in the step. With `model.cache_frozen` the trainer runs each frozen tower
once over the training split before the first step, each rank over its share
of the shards, and every rank keeps the whole table (all-gathered). The loader
then never decodes those modalities; each batch gets `<modality>_features`
[B, F] looked up by sample key, and the model runs only the head on them
(`MultiModalModel.tower_outputs`): the values the tower would give.

The table is also written under `$CALMRL_CACHE/features/` (atomically), named
by everything that decides its content: the split's index, the data settings,
the towers' names and options and a digest of their weights. A second run on
the same data starts without recomputing it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.cache import cache_dir
from data_pipeline.contract import MODALITIES
from data_pipeline.errors import DataError
from data_pipeline.reader import iterate_split
from data_pipeline.shards import read_index
from data_pipeline.tar_reading import BadInputLog
from pretrain.config import Config
from pretrain.model import FEATURES_SUFFIX, MultiModalModel


def cached_modalities(cfg: Config) -> list[str]:
    """The modalities whose tower outputs come from the cache (frozen towers, cache_frozen on)."""
    if not cfg.model.cache_frozen:
        return []
    return [m for m in MODALITIES if getattr(cfg.model, m).freeze]


@dataclass
class FeatureCache:
    modalities: list[str]
    keys: list[str]  # row i holds sample keys[i]
    features: dict[str, torch.Tensor]  # modality -> [N, F] float32; zeros where the sample lacks it

    def __post_init__(self) -> None:
        self.row_of = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with `<modality>_features` for every cached modality (padding rows, key "",
        and rows lacking the modality get zeros). A present row whose sample the cache does not
        hold is an error naming it: the split changed after the cache was built."""
        keys = batch["key"]
        rows = [self.row_of.get(k, -1) for k in keys]
        index = torch.tensor([max(r, 0) for r in rows], dtype=torch.long)
        known = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        for m in self.modalities:
            present = batch["present"][:, MODALITIES.index(m)]
            unknown = present & ~known
            if bool(unknown.any()):
                key = keys[int(unknown.nonzero()[0, 0])]
                raise DataError(
                    f"sample '{key}' has no cached {m} features: the split changed after the feature cache "
                    f"was built; start the run again (the cache is rebuilt for the new split)"
                )
            feats = self.features[m].index_select(0, index)
            batch[m + FEATURES_SUFFIX] = feats * present.unsqueeze(1).to(feats.dtype)
        return batch


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(cfg: Config, model: MultiModalModel, modalities: list[str]) -> Path:
    split = str(cfg.data.shards)
    index = hashlib.sha256(json.dumps(read_index(split), sort_keys=True).encode()).hexdigest()
    data = {
        k: v
        for k, v in asdict(cfg.data).items()
        if k not in ("shards", "batch_size", "num_workers", "shuffle_buffer", "seed", "resampled", "epoch_samples")
        and not k.startswith("extra_missing")
    }
    what = {
        "index": index,
        "split": split if "://" in split else str(Path(split).resolve()),
        "data": data,
        "towers": {m: [getattr(cfg.model, m).name, getattr(cfg.model, m).options] for m in modalities},
        "weights": {m: _weights_digest(model.towers[m]) for m in modalities},
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir("features") / f"{Path(split.rstrip('/')).name}-{'+'.join(modalities)}-{digest}.pt"


@torch.no_grad()
def _compute_part(
    model: MultiModalModel, cfg: Config, modalities: list[str], device: torch.device, part: int, parts: int
) -> tuple[list[str], dict[str, torch.Tensor], int, str]:
    """This rank's share of the shards: keys, features, bad-sample count and the first bad one."""
    bad = BadInputLog()
    undecoded = frozenset(MODALITIES) - set(modalities)
    keys: list[str] = []
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    towers = {m: model.towers[m].to(device).eval() for m in modalities}
    dims = {m: int(getattr(model.towers[m], "out_dim", 0)) for m in modalities}
    batches = iterate_split(cfg.data, cfg.data.shards, 64, bad, undecoded=undecoded, shard_part=(part, parts))
    for batch in tqdm(batches, desc=f"caching {'+'.join(modalities)} features", unit="batch", disable=part != 0):
        real = [i for i, k in enumerate(batch["key"]) if k]
        keys += [batch["key"][i] for i in real]
        for m in modalities:
            j = MODALITIES.index(m)
            rows = [i for i in real if bool(batch["present"][i, j])]
            inputs = {
                k: v[rows].to(device)
                for k, v in batch.items()
                if isinstance(v, torch.Tensor) and k.startswith(m) and not k.endswith(FEATURES_SUFFIX)
            }
            feats = towers[m](inputs).float().cpu() if rows else None
            block = torch.zeros(len(real), dims[m] if feats is None else feats.shape[1])
            if feats is not None:
                block[[real.index(i) for i in rows]] = feats
            out[m].append(block)
    features = {m: torch.cat(v) if v else torch.zeros(0, dims[m]) for m, v in out.items()}
    return keys, features, bad.count, bad.first


def build_feature_cache(
    model: MultiModalModel, cfg: Config, device: torch.device, rank: int = 0, world: int = 1
) -> FeatureCache | None:
    """Collective when `world` > 1: every rank gets the whole table (None when nothing is cached)."""
    modalities = cached_modalities(cfg)
    if not modalities:
        return None
    path = cache_path(cfg, model, modalities)
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return FeatureCache(modalities, saved["keys"], saved["features"])
    try:
        mine: tuple[Any, ...] = (*_compute_part(model, cfg, modalities, device, rank, world), "")
    except Exception as exc:  # every rank must reach the gather, or the others would wait
        mine = ([], {}, 0, "", f"{type(exc).__name__}: {exc}")
    parts = [mine]
    if world > 1:
        parts = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(parts, mine)
    for r, (_, _, _, _, error) in enumerate(parts):
        if error:
            raise DataError(f"caching the frozen towers' outputs failed on rank {r}: {error}")
    bad = sum(p[2] for p in parts)
    if bad:
        first = next(p[3] for p in parts if p[3])
        raise DataError(
            f"{bad} samples of {cfg.data.shards} did not decode while caching the frozen towers' outputs "
            f"(first: {first}); rebuild the split with `calmrl data build --skip-bad`, or set "
            "model.cache_frozen=false to count and skip them while training"
        )
    keys = [k for p in parts for k in p[0]]
    features = {m: torch.cat([p[1][m] for p in parts]) for m in modalities}
    if len(set(keys)) != len(keys):
        raise DataError(f"{cfg.data.shards} holds a sample key twice; rebuild the split")
    if rank == 0:
        buffer = io.BytesIO()
        torch.save({"keys": keys, "features": features}, buffer)
        atomic_write(path, buffer.getvalue())
    return FeatureCache(modalities, keys, features)
