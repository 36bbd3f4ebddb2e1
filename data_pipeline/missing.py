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
- "keep_text": the pattern of paired video-text and audio-text corpora (the
  paper's training data): text is never hidden; a fraction `rate` of the
  samples that hold text and something else lose a uniformly drawn non-empty
  subset of their other modalities (image, audio or both).
"""

from __future__ import annotations

import random
from itertools import combinations

import torch

from data_pipeline.contract import MODALITIES

MISSING_MODES = ("instance", "entry", "keep_text")
_TEXT = MODALITIES.index("text")


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
    if mode == "keep_text":
        others = [i for i in held if i != _TEXT]
        if _TEXT not in held or not others or rng.random() >= rate:
            return list(present)
        dropped = set(rng.choice([c for size in range(1, len(others) + 1) for c in combinations(others, size)]))
        return [p and i not in dropped for i, p in enumerate(present)]
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
