"""Memory and time of each objective's forward + backward as the global batch grows.

One process stands in for a rank of a large job: 256 local rows (d = 512,
three modalities, every modality present) against a gathered tensor of 1k, 4k,
16k and 32k columns, built by the objective's own gather through a
`GlobalBatch` that repeats the local rows (benchmarks only). Each objective
runs whole (`loss.column_chunk: 0`, the computation as it was before
chunking) and in column chunks (`--chunk`). Each measurement runs in a fresh
process: on CPU the figure is the peak live tensor memory above what the inputs
already held, from the profiler's allocation events; on CUDA the peak
allocated memory above the inputs. Times are medians of unprofiled repeats.

    python benchmarks/bench_objectives.py [--columns 1024 4096 16384 32768] [--chunk 2048] [--device cpu|cuda]

Goal: at 32k columns every joint objective, chunked, within 2x the memory of
pairwise InfoNCE (whole).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.contract import MODALITIES  # noqa: E402
from pretrain.config import LossConfig  # noqa: E402
from pretrain.distributed import GlobalBatch  # noqa: E402
from pretrain.losses import create_objective  # noqa: E402

OBJECTIVES = ("pairwise", "gram", "pmrl")


class RepeatedBatch(GlobalBatch):
    """A global batch of `copies` x the local rows, this process as rank 0 of `copies`."""

    def __init__(self, copies: int):
        self.copies = copies

    def rank(self) -> int:
        return 0

    def world(self) -> int:
        return self.copies

    def _others(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().repeat(self.copies - 1, *([1] * (x.dim() - 1)))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self._others(x)]) if self.copies > 1 else x

    def gather_nograd(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(x.detach())

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() * self.copies


def _cpu_peak_bytes(fn) -> int:
    """Peak live tensor memory of `fn()` on CPU: the running sum of the profiler's
    per-op allocations and frees, in time order (resident-set figures measure the
    C allocator's caching, not the tensors)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure_one(objective: str, columns: int, chunk: int, rows: int, dim: int, reps: int, device: str) -> dict:
    """Peak memory (MiB) above the inputs and median seconds of forward + backward, in this process."""
    torch.manual_seed(0)
    dev = torch.device(device)
    emb = {m: F.normalize(torch.randn(rows, dim, device=dev), dim=-1).requires_grad_(True) for m in MODALITIES}
    present = torch.ones(rows, len(MODALITIES), dtype=torch.bool, device=dev)
    scale = torch.tensor([10.0], device=dev, requires_grad=True)
    loss_fn = create_objective(LossConfig(objective=objective, column_chunk=chunk))
    batch = RepeatedBatch(columns // rows)

    def step() -> None:
        out = loss_fn(emb, present, scale, MODALITIES, available=present, global_batch=batch)
        out["loss"].backward()
        for leaf in [*emb.values(), scale]:
            leaf.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _cpu_peak_bytes(step)
    return {
        "objective": objective,
        "columns": columns,
        "chunk": chunk,
        "peak_mib": peak / 2**20,
        "s": statistics.median(times),
    }


def run_isolated(args: argparse.Namespace, objective: str, columns: int, chunk: int) -> dict:
    command = [sys.executable, __file__, "--one", objective, str(columns), str(chunk)]
    command += ["--rows", str(args.rows), "--dim", str(args.dim), "--reps", str(args.reps), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {objective} {columns} chunk {chunk} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--columns", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--chunk", type=int, default=2048, help="column chunk of the chunked runs")
    parser.add_argument("--rows", type=int, default=256, help="local rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--one", nargs=3, metavar=("OBJECTIVE", "COLUMNS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        objective, columns, chunk = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure_one(objective, columns, chunk, args.rows, args.dim, args.reps, args.device)))
        return
    if any(c % args.rows for c in args.columns):
        raise SystemExit(f"--columns must be multiples of --rows ({args.rows})")
    results = {}
    from tqdm import tqdm

    plan = [(o, c, k) for c in args.columns for o in OBJECTIVES for k in (0, args.chunk)]
    for objective, columns, chunk in tqdm(plan, desc="objectives", unit="run"):
        results[objective, columns, chunk] = run_isolated(args, objective, columns, chunk)
    print(f"\n{args.rows} local rows, d={args.dim}, {len(MODALITIES)} modalities, {args.device}, forward+backward")
    print(f"peak memory above the inputs (MiB) and median time (ms); chunked: {args.chunk} columns at a time")
    header = f"{'objective':<10}" + "".join(
        f"{f'{c // 1024}k whole':>16}{f'{c // 1024}k chunked':>18}" for c in args.columns
    )
    print(header)
    for objective in OBJECTIVES:
        cells = []
        for c in args.columns:
            for k in (0, args.chunk):
                r = results[objective, c, k]
                cells.append(f"{r['peak_mib']:7.0f} {1000 * r['s']:6.0f}ms".rjust(16 if k == 0 else 18))
        print(f"{objective:<10}" + "".join(cells))
    largest = max(args.columns)
    reference = results["pairwise", largest, 0]["peak_mib"]
    verdicts = []
    for objective in ("gram", "pmrl"):
        ratio = results[objective, largest, args.chunk]["peak_mib"] / reference
        whole = results[objective, largest, 0]["peak_mib"] / reference
        verdicts.append(ratio <= 2.0)
        print(
            f"{objective} at {largest} columns: chunked {ratio:.2f}x, whole {whole:.2f}x the memory of pairwise (whole)"
        )
    print(
        f"goal (joint objectives chunked <= 2x pairwise at {largest} columns): {'met' if all(verdicts) else 'missed'}"
    )


if __name__ == "__main__":
    main()
