"""Trainer overhead: the DeepSpeed trainer against a bare PyTorch loop of the
same model, loss, optimizer and clipping, in one process, on the same
in-memory batches (so only the framework differs). Also reports the trainer
fed by the real shard loader (data-wait share).

    python benchmarks/bench_trainer.py [--config configs/tiny_cpu.yaml] [--steps 30] [--rounds 3]

Goal: trainer step time / bare step time <= 1.15.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.reader import BatchLoader
from data_pipeline.split import vocab_size
from pretrain.config import load_config
from pretrain.engine import build_optimizer
from pretrain.losses import create_objective
from pretrain.model import build_model
from pretrain.runtime import REPO_ROOT as REPO
from pretrain.runtime import configure_runtime
from pretrain.trainer import Trainer, build_trainer


def bare_loop_times(cfg, batches, steps: int, warmup: int) -> list[float]:
    model = build_model(cfg, vocab_size(cfg.data))
    opt = build_optimizer(model, cfg)
    objective = create_objective(cfg.loss)
    times = []
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
        t0 = time.perf_counter()
        out = model(batch)
        loss = objective(out["emb"], batch["present"], out["logit_scale"], MODALITIES)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def trainer_times(trainer: Trainer, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    times, waits = [], []
    for i in range(steps + warmup):
        stats = trainer.train_step()
        if i >= warmup:
            times.append(stats.step_time_s)
            waits.append(stats.data_wait_s)
    return times, waits


def main() -> None:
    configure_runtime()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/tiny_cpu.yaml"))
    parser.add_argument("--data", default=None, help="train split folder (default: the config's)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=None)
    args = parser.parse_args()

    # Same work on both sides: no calibration (the bare loop has none) and no
    # log-step diagnostics (log-likelihood, anchor shift) inside the timed steps.
    overrides = [
        "--train.grad_accum=1",
        f"--train.steps={10**6}",
        "--train.warmup_steps=1",
        "--calibration.method=observed_only",
        f"--train.log_every={10**6}",
    ]
    if args.data:
        overrides.append(f"--data.shards={args.data}")
    if args.zero_stage is not None:
        overrides.append(f"--train.zero_stage={args.zero_stage}")
    cfg = load_config(args.config, overrides)
    cfg.train.out_dir = tempfile.mkdtemp(prefix="bench_trainer_")
    loader = BatchLoader(cfg.data, 0, 1)
    batches = [next(loader) for _ in range(8)]

    trainer = build_trainer(cfg, batches=itertools.cycle(batches))
    trainer.batches = trainer._external_batches
    bare, ds = [], []
    for _ in range(args.rounds):  # interleave to spread machine noise over both
        bare += bare_loop_times(cfg, batches, args.steps, args.warmup)
        ds += trainer_times(trainer, args.steps, args.warmup)[0]
    trainer.batches = BatchLoader(cfg.data, 0, 1)
    real, waits = trainer_times(trainer, args.steps, args.warmup)

    b, d, rl = statistics.median(bare), statistics.median(ds), statistics.median(real)
    bs = cfg.data.batch_size
    print(
        f"config {args.config}: batch {bs}, ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, "
        f"{torch.get_num_threads()} threads, median of {len(bare)} steps"
    )
    print(f"  bare PyTorch loop      : {1 / b:7.2f} steps/s {bs / b:8.1f} samples/s ({b * 1e3:.1f} ms/step)")
    print(f"  DeepSpeed trainer      : {1 / d:7.2f} steps/s {bs / d:8.1f} samples/s ({d * 1e3:.1f} ms/step)")
    print(
        f"  trainer + shard loader : {1 / rl:7.2f} steps/s {bs / rl:8.1f} samples/s ({rl * 1e3:.1f} ms/step), "
        f"data wait {100 * sum(waits) / sum(real):.1f}% of step time"
    )
    ratio = d / b
    verdict = "meets" if ratio <= 1.15 else "misses"
    print(f"trainer/bare step-time ratio {ratio:.3f} ({verdict} the 1.15 goal)")


if __name__ == "__main__":
    main()
