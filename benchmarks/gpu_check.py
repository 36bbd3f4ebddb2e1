"""The first thing to run on a GPU machine: does training work, and how fast is it?

Builds a small synthetic split at the GPU preset's sizes, then trains the GPU
preset's towers (configs/gpu_8x.yaml) for a few dozen steps in each of: ZeRO
0, 2 and 3 in bf16, ZeRO 2 in bf16 with the objective's logits in chunks of a
quarter of the batch (`loss.column_chunk`: its values equal the whole ones, so its loss must
track too), and ZeRO 2 in fp32 with the same seed (the reference the bf16
losses must track). Each case runs in its own torchrun job on one GPU (all
GPUs with --all) and reports:

- samples/s and step time (medians after warm-up);
- model FLOPs utilisation: FLOPs of one training step counted with
  `torch.utils.flop_counter` (forward and backward of the towers and the
  objective), per second, over the device's dense bf16 peak (`--peak-tflops`,
  or the small table below by device name);
- peak memory (torch.cuda.max_memory_allocated);
- data-wait share (time waiting for the loader over step time);
- calibrator share (the completion of one step's batch, timed alone with
  synchronisation, over the step time);
- host synchronisations in steps that do not log (torch.cuda.set_sync_debug_mode);
- for bf16 cases: the largest relative gap between its loss and the fp32 loss at
  the steps both read (should stay within a few per cent over a short run).

    python benchmarks/gpu_check.py [--all] [--steps 40] [--batch 128] [--peak-tflops 989]
    scripts/gpu_check.sh                     # the same, one line

It prints one table and should finish in under 5 minutes on one modern GPU.
Without CUDA it says so and exits with status 2. `--smoke` runs the same
pipeline on CPU with tiny towers and fp32 in place of bf16 (no GPU figures):
the test suite uses it so that the script itself is known to work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}

CASES = [  # (name, ZeRO stage, precision, extra overrides)
    ("zero0-bf16", 0, "bf16", []),
    ("zero2-bf16", 2, "bf16", []),
    ("zero3-bf16", 3, "bf16", []),
    # the chunked objective path, in chunks of a quarter of the local batch (one GPU's
    # batch is below the preset's 4096-column chunk)
    ("zero2-bf16-chunked", 2, "bf16", ["chunked"]),
    ("zero2-fp32", 2, "fp32", []),
]


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The device's dense bf16 peak: `override`, else the longest table key in its name."""
    if override:
        return override
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def count_flops(fn: Any) -> int:
    """FLOPs of `fn()` as torch's FlopCounterMode counts them (matmuls and convolutions,
    forward and backward: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def require_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). "
            "Run it on a GPU node with a CUDA build of torch; the CPU figures are benchmarks/bench_trainer.py's.",
            file=sys.stderr,
        )
        raise SystemExit(2)


# -- the worker: one case, in a torchrun job ---------------------------------


SMOKE = [  # --smoke: tiny towers and batches, so the pipeline runs on 2 CPU cores
    "--data.image_size=32",
    "--data.sample_rate=8000",
    "--data.audio_seconds=0.5",
    "--data.n_mels=32",
    "--data.n_fft=256",
    "--data.hop_length=80",
    "--model.embed_dim=32",
    "--model.image.width=16",
    "--model.image.depth=2",
    "--model.text.width=32",
    "--model.text.depth=1",
    "--model.text.heads=2",
    "--model.audio.width=16",
    "--model.audio.depth=2",
    "--calibration.latent_dim=8",
]


def _overrides(args: argparse.Namespace, zero: int, precision: str, out_dir: Path) -> list[str]:
    if args.smoke:  # CPU: fp32 (bf16 matmuls run at 0.2 GFLOP/s there), tiny sizes
        return _base_overrides(args, zero, "fp32", out_dir) + SMOKE
    return _base_overrides(args, zero, precision, out_dir)


def _base_overrides(args: argparse.Namespace, zero: int, precision: str, out_dir: Path) -> list[str]:
    return [
        f"--data.shards={args.data}/train",
        f"--data.batch_size={args.batch}",
        f"--data.num_workers={args.workers}",
        "--data.shuffle_buffer=256",
        f"--train.out_dir={out_dir}",
        f"--train.steps={args.steps}",
        f"--train.zero_stage={zero}",
        f"--train.precision={precision}",
        "--train.log_every=10",
        "--train.ckpt_every=0",
        "--train.warmup_steps=5",
        "--calibration.warmup_steps=5",
        "--model.dense_encode=true",
        f"--loss.objective={args.objective}",
    ] + ([f"--loss.column_chunk={args.column_chunk}"] if args.column_chunk is not None else [])


def _sync_count(trainer: Any, steps: int) -> int | None:
    """Synchronisations torch reports in `steps` steps that do not log (None on CPU)."""
    if not torch.cuda.is_available():
        for _ in range(steps):
            trainer.train_step()
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _calibrator_ms(trainer: Any, batch: dict[str, Any], reps: int = 10) -> float:
    """One step's completion (E-step, statistics, imputation, M-step), timed alone."""
    with torch.no_grad():
        emb = trainer.model(trainer._to_device(batch))["emb"]
        present = batch["present"].to(trainer.device)
        _synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            trainer.completion.complete(emb, present, trainer.step)
            trainer.completion.end_step(trainer.step)
        _synchronize()
    return 1000 * (time.perf_counter() - t0) / reps


