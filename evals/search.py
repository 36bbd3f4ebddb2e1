"""Nearest neighbours in an embeddings file (evals/vector_file.py) with faiss-cpu: the core of
`calmrl search`, no model needed.

- The rows of one modality are searched: observed rows only, or with `include_imputed` the
  calibrator's imputed vectors too (each hit says which it is).
- Below `exact_below` rows the index is exact: `IndexFlatIP` (the vectors are unit length, so
  inner product is cosine). From there on it is approximate: `IndexIVFFlat`, a k-means coarse
  quantizer of about sqrt(n) lists (a power of two) over the same flat vectors. IVF was chosen
  over HNSW by measurement on the 2-core machine this was written on (docs/search.md,
  benchmarks/search_index_choice.py): at 1M x 128 IVF built in 11 s (k-means on 40 points per
  list, then one assignment pass), an HNSW graph (M=16, efConstruction=40) in 180 s. HNSW
  answers faster at equal recall, but an index built on first use, and again whenever the file
  changes, cannot take minutes; and IVF's one knob, `nprobe`, can be set after the build by
  measuring recall.
- After an IVF build, `nprobe` is chosen by measurement: the recall@k of the index against the
  exact search on a sample of the data's own rows (each query's own row left out) is measured
  for nprobe = 1, 2, 4, ... up to nlist/4, and the first that reaches `target_recall` is kept. On
  data without cluster structure (uniform random vectors) no nprobe reaches it; the index keeps
  nlist/4 and the recall it has, and a warning names the fix (`--exact-below`).
- The built index is persisted beside the file (FILE.MODALITY[+imputed].faiss and a JSON naming
  the embeddings file's size, mtime and Parquet footer hash, the modality, the kind, nprobe and
  the recall), each written whole (a temporary name renamed into place), and reused while the
  embeddings file is unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.atomic import atomic_path, atomic_save_figure, atomic_write, atomic_write_json
from data_pipeline.contract import MODALITIES
from evals.vector_file import file_meta

EXACT_BELOW = 50_000
TARGET_RECALL = 0.95
RECALL_QUERIES = 256
RECALL_K = 10
INDEX_VERSION = 1
TRAIN_POINTS_PER_LIST = 40  # faiss asks for at least 39 training points per k-means centroid
# faiss 1.15 computes exact inner products with BLAS (one matrix product) when queries x dim
# exceeds distance_compute_blas_threshold, 128000 by default: a batch of 100 queries of D=128
# went one query at a time, 2.0 s over 1M rows against 0.30 s by BLAS (1 thread); one or two
# queries are faster without BLAS (26 against 47 ms). Measured crossover: 4 queries
# (docs/search.md). This also speeds the exact search behind the IVF recall measurement.
BLAS_FROM_QUERIES = 4

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".svg")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")
TEXT_SUFFIXES = (".txt",)


class SearchError(ValueError):
    """A search that cannot run as asked; the message says why and, where there is one, the fix."""


def use_blas_from(dim: int, queries: int = BLAS_FROM_QUERIES) -> None:
    """Exact search by BLAS from `queries` queries of dimension `dim` on (faiss's global knob)."""
    faiss.cvar.distance_compute_blas_threshold = queries * dim - 1


def set_threads(threads: int | None = None) -> int:
    """Let faiss's OpenMP use `threads` (default: every core this process may run on)."""
    n = threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)
    return n


@dataclass
class IndexInfo:
    """How an index was built: what `calmrl search` prints in its header and keeps in the JSON."""

    kind: str  # "flat" (exact) or "ivf" (approximate)
    n: int
    dim: int
    modality: str
    include_imputed: bool
    build_s: float
    nlist: int | None = None
    nprobe: int | None = None
    recall: float | None = None
    recall_k: int | None = None
    recall_queries: int | None = None
    target_recall: float | None = None
    reused: bool = False
    index_path: str | None = None

    def describe(self) -> str:
        rows = "observed and imputed" if self.include_imputed else "observed only"
        if self.kind == "flat":
            how = "exact (faiss IndexFlatIP)"
        else:
            how = f"approximate (faiss IndexIVFFlat, nlist {self.nlist}, nprobe {self.nprobe})"
        when = f"reused from {self.index_path}" if self.reused else f"built in {self.build_s:.2f} s"
        line = f"searched n={self.n:,} {self.modality} rows ({rows}); index {how}, {when}"
        if self.kind == "ivf":
            line += (
                f"; recall@{self.recall_k} {self.recall:.3f} against exact on {self.recall_queries} of its own rows"
                f" (target {self.target_recall})"
            )
        return line

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("reused", "index_path")}


