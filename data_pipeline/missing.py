"""Extra missing modalities imposed on a training split (the benchmark's knob).

A sample's fate depends only on (seed, key), never on the order samples are
read, the rank or the worker: the same seed hides the same entries in every
run, every method and after every resume, so methods are compared on exactly
the same incomplete data.

Modes:
- "instance": a fraction `rate` of the samples that hold two or more
  modalities become incomplete; each loses a uniformly drawn non-empty proper
  subset of what it holds (so at least one modality always stays).
- "entry": every present modality is hidden with probability `rate`
  independently; a sample that would lose everything keeps one of its
  modalities, drawn uniformly.
"""

from __future__ import annotations

import random
from itertools import combinations

import torch

MISSING_MODES = ("instance", "entry")


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(f"extra-missing/{seed}/{key}")


def keep_mask(key: str, present: list[bool], rate: float, seed: int, mode: str = "instance") -> list[bool]:
    """The modalities of sample `key` that stay present (a subset of `present`)."""
    if mode not in MISSING_MODES:
        raise ValueError(f"extra-missing mode '{mode}': must be one of {', '.join(MISSING_MODES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"extra-missing rate {rate}: must lie in [0, 1]")
    held = [i for i, p in enumerate(present) if p]
    if rate == 0.0 or len(held) < 2:
        return list(present)
    rng = _rng(seed, key)
    if mode == "instance":
        if rng.random() >= rate:
            return list(present)
        keeps = [c for size in range(1, len(held)) for c in combinations(held, size)]
        kept = set(rng.choice(keeps))
    else:
        kept = {i for i in held if rng.random() >= rate}
        if not kept:
            kept = {rng.choice(held)}
    return [i in kept for i in range(len(present))]


def impose_missing(
    keys: list[str], present: torch.Tensor, rate: float, seed: int, mode: str = "instance"
) -> torch.Tensor:
    """`present` [N, M] bool with extra entries hidden, sample by sample (see `keep_mask`)."""
    if len(keys) != present.shape[0]:
        raise ValueError(f"{len(keys)} keys for {present.shape[0]} rows")
    rows = [keep_mask(k, p, rate, seed, mode) for k, p in zip(keys, present.tolist())]
    return torch.tensor(rows, dtype=torch.bool).reshape(present.shape)
