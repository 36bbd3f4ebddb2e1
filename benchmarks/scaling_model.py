"""The written scaling model of docs/scaling.md, as numbers: per rank and per step,
bytes all-gathered for negatives, the calibrator's all-reduce, the gathered tensor's
memory and the objective's logits memory, for 8 to 1024 GPUs.

    python benchmarks/scaling_model.py [--batch 256] [--dim 512] [--latent 64] [--chunk 4096]

Formulas (M modalities, B local rows, W ranks, N = W B columns, d, k; fp32 = 4 bytes:
embeddings are normalised in fp32 and the objectives gather them so, also in bf16 runs):
  all-gather for negatives, forward + backward (reduce-scatter of its gradient):
      pairwise, GRAM: 2 x N x M x d x 4      PMRL: 2 x N x d x 4 (only u)
  gathered tensor and its gradient, resident during the backward: the same figures
  calibrator all-reduce: M x (d (k+1) + (k+1)^2 + 2) x 4, whatever W
  logits and their intermediates: c x B x N x 4 whole, c x B x chunk x 4 chunked,
      with c measured by benchmarks/bench_objectives.py ((whole - chunked) / (4 B N) at 32k
      columns: pairwise 4, GRAM 13 on this machine; --c-pairwise / --c-gram)
"""

from __future__ import annotations

import argparse


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="local rows (the GPU preset: 256)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--modalities", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--c-pairwise", type=float, default=4.0)
    parser.add_argument("--c-gram", type=float, default=13.0)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512, 1024])
    args = parser.parse_args()
    b, d, k, m = args.batch, args.dim, args.latent, args.modalities
    calibrator = m * (d * (k + 1) + (k + 1) ** 2 + 2) * 4
    print(f"B={b} per rank, d={d}, k={k}, {m} modalities, fp32 embeddings; per rank and step")
    columns = (
        "GPUs",
        "columns",
        "gather pw/GRAM",
        "gather PMRL",
        "calib. reduce",
        "logits pw",
        "logits GRAM",
        "chunked GRAM",
    )
    print("".join(f"{c:>15}" for c in columns))
    for w in args.gpus:
        n = w * b
        row = [
            str(w),
            str(n),
            human(2 * n * m * d * 4),
            human(2 * n * d * 4),
            human(calibrator),
            human(args.c_pairwise * b * n * 4),
            human(args.c_gram * b * n * 4),
            human(args.c_gram * b * min(n, args.chunk) * 4),
        ]
        print("".join(f"{c:>15}" for c in row))
    print("scaling_model: gathered negatives grow with W; logits grow with W unless chunked; the calibrator does not")


if __name__ == "__main__":
    main()
