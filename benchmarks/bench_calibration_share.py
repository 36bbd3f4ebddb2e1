"""The calibrator's share of a real training step (goal: <= 5%).

Runs the DeepSpeed trainer in one process on the tiny CPU preset with
B=256 per rank, embed dim 512, latent 64 (CalMRL imputing from step 0), on
in-memory batches from the real loader, and times inside each step the
completion work (E-step + statistics + M-step + imputation). Also times the
same trainer with calibration off (observed_only) for the step-time delta.

    python benchmarks/bench_calibration_share.py [--steps 10] [--batch 256] [--dim 512] [--latent 64]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile

from data_pipeline.reader import BatchLoader
from pretrain.config import load_config
from pretrain.runtime import REPO_ROOT as REPO
from pretrain.runtime import configure_runtime
from pretrain.trainer import build_trainer


def run(method: str, args, batches) -> tuple[float, float]:
    cfg = load_config(
        args.config,
        [
            f"--data.batch_size={args.batch}",
            f"--model.embed_dim={args.dim}",
            f"--calibration.method={method}",
            f"--calibration.latent_dim={args.latent}",
            "--calibration.warmup_steps=0",
            "--train.steps=1000000",
            "--train.warmup_steps=1",
            "--train.grad_accum=1",
            f"--train.log_every={10**6}",
            *([f"--data.shards={args.data}"] if args.data else []),
        ],
    )
    cfg.train.out_dir = tempfile.mkdtemp(prefix="bench_share_")
    trainer = build_trainer(cfg, batches=itertools.cycle(batches))
    trainer.batches = trainer._external_batches
    stats = [trainer.train_step() for _ in range(args.steps + 2)][2:]
    return statistics.median(s.step_time_s for s in stats), statistics.median(s.completion_time_s for s in stats)


def main() -> None:
    configure_runtime()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/tiny_cpu.yaml"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--latent", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(
        args.config, [f"--data.batch_size={args.batch}", *([f"--data.shards={args.data}"] if args.data else [])]
    )
    loader = BatchLoader(cfg.data, 0, 1)
    batches = [next(loader) for _ in range(3)]
    missing = 1 - float(sum(b["present"].float().mean() for b in batches) / len(batches))
    step_cal, calib = run("calmrl", args, batches)
    step_off, _ = run("observed_only", args, batches)
    share = calib / step_cal
    print(
        f"B={args.batch}/rank, dim {args.dim}, latent {args.latent}, {missing:.0%} of entries missing, "
        f"median of {args.steps} steps"
    )
    print(f"  step with calibration    : {step_cal * 1e3:8.1f} ms (calibrator {calib * 1e3:.1f} ms inside)")
    print(f"  step without calibration : {step_off * 1e3:8.1f} ms (delta {100 * (step_cal / step_off - 1):+.1f}%)")
    print(f"calibrator share of the step: {100 * share:.1f}% ({'meets' if share <= 0.05 else 'misses'} the 5% goal)")


if __name__ == "__main__":
    main()
