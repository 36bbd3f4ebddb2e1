"""The `calmrl` command line.

    calmrl data build --source synthetic|tuxpaint|folder|jsonl --out DIR [--input PATH] [--shard-size N]
    calmrl train CONFIG [--nproc N] [--resume latest|TAG] [--section.key=value ...]
    calmrl eval RUN_DIR --data SPLIT_DIR [--checkpoint TAG] [--out DIR]
    calmrl launch slurm CONFIG --nodes N --gpus-per-node G [--partition P] [--time T] [--dry-run]
    calmrl launch k8s CONFIG [--workers N] [--gpus-per-worker G] [--image IMAGE] [--out FILE] [--sweep SWEEP.yaml]
    calmrl sweep SWEEP.yaml [--resume | --no-resume]
"""
from __future__ import annotations

import argparse
import os
import sys


def _cpu_defaults() -> None:
    # Without a GPU, DeepSpeed must use its CPU accelerator (gloo); set before import.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cmd_data_build(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from data_pipeline.storage import StorageError, is_remote, upload_tree

    if is_remote(args.out):
        # Build in a local staging folder, then upload (shards first, each index last).
        with tempfile.TemporaryDirectory(prefix="calmrl-build-") as staging:
            code = _build_local(args, Path(staging))
            if code == 0:
                try:
                    upload_tree(staging, args.out)
                except StorageError as exc:
                    print(f"calmrl: upload error: {exc}", file=sys.stderr)
                    return 2
                print(f"uploaded to {args.out}")
            return code
    return _build_local(args, Path(args.out))


def _build_local(args: argparse.Namespace, out) -> int:
    from pathlib import Path

    from data_pipeline.sources import SOURCES, BuildOptions, SourceError, parse_missing, parse_split_fractions

    try:
        opts = BuildOptions(
            out=out, shard_size=args.shard_size, seed=args.seed,
            input=Path(args.input) if args.input else None, cache=Path(args.cache) if args.cache else None,
            split_fractions=parse_split_fractions(args.split_fractions) if args.split_fractions else None,
            skip_bad=args.skip_bad, num_samples=args.num_samples, image_size=args.image_size,
            missing=parse_missing(args.missing) if args.missing else None,
        )
        report = SOURCES[args.source](opts)
    except SourceError as exc:
        print(f"calmrl: data error: {exc}", file=sys.stderr)
        return 2
    print(report.summary)
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, overrides)  # fail here, before any process starts
    if args.nproc and "RANK" not in os.environ:
        from cluster.launch_local import launch_local

        forward = [args.config, *overrides] + (["--resume", args.resume] if args.resume else [])
        return launch_local(args.nproc, forward)
    _cpu_defaults()
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    history = trainer.fit(resume=args.resume)
    if trainer.rank == 0 and history:
        last = history[-1]
        mean_sps = sum(h.samples_per_s for h in history) / len(history)
        print(f"trained to step {trainer.step}/{cfg.train.steps}: loss {history[0].loss:.4f} -> {last.loss:.4f}, "
              f"{mean_sps:.1f} samples/s, checkpoint {trainer.out_dir / 'checkpoints'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _cpu_defaults()
    from evals.evaluate import evaluate_run, markdown_table, write_results

    results = evaluate_run(args.run_dir, args.data, args.checkpoint)
    path = write_results(results, args.out or os.path.join(args.run_dir, "eval"))
    print(markdown_table(results))
    print(f"eval of {results['checkpoint']} on {results['num_complete']} complete instances: "
          f"mean R@1 {results['mean_R@1']:.3f} (written to {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calmrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build shard sets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="write WebDataset shards (train/val/test) and an index")
    from data_pipeline.sources import SOURCES  # the registry only: builders load on use

    build.add_argument("--source", required=True, choices=sorted(SOURCES),
                       help="synthetic (generated), tuxpaint (the built-in real data set, a Debian package), "
                            "folder (NAME.png/.txt/.wav files), jsonl (a manifest)")
    build.add_argument("--out", required=True, help="output folder (train/, val/, test/, tokenizer.json)")
    build.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    build.add_argument("--input", default=None, help="folder (--source folder) or manifest (--source jsonl)")
    build.add_argument("--cache", default=None,
                       help="download cache for tuxpaint (default $CALMRL_CACHE or ~/.cache/calmrl)")
    build.add_argument("--seed", type=int, default=0,
                       help="synthetic: generator seed; other sources: salt of the split hash (0: none)")
    build.add_argument("--split-fractions", default=None,
                       help="train,val,test fractions, by hash of each record's key (default 0.8,0.1,0.1)")
    build.add_argument("--skip-bad", action="store_true",
                       help="count and skip records whose files do not decode, instead of stopping")
    build.add_argument("--num-samples", type=int, default=None, help="synthetic only (default 2000)")
    build.add_argument("--image-size", type=int, default=None, help="synthetic only (default 32)")
    build.add_argument("--missing", default=None,
                       help="synthetic only: image,text,audio missing rates (default 0.2,0.1,0.3; 0,0,0: complete)")

    train = sub.add_parser("train", help="train (under torchrun, or spawn it with --nproc)",
                           description="Extra --section.key=value arguments override the config.")
    train.add_argument("config")
    train.add_argument("--nproc", type=int, default=0, help="spawn torchrun with this many local processes")
    train.add_argument("--resume", default=None,
                       help="'latest', a checkpoint folder name, or 'auto' (latest if there is one, else start)")

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    ev.add_argument("run_dir")
    ev.add_argument("--data", required=True, help="split folder (holding index.json)")
    ev.add_argument("--checkpoint", default="latest")
    ev.add_argument("--out", default=None)
    from cluster.k8s import add_k8s_parser
    from cluster.slurm import add_launch_parser
    from cluster.sweep import add_sweep_parser

    launch = add_launch_parser(sub)
    add_k8s_parser(launch)
    add_sweep_parser(sub)
    from evals.benchmark import add_benchmark_parser

    add_benchmark_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from pretrain.config import ConfigError

    try:
        if args.command == "launch" and args.launch_command == "slurm":
            from cluster.slurm import cmd_launch_slurm

            return cmd_launch_slurm(args, extra)
        if args.command == "launch" and args.launch_command == "k8s":
            from cluster.k8s import cmd_launch_k8s

            return cmd_launch_k8s(args, extra)
        if args.command == "train":
            unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
            if unknown:
                parser.error(f"unrecognised arguments: {' '.join(unknown)}")
            return cmd_train(args, extra)
        if args.command == "benchmark":
            unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
            if unknown:
                parser.error(f"unrecognised arguments: {' '.join(unknown)}")
            _cpu_defaults()
            from evals.benchmark import cmd_benchmark

            return cmd_benchmark(args, extra)
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        if args.command == "data":
            return cmd_data_build(args)
        if args.command == "sweep":
            from cluster.sweep import cmd_sweep

            return cmd_sweep(args)
        return cmd_eval(args)
    except ConfigError as exc:
        print(f"calmrl: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
