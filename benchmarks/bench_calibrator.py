"""Time the calibrator's per-step cost: E-step + statistics (accumulate), m_step, impute.

One rank's share of a training step at the default sizes (B=256 per rank,
dim=512, latent 64, three modalities, 30-50% of entries missing, float32
features). Single process, so no all-reduce is timed. Compare the printed
median with the trainer's step time.

    python benchmarks/bench_calibrator.py [--device cuda] [--calibrator-dtype float32] [--threads N]

On a CPU shared with other work, pass --threads 1: OpenMP threads that wait
on a busy core make the default-thread figure swing by an order of magnitude.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pretrain.calibration import Calibrator

MODALITIES = ["image", "text", "audio"]


def make_batch(batch: int, dim: int, device: torch.device, generator: torch.Generator):
    """Unit-norm float32 features with 30-50% of (sample, modality) entries missing."""
    missing_rate = 0.3 + 0.2 * torch.rand(1, generator=generator).item()
    present = torch.rand(batch, len(MODALITIES), generator=generator) >= missing_rate
    empty = ~present.any(dim=1)
    present[empty, torch.randint(len(MODALITIES), (int(empty.sum()),), generator=generator)] = True
    z = {
        name: torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device)
        for name in MODALITIES
    }
    return z, present.to(device), 1.0 - present.float().mean().item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(calibrator: Calibrator, z, present, device: torch.device) -> dict[str, float]:
    """Milliseconds spent in each phase of one calibrator step."""
    timings = {}
    synchronize(device)
    start = time.perf_counter()
    calibrator.accumulate(z, present)
    synchronize(device)
    timings["accumulate"] = time.perf_counter() - start
    start = time.perf_counter()
    calibrator.m_step()
    synchronize(device)
    timings["m_step"] = time.perf_counter() - start
    start = time.perf_counter()
    calibrator.impute(z, present)
    synchronize(device)
    timings["impute"] = time.perf_counter() - start
    timings["step"] = sum(timings.values())
    return {name: 1000.0 * seconds for name, seconds in timings.items()}


def run(
    batch: int, dim: int, latent: int, reps: int, warmup: int, device_name: str, calibrator_dtype: str
) -> dict[str, float]:
    device = torch.device(device_name)
    generator = torch.Generator().manual_seed(0)
    calibrator = Calibrator(MODALITIES, dim, latent, dtype=getattr(torch, calibrator_dtype)).to(device)
    batches = [make_batch(batch, dim, device, generator) for _ in range(reps)]
    for z, present, _ in batches[:warmup]:
        time_phases(calibrator, z, present, device)
    samples = [time_phases(calibrator, z, present, device) for z, present, _ in batches]
    medians = {name: statistics.median(sample[name] for sample in samples) for name in samples[0]}
    medians["missing_share"] = statistics.mean(missing for _, _, missing in batches)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="samples per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calibrator-dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    result = run(args.batch, args.dim, args.latent, args.reps, args.warmup, args.device, args.calibrator_dtype)
    for phase in ("accumulate", "m_step", "impute", "step"):
        print(f"{phase:>10}: {result[phase]:8.2f} ms (median of {args.reps})")
    print(
        f"calibrator step: {result['step']:.2f} ms median | B={args.batch} dim={args.dim} latent={args.latent} "
        f"modalities={len(MODALITIES)} missing={result['missing_share']:.0%} features=float32 "
        f"state={args.calibrator_dtype} device={args.device} threads={torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
