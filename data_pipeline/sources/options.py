"""What a source builder takes and returns, and its error: `BuildOptions`,
`BuildReport`, `SourceError` (re-exported by `data_pipeline.sources`; a module
of their own so that the staging wrapper can use them without a cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# An oversized picture is downscaled on load to this longest side: a training
# image is a few hundred pixels, and a 4096-pixel side keeps typical photos
# (12 MP phones, 4000 x 3000) byte-identical while a poster-sized scan no longer
# costs gigabytes in every epoch.
MAX_IMAGE_SIDE = 4096
# The most pixels check_image decodes (after a JPEG's draft): 16384 x 16384,
# about 1 GB as RGBA while it is downscaled. Larger pictures are refused with
# the reason `image_too_large`. Pillow's own decompression-bomb check (a warning
# above 89 MP, an error above 179 MP) is replaced by this one (common._pixel_limit).
MAX_DECODE_PIXELS = 16384 * 16384


class SourceError(ValueError):
    """Input data that cannot be turned into shards; the message names the file and the fix."""


@dataclass
class BuildOptions:
    out: Path
    shard_size: int = 250
    input: Path | None = None  # folder or manifest (folder, jsonl)
    cache: Path | None = None  # download cache (tuxpaint)
    seed: int = 0  # synthetic: the generator; real sources: salt of the split hash (0 = no salt)
    split_fractions: tuple[float, float, float] | None = None  # None: the source's default
    skip_bad: bool = False  # count and skip undecodable records instead of failing
    progress: bool = True
    num_samples: int | None = None  # synthetic only
    image_size: int | None = None  # synthetic only
    missing: tuple[float, float, float] | None = None  # synthetic only: image, text, audio missing rates
    vocab_size: int = 2000
    max_image_side: int = MAX_IMAGE_SIDE  # real sources: a longer picture is downscaled to this side
    max_image_pixels: int = MAX_DECODE_PIXELS  # real sources: a picture with more is refused (image_too_large)


@dataclass
class BuildReport:
    indexes: dict[str, dict[str, Any]]  # split -> the index written for it
    summary: str  # one line for the terminal
    details: dict[str, Any] = field(default_factory=dict)
