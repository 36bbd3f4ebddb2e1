"""Data sources that `calmrl data build` turns into shard sets.

`SOURCES` maps a source name to a builder: a function taking `BuildOptions`
and returning a `BuildReport` after writing `out/{train,val,test}/` (shards
and `index.json`) and `out/tokenizer.json`. Builders are imported on first
use, so importing this registry (the CLI does, to list the names) stays cheap.
Each runs in a staging folder that is renamed to `out` only when the build is
complete and removed on any failure (`staging.py`): a failed build leaves no
half of a data set.

Every source writes the same sample format (see `common.py`): `KEY.json`
metadata, `KEY.png|jpg|webp`, `KEY.txt` (an English caption) and any number of
audio tracks `KEY.audio{i}.{ogg,flac,wav,mp3}` listed in the metadata's
`audio_tracks`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from data_pipeline.sources.options import (  # noqa: F401  (the package's public names)
    DEFAULT_SPLIT_FRACTIONS,
    MAX_DECODE_PIXELS,
    MAX_IMAGE_SIDE,
    SPLITS,
    BuildOptions,
    BuildReport,
    SourceError,
)

Builder = Callable[[BuildOptions], BuildReport]


def _lazy(module: str, name: str) -> Builder:
    def build(opts: BuildOptions) -> BuildReport:
        from data_pipeline.sources.staging import staged_build

        return staged_build(getattr(importlib.import_module(module), name), opts)

    build.__name__ = name
    build.__qualname__ = name
    build.__doc__ = (
        f"Build shards with {module}.{name} (imported on first use), in a staging folder "
        "renamed into place when complete (sources/staging.py)."
    )
    return build


SOURCES: dict[str, Builder] = {
    "synthetic": _lazy("data_pipeline.sources.common", "build_synthetic_source"),
    "factors": _lazy("data_pipeline.factors", "build_factors_source"),
    "tuxpaint": _lazy("data_pipeline.sources.tuxpaint", "build_tuxpaint"),
    "folder": _lazy("data_pipeline.sources.folder", "build_folder"),
    "jsonl": _lazy("data_pipeline.sources.jsonl", "build_jsonl"),
}


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); three non-negative numbers summing to 1."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SourceError(f"--split-fractions '{text}': expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise SourceError(
            f"--split-fractions '{text}': expected three non-negative fractions "
            "(train,val,test) summing to 1, like 0.8,0.1,0.1"
        )
    return values[0], values[1], values[2]


def parse_missing(text: str) -> tuple[float, float, float]:
    """'0.2,0.1,0.3' -> per-modality missing rates (image, text, audio), each in [0, 1)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SourceError(f"--missing '{text}': expected three numbers like 0.2,0.1,0.3") from None
    if len(values) != 3 or any(not 0.0 <= v < 1.0 for v in values):
        raise SourceError(f"--missing '{text}': expected three rates in [0, 1) for image,text,audio, like 0,0,0")
    return values[0], values[1], values[2]
