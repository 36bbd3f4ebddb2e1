"""The embeddings file `calmrl embed` writes and `calmrl search` reads: Parquet (pyarrow).

One row per (record, modality) that has a vector:

    key        string   the record's key
    modality   string   image | text | audio
    observed   bool     true: encoded from the record's own input; false: imputed by the calibrator
    vector     fixed_size_list<float32>[D]   unit vector in the shared space
    variance   float32  imputed rows: the predictive variance per dimension (mean of the
                        diagonal); null on observed rows
    source     string   where the record came from (a file path, a manifest line, a shard
                        URL#key); null when unknown
    caption    string   the record's text, when it has one (for display); else null
    thumbnail  binary   a PNG of at most 128 px of the record's picture, when it has one; else null

The file's key-value metadata `calmrl` holds JSON: {"format": 1, "dim": D, "model": ...,
"complete": bool, "counts": {...}}. Files are written whole (a temporary name renamed
into place), in row groups, so a reader can stream them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.contract import MODALITIES

FORMAT = 1
META_KEY = b"calmrl"
THUMBNAIL_SIDE = 128


class VectorFileError(ValueError):
    """An embeddings file that is missing, not Parquet, or not of this format."""


def schema(dim: int, meta: dict[str, Any] | None = None) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("observed", pa.bool_(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("variance", pa.float32()),
        pa.field("source", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("thumbnail", pa.binary()),
    ]
    metadata = {META_KEY: json.dumps({"format": FORMAT, "dim": dim, **(meta or {})}).encode()}
    return pa.schema(fields, metadata=metadata)


@dataclass
class VectorRows:
    """Rows to append (column lists of equal length; `vectors` is [N, D] float32)."""

    key: list[str] = field(default_factory=list)
    modality: list[str] = field(default_factory=list)
    observed: list[bool] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    variance: list[float | None] = field(default_factory=list)
    source: list[str | None] = field(default_factory=list)
    caption: list[str | None] = field(default_factory=list)
    thumbnail: list[bytes | None] = field(default_factory=list)

    def add(
        self,
        key: str,
        modality: str,
        observed: bool,
        vector: np.ndarray,
        variance: float | None = None,
        source: str | None = None,
        caption: str | None = None,
        thumbnail: bytes | None = None,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of {MODALITIES}")
        self.key.append(key)
        self.modality.append(modality)
        self.observed.append(bool(observed))
        self.vectors.append(np.asarray(vector, dtype=np.float32))
        self.variance.append(None if variance is None else float(variance))
        self.source.append(source)
        self.caption.append(caption)
        self.thumbnail.append(thumbnail)

    def __len__(self) -> int:
        return len(self.key)

    def table(self, sch: pa.Schema) -> pa.Table:
        dim = sch.field("vector").type.list_size
        flat = np.stack(self.vectors).astype(np.float32).reshape(-1) if self.vectors else np.zeros(0, np.float32)
        vector = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
        columns = [
            pa.array(self.key, pa.string()),
            pa.array(self.modality, pa.string()),
            pa.array(self.observed, pa.bool_()),
            vector,
            pa.array(self.variance, pa.float32()),
            pa.array(self.source, pa.string()),
            pa.array(self.caption, pa.string()),
            pa.array(self.thumbnail, pa.binary()),
        ]
        return pa.Table.from_arrays(columns, schema=sch)


class VectorFileWriter:
    """Streams row groups into `path` + '.tmp'; `close()` adds the final metadata and renames
    it into place; `abort()` (or an exception inside `with`) removes it. Never half a file."""

    def __init__(self, path: str | Path, dim: int, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.dim = dim
        self.meta = dict(meta or {})
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, schema(dim, self.meta), compression="zstd")
        self.rows = 0

    def write(self, rows: VectorRows) -> None:
        if len(rows):
            dims = {v.shape for v in rows.vectors}
            if dims != {(self.dim,)}:
                raise ValueError(f"vectors of shape {sorted(dims)} in a file of dimension {self.dim}")
            self._writer.write_table(rows.table(self._writer.schema))
            self.rows += len(rows)

    def close(self, extra_meta: dict[str, Any] | None = None) -> Path:
        if extra_meta:  # counts known only at the end go into the footer's metadata
            self._writer.add_key_value_metadata(
                {META_KEY: json.dumps({"format": FORMAT, "dim": self.dim, **self.meta, **extra_meta})}
            )
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VectorFileWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def file_meta(path: str | Path) -> dict[str, Any]:
    """The `calmrl` metadata of an embeddings file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"{path}: no such embeddings file; write one with `calmrl embed MODEL --out {path}`")
    try:
        pq_meta = pq.read_metadata(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid & co for a non-Parquet file
        raise VectorFileError(f"{path} is not a Parquet file ({exc}); write one with `calmrl embed`") from exc
    raw = (pq_meta.metadata or {}).get(META_KEY)
    if raw is None:
        raise VectorFileError(f"{path} is Parquet but not a calmrl embeddings file (no '{META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise VectorFileError(f"{path}: embeddings format {meta.get('format')}, this calmrl reads format {FORMAT}")
    return meta


@dataclass
class Vectors:
    """An embeddings file in memory: the columns as arrays (vectors [N, D] float32)."""

    key: np.ndarray
    modality: np.ndarray
    observed: np.ndarray
    vectors: np.ndarray
    variance: np.ndarray
    source: list[str | None]
    caption: list[str | None]
    thumbnail: list[bytes | None]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def select(self, rows: np.ndarray) -> Vectors:
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows
        return Vectors(
            self.key[idx],
            self.modality[idx],
            self.observed[idx],
            self.vectors[idx],
            self.variance[idx],
            [self.source[i] for i in idx],
            [self.caption[i] for i in idx],
            [self.thumbnail[i] for i in idx],
            self.meta,
        )


def read_vectors(path: str | Path, columns_for_display: bool = True) -> Vectors:
    """Read a whole embeddings file (`columns_for_display=False` skips thumbnails and captions)."""
    meta = file_meta(path)
    wanted = ["key", "modality", "observed", "vector", "variance", "source"]
    if columns_for_display:
        wanted += ["caption", "thumbnail"]
    table = pq.read_table(path, columns=wanted)
    n = table.num_rows
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat, dtype=np.float32).reshape(n, int(meta["dim"]))
    variance = table.column("variance").to_numpy(zero_copy_only=False)
    return Vectors(
        key=np.asarray(table.column("key").to_pylist(), dtype=object),
        modality=np.asarray(table.column("modality").to_pylist(), dtype=object),
        observed=np.asarray(table.column("observed").to_pylist(), dtype=bool),
        vectors=vectors,
        variance=np.asarray([np.nan if v is None else v for v in variance], dtype=np.float32),
        source=table.column("source").to_pylist(),
        caption=table.column("caption").to_pylist() if columns_for_display else [None] * n,
        thumbnail=table.column("thumbnail").to_pylist() if columns_for_display else [None] * n,
        meta=meta,
    )


def iter_row_groups(path: str | Path) -> Iterator[pa.Table]:
    """The file's row groups, one table each (for files larger than memory)."""
    file_meta(path)
    reader = pq.ParquetFile(path)
    for i in range(reader.num_row_groups):
        yield reader.read_row_group(i)
