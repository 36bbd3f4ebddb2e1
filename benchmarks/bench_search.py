"""`calmrl search` latency: exact (IndexFlatIP) and approximate (IndexIVFFlat) indexes.

For each size, random unit vectors (D=128) are written to a real embeddings file
(evals/vector_file.py) and searched through evals/search.py, the code `calmrl search` runs:

- build: open_index on a file with no saved index (read the vectors, build, measure the IVF
  index's recall and choose nprobe, save the index beside the file);
- reuse: open_index again (the saved index read back);
- single: one query (median of 20), batch: 100 queries at once (median of 3);
- recall@10: of the approximate index against the exact one on 100 fresh random queries, and
  the recall the build measured on 256 of the data's own rows (which set nprobe).

    python benchmarks/bench_search.py [--sizes 10000,1000000] [--data uniform|clustered] [--threads N]
    python benchmarks/bench_search.py --blas-crossover --threads 1   # exact search with and without BLAS

`uniform` is what the issue asks (no structure: the hardest case for any approximate index,
every neighbour barely nearer than the rest); `clustered` (100-row clusters, noise 0.6) is closer
to real embeddings. faiss runs on every core this process may use (faiss.omp_set_num_threads),
or --threads. The 1M case takes about 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from evals.search import TARGET_RECALL, open_index, recall_at_k, search, set_threads
from evals.vector_file import VectorFileWriter, VectorRows

DIM = 128
K = 10


def make_data(n: int, data: str, queries: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit rows and `queries` fresh unit queries from the same distribution (not rows of it)."""
    rng = np.random.default_rng(seed)
    if data == "uniform":
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        q = rng.standard_normal((queries, DIM), dtype=np.float32)
    else:
        centres = rng.standard_normal((max(n // 100, 1), DIM), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        noise = np.float32(0.6 / np.sqrt(DIM))
        x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, DIM), dtype=np.float32) * noise
        q = (
            centres[rng.integers(0, len(centres), queries)]
            + rng.standard_normal((queries, DIM), dtype=np.float32) * noise
        )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def write_file(path: Path, x: np.ndarray, chunk: int = 100_000) -> None:
    with VectorFileWriter(path, DIM, {"model": "bench_search"}) as writer:
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            m = len(part)
            writer.write(
                VectorRows(
                    key=[f"r{start + i}" for i in range(m)],
                    modality=["image"] * m,
                    observed=[True] * m,
                    vectors=list(part),
                    variance=[None] * m,
                    source=[None] * m,
                    caption=[None] * m,
                    thumbnail=[None] * m,
                )
            )
        writer.close()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(n: int, data: str, folder: Path) -> list[dict]:
    x, queries = make_data(n, data)
    path = folder / f"bench-{n}.parquet"
    t0 = time.perf_counter()
    write_file(path, x)
    print(
        f"[{n:,}] wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    del x
    results = []
    exact_rows = None
    for kind, exact_below in (("flat", n + 1), ("ivf", 0)):
        t0 = time.perf_counter()
        idx = open_index(path, "image", exact_below=exact_below, rebuild=True, log=lambda line: print(line, flush=True))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx = open_index(path, "image", exact_below=exact_below, log=print)
        reuse_s = time.perf_counter() - t0
        assert idx.info.reused and idx.info.kind == kind
        single = timed(partial(search, idx, queries[:1], K), 20)
        batch = timed(partial(search, idx, queries, K), 3)
        _, rows = search(idx, queries, K + 1)
        row = {
            "n": n,
            "kind": kind,
            "params": "" if kind == "flat" else f"nlist {idx.info.nlist}, nprobe {idx.info.nprobe}",
            "build_s": build_s,
            "reuse_s": reuse_s,
            "single_ms": single * 1e3,
            "batch_ms": batch * 1e3,
            "recall": None,
            "build_recall": idx.info.recall,
        }
        if kind == "flat":
            exact_rows = rows
        else:
            assert exact_rows is not None
            none = np.full(len(queries), -2)  # no query is a row of the data: nothing to leave out
            row["recall"] = recall_at_k(exact_rows, rows, none, K)
        results.append(row)
        print(f"[{n:,}] {kind}: {describe(row)}", flush=True)
        del idx
    return results


def blas_crossover(n: int) -> None:
    """Exact search of 1..32 queries one query at a time (faiss's default below 1000 queries of
    D=128) and by BLAS: where evals.search.BLAS_FROM_QUERIES comes from."""
    import faiss

    x, q = make_data(n, "uniform")
    index = faiss.IndexFlatIP(DIM)
    index.add(x)
    for nq in (1, 2, 4, 8, 16, 32):
        cells = []
        for name, threshold in (("one at a time", 1 << 30), ("BLAS", 1)):
            faiss.cvar.distance_compute_blas_threshold = threshold
            ms = timed(partial(index.search, q[:nq], K), 3) * 1e3
            cells.append(f"{name} {ms:.0f} ms")
        print(f"[{n:,}] exact, {nq:>2} queries: " + ", ".join(cells), flush=True)


def describe(r: dict) -> str:
    rec = "" if r["recall"] is None else f", recall@10 {r['recall']:.3f} (build sample {r['build_recall']:.3f})"
    return (
        f"build {r['build_s']:.2f} s, reuse {r['reuse_s']:.2f} s, single {r['single_ms']:.2f} ms, "
        f"batch of 100 {r['batch_ms']:.1f} ms{rec}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--data", default="uniform", choices=("uniform", "clustered"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--blas-crossover", action="store_true", help="only time exact search of 1-32 queries with and without BLAS"
    )
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"faiss threads: {threads} (faiss.omp_set_num_threads); D={DIM}, k={K}, data {args.data}", flush=True)
    if args.blas_crossover:
        blas_crossover(max(int(s) for s in args.sizes.split(",")))
        return
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows += bench_size(n, args.data, Path(tmp))
    print()
    head = f"{'n':>10}  {'index':<28}  {'build s':>8}  {'reuse s':>8}  {'1 query ms':>10}  {'100 queries ms':>14}  {'recall@10':>9}"
    print(head)
    for r in rows:
        name = "exact IndexFlatIP" if r["kind"] == "flat" else f"IVF {r['params']}"
        rec = "1 (exact)" if r["recall"] is None else f"{r['recall']:.3f}"
        print(
            f"{r['n']:>10,}  {name:<28}  {r['build_s']:>8.2f}  {r['reuse_s']:>8.2f}  {r['single_ms']:>10.2f}  "
            f"{r['batch_ms']:>14.1f}  {rec:>9}"
        )
    big = max(r["n"] for r in rows)
    flat = next(r for r in rows if r["n"] == big and r["kind"] == "flat")
    ivf = next(r for r in rows if r["n"] == big and r["kind"] == "ivf")
    print(
        f"summary: {big:,} x {DIM} {args.data}, {threads} threads: exact {flat['single_ms']:.1f} ms/query "
        f"({flat['batch_ms'] / 100:.2f} ms/query in a batch of 100), IVF ({ivf['params']}, target recall "
        f"{TARGET_RECALL}) {ivf['single_ms']:.2f} ms/query ({ivf['batch_ms'] / 100:.2f} in a batch) at recall@10 "
        f"{ivf['recall']:.3f}, built in {ivf['build_s']:.1f} s; whole run {time.perf_counter() - t_start:.0f} s"
    )


if __name__ == "__main__":
    main()
