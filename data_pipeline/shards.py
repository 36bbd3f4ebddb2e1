"""Writing WebDataset shards atomically, with an index of counts per missing pattern.

A shard is written to `NAME.tar.tmp` and renamed to `NAME.tar` only once it is
complete, so a crash never leaves a half-written shard under its final name.
The index (`index.json`) is written last, the same way: a split folder with an
index is a complete split.

Every member gets the same whole-second mtime (`SOURCE_DATE_EPOCH` when set,
else the build's start): a fractional mtime makes tarfile add a PAX header to
each member, which doubles the headers every reader parses, and a fixed one
makes rebuilt shards byte-identical.

Next to each shard, `NAME.layout.json` records where every member of every
sample lies in it (`tar_layout`), found with tarfile once the shard is
complete. Local readers seek with it instead of parsing every tar header
again (data_pipeline/reader.py); a shard without one is read by its headers.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys

from data_pipeline.atomic import atomic_write, atomic_write_json
from data_pipeline.contract import MODALITIES, pattern_name
from data_pipeline.errors import DataError

INDEX_NAME = "index.json"
LAYOUT_FORMAT = "calmrl-tar-layout/1"
TAR_BLOCK = 512  # a ustar header is one block, right before its member's data


def layout_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + ".layout.json"


def tar_layout(path: str | Path) -> dict[str, Any] | None:
    """Where the members of each sample lie in a complete shard:
    `{"format", "bytes", "samples": [[key, [[ext, data_offset, size], ...]], ...]}`.

    Samples are grouped by webdataset's own `group_by_keys`, as the stream
    reader groups them. None when a reader could not check a member by the
    name in the header block right before its data: a member behind a PAX or
    long-name header, a name of 100 bytes or more, or an upper-case extension
    (webdataset lower-cases it), or anything but regular files."""
    entries: list[dict[str, Any]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            _, ext = base_plus_ext(member.name)
            if (
                not member.isreg()
                or member.offset_data != member.offset + TAR_BLOCK
                or len(member.name.encode()) >= 100
                or ext is None
                or ext != ext.lower()
            ):
                return None
            entries.append({"fname": member.name, "data": (member.offset_data, member.size), "__url__": ""})
    samples = [
        [s["__key__"], [[ext, *s[ext]] for ext in s if not ext.startswith("__")]] for s in group_by_keys(iter(entries))
    ]
    return {"format": LAYOUT_FORMAT, "bytes": os.path.getsize(path), "samples": samples}


@dataclass
class ShardSetWriter:
    """Writes samples into `out_dir/shard-NNNNNN.tar`, `shard_size` samples each.

    A sample is a dict with `__key__`, `json` (metadata dict) and any subset of
    the modality entries (`png`, `txt`, `flac`, ...) as bytes.
    """

    out_dir: Path
    shard_size: int = 1000
    extra_index: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = self.out_dir / INDEX_NAME
        if stale.exists():
            stale.unlink()  # the index marks a complete split; this one is being rewritten
        self._shards: list[dict[str, Any]] = []
        self._patterns: Counter[str] = Counter()
        self._writer: wds.TarWriter | None = None
        self._stream: io.BufferedWriter | None = None
        self._count = 0
        self.index: dict[str, Any] | None = None  # set by close()
        self._mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"shard-{index:06d}.tar"

    def _open(self) -> None:
        path = self._shard_path(len(self._shards))
        # Open across many writes; closed by _finish (renamed into place) or _abort (removed).
        self._stream = open(path.with_name(path.name + ".tmp"), "wb")  # noqa: SIM115
        self._writer = wds.TarWriter(self._stream, mtime=self._mtime)
        self._count = 0

    def _finish(self) -> None:
        assert self._writer is not None and self._stream is not None
        self._writer.close()  # ends the tar; a stream it did not open stays open (webdataset)
        self._stream.flush()
        os.fsync(self._stream.fileno())  # on disk before it is renamed into place, as atomic_write does
        self._stream.close()
        path = self._shard_path(len(self._shards))
        tmp = path.with_name(path.name + ".tmp")
        entry: dict[str, Any] = {"name": path.name, "count": self._count}
        layout = tar_layout(tmp)
        if layout is not None:
            entry["layout"] = layout_name(path.name)
            atomic_write(self.out_dir / entry["layout"], json.dumps(layout, separators=(",", ":")))
        else:  # the shard is read by its headers; a layout left by an earlier build must not linger
            (self.out_dir / layout_name(path.name)).unlink(missing_ok=True)
        os.replace(tmp, path)
        self._shards.append(entry)
        self._writer = self._stream = None

    def _abort(self) -> None:
        if self._writer is not None:
            assert self._stream is not None
            try:
                self._writer.close()
            finally:
                self._stream.close()
            tmp = self._shard_path(len(self._shards))
            tmp.with_name(tmp.name + ".tmp").unlink(missing_ok=True)
            self._writer = self._stream = None

    def write(self, sample: dict[str, Any]) -> None:
        meta = sample["json"]
        present = meta["modalities"]
        if not present:
            raise ValueError(f"sample {sample['__key__']} has no modality; it cannot be written")
        if self._writer is None:
            self._open()
        record = dict(sample)
        record["json"] = json.dumps(meta, sort_keys=True).encode()
        assert self._writer is not None  # _open() made it
        self._writer.write(record)
        self._count += 1
        self._patterns[pattern_name(present)] += 1
        if self._count >= self.shard_size:
            self._finish()

    def close(self) -> dict[str, Any]:
        if self.index is not None:
            return self.index
        if self._writer is not None:
            self._finish()
        index = {
            **self.extra_index,
            "modalities": list(MODALITIES),
            "shards": self._shards,
            "num_samples": sum(s["count"] for s in self._shards),
            "pattern_counts": dict(sorted(self._patterns.items())),
        }
        atomic_write_json(self.out_dir / INDEX_NAME, index)
        self.index = index
        return index


def read_index(split_dir: str | Path) -> dict[str, Any]:
    """The index of a complete split, local or on S3.

    An index that is not JSON, or lacks `shards` (entries with `name` and
    `count`) or `num_samples`, is a DataError naming the file, where it breaks
    and the fix: every rank and the launcher's preflight report the same."""
    from data_pipeline.storage import StorageError, join, read_bytes

    url = join(split_dir, INDEX_NAME)
    try:
        raw = read_bytes(url)
    except StorageError as exc:
        if "does not exist" not in str(exc):
            raise
        raise FileNotFoundError(
            f"{url} not found: '{split_dir}' is not a complete shard split. "
            "Build one with `calmrl data build --source synthetic --out DIR`."
        ) from exc
    rebuild = "rebuild the split with `calmrl data build` (or restore the file)"
    try:
        index = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else exc
        raise DataError(f"{url} is not valid JSON ({where}); {rebuild}") from exc
    problem = _index_problem(index)
    if problem:
        raise DataError(f"{url} is not a shard index: {problem}; {rebuild}")
    return index


def _index_problem(index: Any) -> str:
    """What is wrong with a parsed index's shape ('' when nothing)."""
    if not isinstance(index, dict):
        return f"the top level is a {type(index).__name__}, not an object"
    missing = [key for key in ("shards", "num_samples") if key not in index]
    if missing:
        return f"it has no {' or '.join(repr(k) for k in missing)} field"
    if not isinstance(index["num_samples"], int):
        return f"'num_samples' is {repr(index['num_samples'])[:80]}, not a number of samples"
    if not isinstance(index["shards"], list):
        return f"'shards' is a {type(index['shards']).__name__}, not a list"
    for i, entry in enumerate(index["shards"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("count"), int)):
            return f"shards[{i}] is {repr(entry)[:80]}, not {{'name': str, 'count': int}}"
    return ""
