"""Writing files so that a reader never sees half of one.

Every file the project writes for others to read (shard indexes, layouts,
checkpoints' trainer state, `latest`, reports, rendered job files) goes
through `atomic_write`: the bytes land in a temporary file in the same
folder, are flushed to disk, and the file is renamed over the target. A crash
leaves either the old file or the new one, and at worst a stray `.tmp` file
that the next write replaces.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write `data` (text is UTF-8 encoded) to `path` atomically; `mode` sets its permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """`obj` as JSON (keys sorted, so equal objects give equal files)."""
    separators = (",", ":") if indent is None else None
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True, separators=separators, default=str))


def atomic_save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """A matplotlib figure written atomically (the format follows the suffix of `path`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
