"""Writing files so that a reader never sees half of one.

Every file the project writes for others to read (shard indexes, layouts,
checkpoints' trainer state, `latest`, reports, rendered job files, figures)
goes through this module: the bytes land in a temporary file in the same
folder, are flushed to disk, and the file is renamed over the target. A crash
leaves either the old file or the new one, and at worst a stray temporary
file beside it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside `path` to fill; renamed over `path` on success, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside `path`, for writers that want a name (faiss.write_index):
    when the block ends the file is flushed to disk and renamed over `path`; on failure removed."""
    path = Path(path)
    with _replacing(path) as tmp:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def atomic_write(path: str | Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write `data` (text is UTF-8 encoded) to `path` atomically; `mode` sets its permissions."""
    path = Path(path)
    with _replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """`obj` as JSON (keys sorted, so equal objects give equal files)."""
    separators = (",", ":") if indent is None else None
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True, separators=separators, default=str))


def atomic_save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """A matplotlib figure written atomically, in the format of `path`'s suffix."""
    path = Path(path)
    with _replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **savefig)
    return path
