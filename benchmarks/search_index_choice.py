"""Why `calmrl search`'s approximate index is IVF and not HNSW: build time and recall/latency
of both on the same data (D=128, unit vectors), on this machine's cores.

- IVF: IndexIVFFlat, nlist = the power of two nearest sqrt(n) (1024 at 1M), k-means on 40
  points per list, then nprobe = 1, 2, 4, ... 256;
- HNSW: IndexHNSWFlat, M=16, efConstruction=40 (faiss's defaults), then efSearch = 16 ... 256.
Recall@10 against exact search (faiss.knn) on 256 of the data's own rows, each row's own id
left out. Latency is per query inside the batch of 256.

    python benchmarks/search_index_choice.py [--n 1000000] [--data clustered|uniform] [--hnsw-n N]

--hnsw-n builds the HNSW graph on the first N rows only (its build is the slow part: several
minutes at 1M on 2 cores); its recall is then measured against exact search on those N rows.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from evals.search import TRAIN_POINTS_PER_LIST, nlist_for, recall_at_k, set_threads

D, K = 128, 10


def data(n: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.standard_normal((n, D), dtype=np.float32)
    else:
        c = rng.standard_normal((max(n // 100, 1), D), dtype=np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        x = c[rng.integers(0, len(c), n)] + rng.standard_normal((n, D), dtype=np.float32) * np.float32(0.6 / D**0.5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--data", default="clustered", choices=("clustered", "uniform"))
    p.add_argument("--hnsw-n", type=int, default=None)
    args = p.parse_args()
    print(f"faiss threads: {set_threads()}; n={args.n:,} D={D} {args.data}", flush=True)
    x = data(args.n, args.data)
    rng = np.random.default_rng(1)
    own = np.sort(rng.choice(args.n, 256, replace=False))
    _, truth = faiss.knn(x[own], x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    nlist = nlist_for(args.n)
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[np.sort(rng.choice(args.n, min(args.n, TRAIN_POINTS_PER_LIST * nlist), replace=False))])
    ivf.add(x)
    print(f"IVF nlist {nlist}: build {time.perf_counter() - t0:.1f} s", flush=True)
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        ivf.nprobe = nprobe
        t0 = time.perf_counter()
        _, found = ivf.search(x[own], K + 1)
        ms = (time.perf_counter() - t0) * 1e3 / len(own)
        print(f"  nprobe {nprobe:>3}: recall@10 {recall_at_k(truth, found, own, K):.3f}  {ms:.2f} ms/query", flush=True)
    del ivf
    hn = min(args.hnsw_n or args.n, args.n)
    if hn < args.n:
        own = np.sort(rng.choice(hn, 256, replace=False))
        _, truth = faiss.knn(x[own], x[:hn], K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(D, 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(x[:hn])
    print(f"HNSW M 16 efConstruction 40 on {hn:,} rows: build {time.perf_counter() - t0:.1f} s", flush=True)
    for ef in (16, 32, 64, 128, 256):
        hnsw.hnsw.efSearch = ef
        t0 = time.perf_counter()
        _, found = hnsw.search(x[own], K + 1)
        ms = (time.perf_counter() - t0) * 1e3 / len(own)
        print(f"  efSearch {ef:>3}: recall@10 {recall_at_k(truth, found, own, K):.3f}  {ms:.2f} ms/query", flush=True)


if __name__ == "__main__":
    main()