@dataclass
class Hit:
    rank: int
    score: float
    row: int  # the row in the embeddings file
    key: str
    modality: str
    observed: bool
    variance: float | None
    source: str | None
    caption: str | None
    thumbnail: bytes | None

    @property
    def status(self) -> str:
        return "observed" if self.observed else "imputed"


class SearchIndex:
    """A faiss index over the selected rows of an embeddings file, and those rows' columns."""

    def __init__(
        self,
        path: Path,
        index: Any,
        info: IndexInfo,
        file_rows: np.ndarray,
        key: np.ndarray,
        observed: np.ndarray,
        variance: np.ndarray,
    ):
        self.path = path
        self.index = index
        self.info = info
        self.file_rows = file_rows  # faiss id i is the file's row file_rows[i]
        self.key = key
        self.observed = observed
        self.variance = variance

    def __len__(self) -> int:
        return int(self.file_rows.shape[0])

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """The hits of one query (a row of `search`'s result), with their display columns."""
        keep = [(float(s), int(r)) for s, r in zip(scores, rows) if r >= 0]
        shown = read_display_columns(self.path, [r for _, r in keep])
        out = []
        for rank, (score, row) in enumerate(keep, start=1):
            i = int(np.searchsorted(self.file_rows, row))  # file_rows ascend
            var = float(self.variance[i])
            source, caption, thumbnail = shown[row]
            out.append(
                Hit(
                    rank,
                    score,
                    row,
                    str(self.key[i]),
                    self.info.modality,
                    bool(self.observed[i]),
                    None if math.isnan(var) else var,
                    source,
                    caption,
                    thumbnail,
                )
            )
        return out