def worker(args: argparse.Namespace) -> None:
    import itertools

    from data_pipeline.reader import BatchLoader
    from pretrain.config import load_config
    from pretrain.distributed import rank, world_size
    from pretrain.trainer import build_trainer

    name, zero, precision, extra = next(c for c in CASES if c[0] == args.worker)
    out = Path(args.out) / name
    extra = [f"--loss.column_chunk={max(1, args.batch // 4)}" if e == "chunked" else e for e in extra]
    cfg = load_config(str(REPO / "configs/gpu_8x.yaml"), _overrides(args, zero, precision, out / "run") + extra)
    trainer = build_trainer(cfg)
    history = trainer.fit()  # args.steps steps, reading every 10th
    # FLOPs of one more step, counted (not timed); then syncs in steps 2-4 after a log step
    flops = count_flops(trainer.train_step)
    trainer.train_step()
    syncs = _sync_count(trainer, 3)
    sample = next(iter(itertools.islice(BatchLoader(cfg.data, rank(), world_size()), 1)))
    calibrator_ms = _calibrator_ms(trainer, sample) if cfg.calibration.method == "calmrl" else 0.0
    timed = [h for h in history[5:] if not h.read] or history[1:]
    step_s = statistics.median(h.step_time_s for h in timed)
    result = {
        "case": name,
        "world": world_size(),
        "samples_per_s": statistics.median(h.samples_per_s for h in timed),
        "step_ms": 1000 * step_s,
        "flops_per_step": flops * world_size(),  # every rank counts its own share
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "data_wait_share": sum(h.data_wait_s for h in timed) / sum(h.step_time_s for h in timed),
        "calibrator_share": calibrator_ms / (1000 * step_s),
        "syncs_per_step": None if syncs is None else syncs / 3,
        "losses": {h.step: h.loss for h in history if h.read},
    }
    if rank() == 0:
        (out / "result.json").write_text(json.dumps(result))


# -- the driver --------------------------------------------------------------


def build_data(path: Path, samples: int, smoke: bool) -> None:
    if (path / "train" / "index.json").exists():
        return
    from data_pipeline.synthetic import SyntheticSpec, build_synthetic

    if smoke:
        spec = SyntheticSpec(num_samples=samples, image_size=32, sample_rate=8000, audio_seconds=0.5, shard_size=32)
    else:
        spec = SyntheticSpec(num_samples=samples, image_size=128, sample_rate=16000, audio_seconds=2.0, shard_size=128)
    build_synthetic(path, spec, progress=not smoke)


def run_case(args: argparse.Namespace, name: str, nproc: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [__file__, "--worker", name] + [a for a in sys.argv[1:] if a != "--all"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        return {"case": name, "error": f"exit {done.returncode} after {time.perf_counter() - started:.0f} s:\n{tail}"}
    return json.loads((Path(args.out) / name / "result.json").read_text())


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def tracking_gap(case: dict[str, Any], reference: dict[str, Any]) -> float | None:
    common = set(case.get("losses", {})) & set(reference.get("losses", {}))
    gaps = [abs(case["losses"][s] - reference["losses"][s]) / abs(reference["losses"][s]) for s in common]
    return max(gaps) if gaps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="also run every case on all visible GPUs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    parser.add_argument("--workers", type=int, default=6, help="loader workers per GPU")
    parser.add_argument("--objective", default="gram", choices=("pairwise", "gram", "pmrl"))
    parser.add_argument("--column-chunk", type=int, default=None, help="default: the preset's")
    parser.add_argument("--samples", type=int, default=1536, help="samples in the synthetic split")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--data", default=str(REPO / "runs/gpu-check/data"))
    parser.add_argument("--out", default=str(REPO / "runs/gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="the pipeline on CPU: tiny towers, fp32, no GPU figures")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.smoke:
        require_cuda()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run: no GPU figures)"
    peak = peak_tflops(device, args.peak_tflops) if torch.cuda.is_available() else None
    build_data(Path(args.data), args.samples, args.smoke)
    gpus = torch.cuda.device_count()
    counts = [1] + ([gpus] if args.all and gpus > 1 else [])
    rows = []
    for nproc in counts:
        results = {name: run_case(args, name, nproc) for name, *_ in CASES}
        reference = results["zero2-fp32"]
        for name, _, precision, _ in CASES:
            r = results[name]
            if "error" in r:
                rows.append(f"{name:<20}{nproc:>5}  FAILED: {r['error']}")
                continue
            mfu = r["flops_per_step"] / (r["step_ms"] / 1000) / (peak * 1e12 * nproc) if peak else None
            gap = tracking_gap(r, reference) if precision == "bf16" and "error" not in reference else None
            rows.append(
                f"{name:<20}{nproc:>5}{r['samples_per_s']:>11.0f}{r['step_ms']:>10.1f}"
                f"{'' if mfu is None else f'{100 * mfu:.1f}%':>8}{_cell(r['peak_mem_gib'], '.2f'):>9}"
                f"{100 * r['data_wait_share']:>10.1f}%{100 * r['calibrator_share']:>9.1f}%"
                f"{_cell(r['syncs_per_step'], '.1f'):>8}"
                f"{'' if gap is None else f'{100 * gap:.2f}%':>12}"
            )
    print(f"\n{device}, {args.objective}, batch {args.batch}/GPU, {args.steps} steps; peak {peak or '?'} TFLOP/s bf16")
    if args.smoke:
        print("smoke run: every case trains in fp32 on CPU with tiny towers; the figures say nothing of a GPU")
    header = f"{'case':<20}{'GPUs':>5}{'samples/s':>11}{'step ms':>10}{'MFU':>8}{'mem GiB':>9}"
    print(header + f"{'data wait':>11}{'calib.':>10}{'syncs':>8}{'vs fp32':>12}")
    print("\n".join(rows))
    failed = sum("FAILED" in row for row in rows)
    print(f"gpu_check: {len(rows) - failed}/{len(rows)} cases ran in {time.perf_counter() - started:.0f} s")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
