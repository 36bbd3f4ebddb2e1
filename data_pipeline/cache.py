"""The one rule for where calmrl caches downloads and derived data.

`$CALMRL_CACHE` when it is set and not empty, else `~/.cache/calmrl`. Under
it: the Tux Paint package (`tuxpaint-stamps-*`) and the benchmark's feature
caches (`benchmark/`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a folder below it); not created here."""
    root = os.environ.get("CALMRL_CACHE") or str(Path.home() / ".cache" / "calmrl")
    return Path(root).expanduser().joinpath(*parts)