def search(index: SearchIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest rows of each query: (scores [Q, k] cosine, best first; rows [Q, k], the
    rows of the embeddings file, -1 past the end when the index has fewer than k rows).
    The queries are scaled to unit length (a zero query is an error)."""
    if k < 1:
        raise SearchError(f"--k {k}: ask for at least one neighbour")
    q = np.array(queries, dtype=np.float32, ndmin=2, copy=True)
    if q.ndim != 2 or q.shape[1] != index.info.dim:
        raise SearchError(f"queries of shape {tuple(q.shape)} against an index of dimension {index.info.dim}")
    if not np.isfinite(q).all() or (np.linalg.norm(q, axis=1) == 0).any():
        raise SearchError("a query vector is zero or not finite: nothing to compare by cosine")
    faiss.normalize_L2(q)
    use_blas_from(index.info.dim)
    scores, ids = index.index.search(q, k)
    rows = np.where(ids >= 0, index.file_rows[np.maximum(ids, 0)], -1)
    return scores, rows


# -- reading the file ----------------------------------------------------------------------


def fingerprint(path: Path) -> dict[str, Any]:
    """What says an embeddings file is the one an index was built from: size, mtime and a hash of
    the Parquet footer (row-group offsets, sizes and statistics, the calmrl metadata)."""
    st = path.stat()
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little")
        f.seek(-(8 + footer_len), os.SEEK_END)
        digest = hashlib.sha256(f.read(footer_len + 8)).hexdigest()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "footer_sha256": digest}


def _selection(table: pa.Table, modality: str, include_imputed: bool) -> np.ndarray:
    mask = pc.equal(table.column("modality"), modality)
    if not include_imputed:
        mask = pc.and_(mask, table.column("observed"))
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def read_display_columns(path: Path, rows: Sequence[int]) -> dict[int, tuple[str | None, str | None, bytes | None]]:
    """source, caption and thumbnail of some rows: only the row groups that hold them are read,
    in batches of 1024 rows, up to the last row wanted (a row group of thumbnails can be large)."""
    if not rows:
        return {}
    pf = pq.ParquetFile(path)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    wanted = sorted({int(r) for r in rows})
    groups = np.searchsorted(starts, wanted, side="right") - 1
    out: dict[int, tuple[str | None, str | None, bytes | None]] = {}
    for g in sorted(set(groups.tolist())):
        local = [r - int(starts[g]) for r, gr in zip(wanted, groups) if gr == g]
        offset = 0
        for batch in pf.iter_batches(batch_size=1024, row_groups=[g], columns=["source", "caption", "thumbnail"]):
            for i in (i for i in local if offset <= i < offset + batch.num_rows):
                j = i - offset
                out[int(starts[g]) + i] = (
                    batch.column(0)[j].as_py(),
                    batch.column(1)[j].as_py(),
                    batch.column(2)[j].as_py(),
                )
            offset += batch.num_rows
            if offset > local[-1]:
                break
    return out


# -- building, persisting, reusing ---------------------------------------------------------


def index_paths(path: Path, modality: str, include_imputed: bool) -> tuple[Path, Path]:
    stem = f"{path.name}.{modality}{'+imputed' if include_imputed else ''}"
    return path.with_name(stem + ".faiss"), path.with_name(stem + ".faiss.json")


def nlist_for(n: int) -> int:
    """IVF lists: the power of two nearest sqrt(n), with TRAIN_POINTS_PER_LIST rows for each."""
    nlist = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return max(1, min(nlist, n // TRAIN_POINTS_PER_LIST))


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force inner-product neighbours (faiss.knn: no index, no copy of the base)."""
    _, ids = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(ids)


def recall_at_k(truth: np.ndarray, found: np.ndarray, own: np.ndarray, k: int) -> float:
    """Mean over queries of |found ∩ truth| / k, each query's own row dropped from both lists
    (a row finds itself in any index; counting it would flatter the recall). `truth` and
    `found` hold k+1 ids per query."""
    total = 0.0
    for t, f, o in zip(truth, found, own):
        t_k = [i for i in t if i != o and i >= 0][:k]
        f_k = [i for i in f if i != o and i >= 0][:k]
        total += len(set(f_k).intersection(t_k)) / max(len(t_k), 1)
    return total / len(truth)


def build_ivf(
    vectors: np.ndarray,
    k: int = RECALL_K,
    target_recall: float = TARGET_RECALL,
    recall_queries: int = RECALL_QUERIES,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """An IndexIVFFlat over `vectors` (unit rows) with nprobe chosen by measured recall@k."""
    n, dim = vectors.shape
    use_blas_from(dim)
    rng = np.random.default_rng(seed)
    nlist = nlist_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    train = np.sort(rng.choice(n, min(n, TRAIN_POINTS_PER_LIST * nlist), replace=False))
    index.train(np.ascontiguousarray(vectors[train]))
    index.add(vectors)
    own = np.sort(rng.choice(n, min(n, recall_queries), replace=False))
    queries = np.ascontiguousarray(vectors[own])
    truth = exact_neighbours(vectors, queries, k + 1)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        recall = recall_at_k(truth, found, own, k)
        if recall >= target_recall or nprobe * 2 > max(nlist // 4, 1):
            break
        nprobe *= 2
    return index, {
        "nlist": nlist,
        "nprobe": nprobe,
        "recall": recall,
        "recall_k": k,
        "recall_queries": len(own),
        "target_recall": target_recall,
    }


def _fresh(meta: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(meta.get(key) == value for key, value in want.items())


def open_index(
    path: str | Path,
    modality: str,
    include_imputed: bool = False,
    exact_below: int = EXACT_BELOW,
    target_recall: float = TARGET_RECALL,
    recall_k: int = RECALL_K,
    persist: bool = True,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> SearchIndex:
    """The index over `modality`'s rows of the embeddings file `path`: the persisted one when it
    is fresh, else built (and persisted when `persist`). Errors are SearchError / VectorFileError."""
    path = Path(path)
    meta = file_meta(path)  # VectorFileError for a missing file or one of another kind
    if modality not in MODALITIES:
        raise SearchError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    dim = int(meta["dim"])
    table = pq.read_table(path, columns=["key", "modality", "observed", "variance"])
    mask = _selection(table, modality, include_imputed)
    n = int(mask.sum())
    if n == 0:
        present = sorted(set(table.column("modality").to_pylist()))
        imputed = int(
            pc.sum(pc.and_(pc.equal(table.column("modality"), modality), pc.invert(table["observed"]))).as_py() or 0
        )
        hint = f"; it has {imputed} imputed {modality} rows: add --include-imputed" if imputed else ""
        raise SearchError(
            f"{path} has no {'' if include_imputed else 'observed '}{modality} rows to search"
            f" (it has: {', '.join(present) or 'no rows'}){hint}"
        )
    file_rows = np.flatnonzero(mask).astype(np.int64)
    sel = table.filter(pa.array(mask))
    key = np.asarray(sel.column("key").to_pylist(), dtype=object)
    observed = np.asarray(sel.column("observed").to_numpy(zero_copy_only=False), dtype=bool)
    variance = np.asarray(sel.column("variance").to_numpy(zero_copy_only=False), dtype=np.float32)
    kind = "ivf" if n >= exact_below and nlist_for(n) >= 2 else "flat"  # one list would be a flat index
    index_file, info_file = index_paths(path, modality, include_imputed)
    want = {
        "version": INDEX_VERSION,
        "embeddings": fingerprint(path),
        "kind": kind,
        "n": n,
        "dim": dim,
        "modality": modality,
        "include_imputed": include_imputed,
    }
    if kind == "ivf":  # nprobe was chosen for this recall target at this k
        want.update(target_recall=target_recall, recall_k=recall_k)
    if not rebuild and info_file.is_file() and index_file.is_file():
        try:
            saved = json.loads(info_file.read_text())
            if _fresh(saved, want):
                index = faiss.read_index(str(index_file))
                if index.ntotal == n and index.d == dim:
                    if kind == "ivf":
                        faiss.extract_index_ivf(index).nprobe = int(saved["nprobe"])
                    fields = {f: saved.get(f) for f in IndexInfo.__dataclass_fields__ if f in saved}
                    info = IndexInfo(**{**fields, "reused": True, "index_path": str(index_file)})
                    return SearchIndex(path, index, info, file_rows, key, observed, variance)
        except (OSError, ValueError, RuntimeError) as exc:  # a damaged cache is rebuilt, not fatal
            log(f"calmrl search: rebuilding the index ({index_file} could not be reused: {exc})")
    vectors = _read_vectors(path, mask, dim)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
    else:
        index, extra = build_ivf(vectors, k=recall_k, target_recall=target_recall)
    build_s = time.perf_counter() - t0
    info = IndexInfo(
        kind=kind, n=n, dim=dim, modality=modality, include_imputed=include_imputed, build_s=build_s, **extra
    )
    if kind == "ivf" and info.recall is not None and info.recall < target_recall:
        log(
            f"calmrl search: warning: the approximate index reaches recall@{info.recall_k} {info.recall:.3f} "
            f"(< {target_recall}) at nprobe {info.nprobe} of {info.nlist}: these rows have little cluster "
            f"structure; --exact-below {n + 1} searches them exactly"
        )
    if persist:
        try:
            with atomic_path(index_file) as tmp:
                faiss.write_index(index, str(tmp))
            atomic_write_json(info_file, {**want, **info.to_json()})  # written last: names a complete index
            info.index_path = str(index_file)
        except OSError as exc:
            log(f"calmrl search: note: the index was not saved ({exc}); it is built again next time")
    return SearchIndex(path, index, info, file_rows, key, observed, variance)


def _read_vectors(path: Path, mask: np.ndarray, dim: int) -> np.ndarray:
    table = pq.read_table(path, columns=["vector"]).filter(pa.array(mask))
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(np.asarray(flat, dtype=np.float32).reshape(-1, dim))


# -- the query ------------------------------------------------------------------------------


@dataclass
class Query:
    """What a query holds: text, an image file, an audio file (any of them)."""

    text: str | None = None
    image: Path | None = None
    audio: Path | None = None

    def describe(self) -> str:
        parts = []
        if self.text is not None:
            parts.append(f"text {self.text!r}")
        if self.image is not None:
            parts.append(f"image {self.image}")
        if self.audio is not None:
            parts.append(f"audio {self.audio}")
        return " + ".join(parts)


def _media_file(path: str, flag: str, suffixes: tuple[str, ...], kind: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SearchError(f"{flag} {path}: no such file")
    if p.suffix.lower() not in suffixes:
        raise SearchError(f"{flag} {path}: not an {kind} file (suffixes: {' '.join(suffixes)})")
    return p


def parse_query(query: str | None, query_image: str | None = None, query_audio: str | None = None) -> Query:
    """`--query` is text, unless it names an existing file: then by suffix an image, an audio
    clip or (.txt) text to read; a --query ending in an image or audio suffix that names no file
    is an error (a typo in a path would otherwise be searched as text). --query-image and
    --query-audio name files. They may be combined (an image and its caption)."""
    q = Query()
    if query_image is not None:
        q.image = _media_file(query_image, "--query-image", IMAGE_SUFFIXES, "image")
    if query_audio is not None:
        q.audio = _media_file(query_audio, "--query-audio", AUDIO_SUFFIXES, "audio")
    if query is not None:
        p = Path(query)
        suffix = p.suffix.lower()
        is_file = len(query) < 4096 and p.is_file()
        if is_file and suffix in IMAGE_SUFFIXES + AUDIO_SUFFIXES + TEXT_SUFFIXES:
            if suffix in TEXT_SUFFIXES:
                q.text = p.read_text().strip()
            elif suffix in IMAGE_SUFFIXES:
                if q.image is not None:
                    raise SearchError(f"--query {query} and --query-image both give an image: give one")
                q.image = p
            else:
                if q.audio is not None:
                    raise SearchError(f"--query {query} and --query-audio both give audio: give one")
                q.audio = p
        elif is_file:
            known = " ".join(IMAGE_SUFFIXES + AUDIO_SUFFIXES + TEXT_SUFFIXES)
            raise SearchError(f"--query {query}: a file of unknown type {suffix or '(no suffix)'} (known: {known})")
        elif " " not in query and suffix in IMAGE_SUFFIXES + AUDIO_SUFFIXES + TEXT_SUFFIXES:
            raise SearchError(f"--query {query}: no such file (a --query ending in {suffix} is read as a file)")
        else:
            q.text = query
    if q.text is not None and not q.text.strip():
        raise SearchError("the query's text is empty")
    if q.text is None and q.image is None and q.audio is None:
        raise SearchError("no query: give --query TEXT|FILE, --query-image PATH or --query-audio PATH")
    return q


def query_vector(
    emb: Mapping[str, Any], observed: Sequence[bool], imputed: Sequence[bool] | None, target: str, complete: bool
) -> tuple[np.ndarray, str]:
    """The vector to search `target` rows with, from one encoded query (Encoder.encode's emb,
    observed and imputed of one row, in the order of MODALITIES), and how it was made:
    the query's own `target` vector when it has one; else with `complete` the calibrator's
    imputed `target` vector; else the query's own vector (the mean of its modalities' when it
    has several), compared across modalities by cosine."""
    has = [m for m, o in zip(MODALITIES, observed) if bool(o)]
    if target in has:
        return _unit(emb[target]), f"the query's own {target} vector"
    if not has:
        raise SearchError("the query has no usable modality (nothing in it could be encoded)")
    if complete:
        if imputed is None or not bool(imputed[MODALITIES.index(target)]):
            raise SearchError(f"the calibrator did not impute {target} from the query's {'+'.join(has)}")
        return _unit(emb[target]), f"{target} imputed by the calibrator from the query's {'+'.join(has)}"
    vec = _unit(np.mean([_unit(emb[m]) for m in has], axis=0))
    return vec, f"the query's {'+'.join(has)} vector against {target} rows (cross-modal cosine)"


def _unit(v: Any) -> np.ndarray:
    arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(arr))
    if norm == 0 or not math.isfinite(norm):
        raise SearchError("the query's vector is zero: the model encoded nothing for it")
    return arr / norm


# -- output ---------------------------------------------------------------------------------


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def text_table(hits: Sequence[Hit], header: str) -> str:
    key_w = max([3] + [len(h.key) for h in hits])
    lines = [header, f"{'rank':>4}  {'score':>7}  {'key':<{key_w}}  {'modality':<8}  {'vector':<8}  caption / source"]
    for h in hits:
        shown = _one_line(h.caption) or _one_line(h.source)
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {h.key:<{key_w}}  {h.modality:<8}  {h.status:<8}  {shown}")
    if not hits:
        lines.append("(no hits)")
    return "\n".join(lines)


def _local_file(source: str | None) -> Path | None:
    """The source as a local file, when it is one (not a URL, not a shard URL#key)."""
    if not source or "://" in source or "#" in source:
        return None
    p = Path(source)
    return p.resolve() if p.is_file() else None


def write_html(path: str | Path, hits: Sequence[Hit], header: str, query: str) -> Path:
    """A page with the query and the hits: thumbnails inline (base64 PNG), audio rows with an
    <audio controls> player and a link when their source is a local file, captions."""
    esc = html.escape
    rows = []
    for h in hits:
        cells = [f"<td>{h.rank}</td>", f"<td>{h.score:.4f}</td>", f'<td class="key">{esc(h.key)}</td>']
        cells.append(f"<td>{esc(h.modality)}</td><td>{h.status}</td>")
        media = ""
        if h.thumbnail:
            b64 = base64.b64encode(h.thumbnail).decode()
            media += f'<img src="data:image/png;base64,{b64}" alt="{esc(h.key)}">'
        local = _local_file(h.source)
        if h.modality == "audio" and local is not None:
            uri = esc(local.as_uri())
            media += f'<audio controls preload="none" src="{uri}"></audio><br><a href="{uri}">{esc(local.name)}</a>'
        cells.append(f"<td>{media}</td>")
        cells.append(f"<td>{esc(h.caption or '')}</td><td>{esc(h.source or '')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>calmrl search: {esc(query)}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 8px;vertical-align:top;border-bottom:1px solid #ddd}}
img{{max-width:128px}} .key{{font-family:monospace}}</style></head>
<body><h1>calmrl search</h1><p class="query">query: {esc(query)}</p><p class="header">{esc(header)}</p>
<table><tr><th>rank</th><th>score</th><th>key</th><th>modality</th><th>vector</th><th>media</th><th>caption</th><th>source</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    return atomic_write(path, page)


def write_png(path: str | Path, hits: Sequence[Hit], query: str) -> Path:
    """A grid of the hits' thumbnails (caption text where a hit has no picture), each titled
    with rank, score and key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = max(1, min(5, len(hits)))
    nrows = max(1, math.ceil(len(hits) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols, 2.7 * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, h in zip(axes.ravel(), hits):
        if h.thumbnail:
            ax.imshow(Image.open(io.BytesIO(h.thumbnail)).convert("RGB"))
        else:
            text = _one_line(h.caption or h.source or f"({h.modality}, no picture)", 80)
            ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
        ax.set_title(f"#{h.rank} {h.score:.3f}\n{_one_line(h.key, 24)}", fontsize=8)
    fig.suptitle(_one_line(f"query: {query}", 90), fontsize=10)
    fig.tight_layout()
    try:
        return atomic_save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
