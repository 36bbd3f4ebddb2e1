"""`calmrl embed` throughput against the bare forward pass of the same model.

    python benchmarks/bench_embed.py --model runs/demo --input data/tuxpaint/test --input data/synthetic/test

For each input: records per second of `embed_inputs` (decode in loader workers, forward,
completion, thumbnails, Parquet), and of the bare forward (`Encoder.encode_batch`) over the
same batches decoded beforehand and held in memory. Goal: embed >= 0.8x bare. The model is
loaded once, outside the timings; each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pretrain.runtime import configure_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder or an export")
    parser.add_argument("--input", action="append", required=True, help="a split, folder or manifest (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--complete", action="store_true", help="also impute (both sides)")
    args = parser.parse_args()
    configure_runtime()
    from evals.embed_inputs import _DecodedBatches, embed_inputs
    from pretrain.encoder import Encoder

    encoder = Encoder.load(args.model)
    rows = []
    for source in args.input:
        batches = [i["batch"] for i in _DecodedBatches(encoder, source, args.batch_size) if i["batch"] is not None]
        records = sum(len(b["key"]) for b in batches)
        encoder.encode_batch(batches[0], args.complete)  # warm-up (first-call allocations)
        bare, full = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for batch in batches:
                encoder.encode_batch(batch, args.complete)
            bare.append(records / (time.perf_counter() - t0))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                report = embed_inputs(
                    args.model,
                    source,
                    Path(tmp) / "v.parquet",
                    args.complete,
                    args.batch_size,
                    encoder=encoder,
                    progress=False,
                    workers=args.workers,
                )
                full.append(report.records / (time.perf_counter() - t0))
        rows.append((source, records, statistics.median(full), statistics.median(bare)))
    print("| input | records | embed records/s | bare forward records/s | ratio (goal >= 0.8) |")
    print("|---|---|---|---|---|")
    for source, n, full_rate, bare_rate in rows:
        print(f"| {source} | {n} | {full_rate:.1f} | {bare_rate:.1f} | {full_rate / bare_rate:.2f} |")
    worst = min(r[2] / r[3] for r in rows)
    print(
        f"embed/bare forward: worst ratio {worst:.2f} over {len(rows)} inputs ({args.workers} decode workers, "
        f"batch {args.batch_size}, median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
