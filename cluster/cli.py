"""The `calmrl` command line.

calmrl data build --source synthetic|tuxpaint|folder|jsonl --out DIR [--input PATH] [--shard-size N]
calmrl train CONFIG [--nproc N] [--resume latest|TAG] [--init-from RUN_DIR[:TAG]] [--no-preflight] [--section.key=value ...]
calmrl eval RUN_DIR --data SPLIT_DIR [--checkpoint TAG] [--out DIR]
calmrl export RUN_DIR --out DIR [--checkpoint TAG] [--dtype fp32|bf16]
calmrl embed MODEL --input DIR|MANIFEST.jsonl|SPLIT|s3://... --out FILE.parquet [--complete]
calmrl launch slurm CONFIG --nodes N --gpus-per-node G [--partition P] [--time T] [--dry-run]
calmrl launch k8s CONFIG [--workers N] [--gpus-per-worker G] [--image IMAGE] [--out FILE] [--sweep SWEEP.yaml]
calmrl sweep SWEEP.yaml [--resume | --no-resume]
calmrl benchmark [--preset P] [--out DIR] [--seeds 0,1] [--rates 0.5,0.7] [--section.key=value ...]
calmrl search MODEL --index FILE --query "a red bird" [--modality image|text|audio] [--k 10] [--complete] [--html OUT.html] [--png OUT.png]"""

# The top of the import graph: this module may import every package; nothing
# imports it. Each command imports what it needs when it runs, so `calmrl --help`
# and the launchers stay light.
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def cmd_data_build(args: argparse.Namespace) -> int:
    import signal
    import tempfile
    import threading
    from pathlib import Path

    from data_pipeline.storage import StorageError, is_remote, upload_tree

    raised: list[BaseException] = []

    def stop(signum: int, frame: Any) -> None:
        # Ctrl-C and a scheduler's SIGTERM (preemption, time limit) become exceptions,
        # so the build removes its staging folder (and an upload its local copy)
        # instead of dying with them in place. Python prints and drops an exception
        # raised inside a finalizer (a __del__, a generator being collected), so the
        # signal is sent again a second later; by then it finds its exception being
        # handled (the cleanup running) and lets it be, or raises it again.
        if raised and sys.exc_info()[1] is raised[-1]:
            return
        raised.append(KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum))
        again = threading.Timer(1.0, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
        raise raised[-1]

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        if is_remote(args.out):
            # Build in a local temporary folder (removed on any exit), then upload
            # (shards first, each index last); `build` inside it is staged like any build.
            with tempfile.TemporaryDirectory(prefix="calmrl-build-") as staging:
                local = Path(staging) / "build"
                code = _build_local(args, local)
                if code == 0:
                    try:
                        upload_tree(local, args.out)
                    except StorageError as exc:
                        print(f"calmrl: upload error: {exc}", file=sys.stderr)
                        return 2
                    print(f"uploaded to {args.out}")
                return code
        return _build_local(args, Path(args.out))
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, not ours to restore
                signal.signal(signum, handler)


def _build_local(args: argparse.Namespace, out) -> int:
    from pathlib import Path

    from data_pipeline.sources import SOURCES, BuildOptions, SourceError, parse_missing, parse_split_fractions

    try:
        opts = BuildOptions(
            out=out,
            shard_size=args.shard_size,
            seed=args.seed,
            input=Path(args.input) if args.input else None,
            cache=Path(args.cache) if args.cache else None,
            split_fractions=parse_split_fractions(args.split_fractions) if args.split_fractions else None,
            skip_bad=args.skip_bad,
            num_samples=args.num_samples,
            image_size=args.image_size,
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

    if args.init_from:  # the flags are overrides: they reach every rank and the run's config.yaml
        overrides = [*overrides, f"--train.init_from={args.init_from}"]
    if args.init_calibrator:
        overrides = [*overrides, "--train.init_calibrator=true"]
    cfg = load_config(args.config, overrides)  # fail here, before any process starts
    if "RANK" not in os.environ and not args.no_preflight:
        # The launching (or only) process checks data, out_dir, resume tag, ports and
        # init_from before torchrun starts the ranks: all problems at once, one line each.
        from cluster.preflight import PreflightError, preflight

        try:
            report = preflight(cfg, args.nproc or 1, args.resume)
        except PreflightError as exc:
            count = len(exc.problems)
            print(f"calmrl: preflight found {count} problem{'s' if count != 1 else ''}:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            print("(skip these checks with --no-preflight)", file=sys.stderr)
            return 2
        print(report.summary, flush=True)
    elif cfg.train.init_from:
        from pretrain.init_from import parse_init_from

        parse_init_from(cfg.train.init_from)  # a missing source run fails here too
    if args.nproc and "RANK" not in os.environ:
        from cluster.launch_local import launch_local

        forward = [args.config, *overrides] + (["--resume", args.resume] if args.resume else [])
        return launch_local(args.nproc, forward, Path(cfg.train.out_dir), cfg.train.preempt_grace_s)
    from pretrain.guard import EXIT_DIVERGED, EXIT_PREEMPTED, STOP_REQUEST, Diverged

    STOP_REQUEST.install()  # from here a SIGTERM/SIGUSR1 stops after the next step, with a checkpoint
    from pretrain.runtime import configure_runtime

    configure_runtime()
    from cluster.metrics import MetricsExporter
    from pretrain.distributed import rank
    from pretrain.runtime import init_distributed, local_rank
    from pretrain.sinks import ProgressBar, StepSink
    from pretrain.trainer import build_trainer

    init_distributed(cfg.train.collective_timeout_s)
    sinks: list[StepSink] = [ProgressBar(cfg.train.steps)] if rank() == 0 else []
    if cfg.metrics.enabled:
        sinks.append(MetricsExporter(cfg.metrics, rank(), local_rank()))
    trainer = build_trainer(cfg, sinks=sinks)
    try:
        history = trainer.fit(resume=args.resume)
    except Diverged as exc:
        print(f"calmrl: training diverged: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:
        peer = _peer_failure(exc)
        if peer:
            behind = trainer.guard.laggards() or "a peer rank died or stalled"
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            print(f"calmrl: rank {rank()}: {peer} at step {trainer.step + 1}: {behind} ({first})", file=sys.stderr)
        raise
    if trainer.stopped_by:
        checkpoint = trainer.last_good_checkpoint()
        if trainer.rank == 0:
            trainer.run_dir.write_stopped(trainer.step, trainer.stopped_by, checkpoint)
            print(f"stopped by {trainer.stopped_by} after step {trainer.step}: checkpoint {checkpoint}")
        return EXIT_PREEMPTED
    if trainer.rank == 0 and history:
        last = history[-1]
        mean_sps = sum(h.samples_per_s for h in history) / len(history)
        first_loss = f"{history[0].loss:.4f}" if history[0].loss is not None else "?"
        last_loss = f"{last.loss:.4f}" if last.loss is not None else "?"
        skipped = f", {last.skipped_total} skipped steps" if last.skipped_total else ""
        print(
            f"trained to step {trainer.step}/{cfg.train.steps}: loss {first_loss} -> {last_loss}, "
            f"{mean_sps:.1f} samples/s{skipped}, checkpoint {trainer.out_dir / 'checkpoints'}"
        )
    return 0


def _peer_failure(exc: BaseException) -> str:
    """What a collective's error says of the peers ('' for any other error): gloo and NCCL
    report a wait past the process group's timeout, or a connection a dead peer closed."""
    text = f"{type(exc).__name__}: {exc}"
    if "Timed out" in text or "timed out" in text or "Timeout" in type(exc).__name__:
        return "a collective waited past train.collective_timeout_s"
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return "a peer rank closed its connection"
    return ""


def cmd_eval(args: argparse.Namespace) -> int:
    from pretrain.runtime import configure_runtime

    configure_runtime()
    from evals.evaluate import evaluate_run
    from evals.report import markdown_table, write_results
    from pretrain.run_dir import RunDir

    results = evaluate_run(args.run_dir, args.data, args.checkpoint)
    path = write_results(results, args.out or RunDir(args.run_dir).eval_dir)
    print(markdown_table(results))
    n = results["num_complete"]
    pairs = results.get("pair_retrieval", {})
    it = ""
    if "image->text" in pairs and "text->image" in pairs:
        m, back = pairs["image->text"], pairs["text->image"]
        it = f"; image->text / text->image R@1 {m['R@1']:.3f} / {back['R@1']:.3f} over {m['n']} pairs (chance {m['chance_R@1']:.3f})"
    print(
        f"eval of {results['checkpoint']} on {n} complete instances: mean R@1 {results['mean_R@1']:.3f} "
        f"(chance {1 / max(n, 1):.3f}){it} (written to {path})"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.export import export_run, read_manifest
    from pretrain.runtime import configure_runtime

    configure_runtime()
    out = export_run(args.run_dir, args.out, args.checkpoint, args.dtype)
    manifest = read_manifest(out, verify=False)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(
        f"exported {manifest['checkpoint']} of {args.run_dir} to {out} ({manifest['dtype']}, {size:.1f} MiB, "
        f"completion: {manifest['completion']}); load it with pretrain.encoder.Encoder.load({str(out)!r})"
    )
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from evals.embed_inputs import embed_inputs
    from pretrain.runtime import configure_runtime

    configure_runtime()
    report = embed_inputs(
        args.model, args.input, args.out, args.complete, args.batch_size, args.device, workers=args.workers
    )
    for key, why in list(report.bad.items())[:20]:
        print(f"bad record {key}: {why}", file=sys.stderr)
    if len(report.bad) > 20:
        print(f"... and {len(report.bad) - 20} more (all listed in the file's metadata, 'bad')", file=sys.stderr)
    print(report.summary)
    return 0


def add_use_parsers(sub: Any) -> None:
    """export and embed: using a trained model."""
    ex = sub.add_parser(
        "export",
        help="write a run's checkpoint as a folder that loads without DeepSpeed (safetensors + config + tokenizer)",
        description="Full weights of the towers and heads (safetensors), the resolved config, the tokenizer and "
        "the calibrator state, in one folder (pretrain/export.py). Example: "
        "calmrl export runs/demo --out runs/demo/export",
    )
    ex.add_argument("run_dir", help="the run folder (train.out_dir)")
    ex.add_argument("--out", required=True, help="the export folder (replaced whole if it is an export)")
    ex.add_argument("--checkpoint", default="latest", help="checkpoint tag (default latest)")
    ex.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights' dtype (default fp32)")
    em = sub.add_parser(
        "embed",
        help="embed every record of a folder, a manifest or a shard split into a Parquet file",
        description="One row per record and modality: key, modality, observed/imputed, vector (evals/vector_file.py). "
        "Example: calmrl embed runs/demo --input data/tuxpaint/test --out runs/demo/test.parquet --complete",
    )
    em.add_argument("model", help="a run folder or an export")
    em.add_argument(
        "--input",
        required=True,
        help="a folder (files sharing a stem form a record), a JSONL manifest, or a shard split (index.json; local or s3://)",
    )
    em.add_argument("--out", required=True, help="the Parquet file to write (written whole)")
    em.add_argument(
        "--complete", action="store_true", help="also write the calibrator's imputations of what records lack"
    )
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    em.add_argument(
        "--workers", type=int, default=1, help="loader processes that decode while the model encodes (0: none)"
    )


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep",
        help="run a Ray Tune sweep of distributed training runs",
        description="Run (or resume) the sweep a SWEEP.yaml describes; see cluster/sweep/__init__.py.",
    )
    p.add_argument("sweep_file")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const="always",
        default="auto",
        help="resume the sweep in out_dir (an error if there is none); the default resumes "
        "when there is one and starts a new sweep otherwise",
    )
    group.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const="never",
        help="never resume: an error if out_dir already holds a sweep",
    )
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    from cluster.sweep.report import summary_line
    from cluster.sweep.tuner import run_sweep

    sweep, rows, paths = run_sweep(args.sweep_file, args.resume)
    print(summary_line(rows, sweep, paths))
    return 1 if any(r["status"] == "error" for r in rows) else 0


def add_benchmark_parser(sub: Any) -> None:
    import evals.benchmark
    from evals.benchmark.presets import METHODS, OBJECTIVES, PRESETS

    p = sub.add_parser(
        "benchmark",
        help="the missing-modality benchmark: stage-1 pretraining, then objectives x methods x missing rates x seeds",
        description=(evals.benchmark.__doc__ or "")
        + "\nExtra --section.key=value arguments override every stage-2 run's config "
        "(ablations, e.g. --calibration.latent_dim=8).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="full",
        choices=sorted(PRESETS),
        help="full (factors and Tux Paint), factors, tuxpaint, or quick (the test suite's)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/benchmark-PRESET); reruns resume")
    p.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="where a data set's shards are (e.g. factors=/tmp/f); built there when missing",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="ROOT",
        help="any data `calmrl data build` made (ROOT/train, val, test; local or s3://), with --config",
    )
    p.add_argument("--config", default=None, help="with --data: the stage-1 config (towers, decoding, steps)")
    p.add_argument(
        "--stage2-config", default=None, help="with --data: the stage-2 config (default configs/benchmark/stage2.yaml)"
    )
    p.add_argument(
        "--cache",
        default=None,
        help="where frozen-tower outputs are cached "
        "(default $CALMRL_CACHE/benchmark or ~/.cache/calmrl/benchmark); named by content",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--rates", default=None, help="comma-separated imposed missing rates (default: the preset's)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--objectives", default=None, help=f"comma-separated subset of {','.join(OBJECTIVES)}")
    p.add_argument(
        "--tuned",
        default=None,
        help="YAML of values chosen on the validation split, per data set, objective and method "
        "(default configs/benchmark/tuned.yaml; '' for none)",
    )
    p.add_argument(
        "--evaluate",
        default="test",
        choices=("test", "val"),
        help="the split that scores the runs (val: for choosing hyperparameters)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="first choose the hyperparameters on the validation split (Ray Tune sweeps, the same "
        "budget per method; see cluster/sweep/benchmark.py), then run the benchmark with them",
    )
    p.add_argument("--tune-trials", type=int, default=8, help="with --tune: trials per data set, objective and method")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a small shared machine more threads wait on each other)",
    )


def cmd_benchmark(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """`overrides` (--section.key=value) apply to every stage-2 run, after the preset's own."""
    from evals.benchmark.presets import PRESETS, customise
    from evals.benchmark.runs import run_benchmark
    from pretrain.runtime import configure_runtime

    configure_runtime(threads=args.threads)
    preset = customise(
        PRESETS[args.preset],
        roots=args.data_root,
        data=args.data,
        stage1=args.config,
        stage2=args.stage2_config,
        seeds=args.seeds,
        rates=args.rates,
        methods=args.methods,
        objectives=args.objectives,
        tuned=args.tuned,
        overrides=overrides or [],
    )
    out = Path(args.out or f"runs/benchmark-{args.preset if not args.data else Path(args.data).name}")
    if args.tune:
        from dataclasses import replace

        from cluster.sweep.benchmark import tune_benchmark

        tuned = tune_benchmark(args.preset, preset, out / "tuning", args.tune_trials, cache=args.cache or "")
        preset = replace(preset, tuned=str(tuned))
    run_benchmark(preset, out, Path(args.cache) if args.cache else None, evaluation=args.evaluate)
    return 0


SEARCH_EXAMPLES = """examples:
  calmrl search runs/demo --index emb.parquet --query "a red bird"            # text query, image rows
  calmrl search runs/demo --index emb.parquet --query bird.png --modality text  # an image file as the query
  calmrl search export/ --index emb.parquet --query-image bird.png --query "a bird" --complete --html hits.html

The query: --query is text, unless it names an existing file, which is then read by its suffix
(image: .png .jpg .jpeg .gif .bmp .webp .tif .tiff; audio: .wav .flac .ogg .mp3 .m4a .aiff .aif;
.txt: its text); --query-image / --query-audio name files. They combine (an image and its caption).
The query vector: the query's own vector of --modality when it has that modality; else, without
--complete, its own vector of what it has (the mean if several), compared by cosine across
modalities; with --complete, the calibrator's imputation of --modality from what it has.
The index (exact below --exact-below rows, else approximate IVF with nprobe set by measured
recall) is saved beside FILE (FILE.MODALITY.faiss + .json) and reused while FILE is unchanged."""


def add_search_parser(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="nearest neighbours of a query (text, image, audio) in an embeddings file (faiss)",
        description="Search the rows of one modality of an embeddings file (`calmrl embed` writes it) "
        "for the nearest neighbours of a query encoded by MODEL.",
        epilog=SEARCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="an export folder (calmrl export) or a run folder")
    p.add_argument("--index", required=True, metavar="FILE", help="the embeddings file (Parquet) to search")
    p.add_argument("--query", default=None, help="text, or a path to an image, audio or .txt file (by suffix)")
    p.add_argument("--query-image", default=None, metavar="PATH", help="an image file as (part of) the query")
    p.add_argument("--query-audio", default=None, metavar="PATH", help="an audio file as (part of) the query")
    p.add_argument(
        "--modality", default="image", choices=("image", "text", "audio"), help="rows to search (default image)"
    )
    p.add_argument("--k", type=int, default=10, help="neighbours to show (default 10)")
    p.add_argument(
        "--complete",
        action="store_true",
        help="search with the calibrator's imputed --modality vector of the query (needs a model with one)",
    )
    p.add_argument(
        "--include-imputed", action="store_true", help="also search the rows the calibrator imputed (marked)"
    )
    p.add_argument("--html", default=None, metavar="OUT.html", help="write a page of the hits")
    p.add_argument("--png", default=None, metavar="OUT.png", help="write a grid of the hits' thumbnails")
    p.add_argument("--exact-below", type=int, default=50_000, help="exact search below this many rows (default 50000)")
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="approximate index: the recall@10 against exact that nprobe is raised to reach (default 0.95)",
    )
    p.add_argument("--rebuild", action="store_true", help="build the index again even when the saved one is fresh")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="faiss threads (default: every core available; on a machine shared with other work 1 can be faster)",
    )


def cmd_search(args: argparse.Namespace) -> int:
    from evals.search import SearchError, open_index, parse_query, query_vector, search, set_threads, text_table
    from evals.vector_file import VectorFileError, file_meta

    def fail(message: str) -> int:
        print(f"calmrl search: {message}", file=sys.stderr)
        return 2

    try:
        if args.k < 1:
            raise SearchError(f"--k {args.k}: ask for at least one neighbour")
        query = parse_query(args.query, args.query_image, args.query_audio)
        meta = file_meta(args.index)
        set_threads(args.threads)
        index = open_index(
            args.index,
            args.modality,
            include_imputed=args.include_imputed,
            exact_below=args.exact_below,
            target_recall=args.target_recall,
            rebuild=args.rebuild,
            log=lambda line: print(line, file=sys.stderr),
        )
        from pretrain.runtime import configure_runtime

        configure_runtime()
        from pretrain.encoder import Encoder

        try:
            enc = Encoder.load(args.model, device="cpu")
        except ValueError as exc:  # ModelLoadError: neither a run folder nor an export
            raise SearchError(str(exc)) from exc
        if int(enc.dim) != int(meta["dim"]):
            raise SearchError(
                f"{args.model} embeds in {enc.dim} dimensions, {args.index} holds {meta['dim']}: "
                f"search with the model that wrote it ({meta.get('model', 'named in its metadata')})"
            )
        if args.complete and not enc.has_calibrator:
            raise SearchError(
                f"--complete: {args.model} has no calibrator to impute {args.modality} with; "
                "drop --complete (cross-modal cosine) or use a model trained with the calibrator"
            )
        try:
            out = enc.encode(
                images=[str(query.image)] if query.image is not None else None,
                texts=[query.text] if query.text is not None else None,
                audio=[str(query.audio)] if query.audio is not None else None,
                complete=args.complete,
            )
        except (OSError, ValueError) as exc:
            raise SearchError(f"the query could not be encoded: {exc}") from exc
        imputed = out.imputed[0].tolist() if args.complete and out.imputed is not None else None
        emb = {m: v[0] for m, v in out.emb.items()}
        vector, how = query_vector(emb, out.observed[0].tolist(), imputed, args.modality, args.complete)
        scores, rows = search(index, vector[None, :], args.k)
    except (SearchError, VectorFileError) as exc:
        return fail(str(exc))
    hits = index.hits(scores[0], rows[0])
    header = f"{index.info.describe()}\nquery: {query.describe()} -> {how}"
    print(text_table(hits, header))
    if args.html:
        from evals.search import write_html

        print(f"wrote {write_html(args.html, hits, header, query.describe())}")
    if args.png:
        from evals.search import write_png

        print(f"wrote {write_png(args.png, hits, query.describe())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calmrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build shard sets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="write WebDataset shards (train/val/test) and an index")
    from data_pipeline.sources import SOURCES  # the registry only: builders load on use

    build.add_argument(
        "--source",
        required=True,
        choices=sorted(SOURCES),
        help="synthetic (generated shapes), factors (generated: continuous latent factors, partial noisy views), "
        "tuxpaint (the built-in real data set, a Debian package), "
        "folder (NAME.png/.txt/.wav files), jsonl (a manifest)",
    )
    build.add_argument("--out", required=True, help="output folder (train/, val/, test/, tokenizer.json)")
    build.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    build.add_argument("--input", default=None, help="folder (--source folder) or manifest (--source jsonl)")
    build.add_argument(
        "--cache", default=None, help="download cache for tuxpaint (default $CALMRL_CACHE or ~/.cache/calmrl)"
    )
    build.add_argument(
        "--seed", type=int, default=0, help="synthetic: generator seed; other sources: salt of the split hash (0: none)"
    )
    build.add_argument(
        "--split-fractions",
        default=None,
        help="train,val,test fractions, by hash of each record's key (default 0.8,0.1,0.1)",
    )
    build.add_argument(
        "--skip-bad", action="store_true", help="count and skip records whose files do not decode, instead of stopping"
    )
    build.add_argument("--num-samples", type=int, default=None, help="synthetic / factors only (default 2000 / 8000)")
    build.add_argument("--image-size", type=int, default=None, help="synthetic / factors only (default 32)")
    build.add_argument(
        "--missing",
        default=None,
        help="synthetic only: image,text,audio missing rates (default 0.2,0.1,0.3; 0,0,0: complete)",
    )

    train = sub.add_parser(
        "train",
        help="train (under torchrun, or spawn it with --nproc)",
        description="Extra --section.key=value arguments override the config.",
    )
    train.add_argument("config")
    train.add_argument("--nproc", type=int, default=0, help="spawn torchrun with this many local processes")
    train.add_argument(
        "--resume",
        default=None,
        help="'latest', a checkpoint folder name, or 'auto' (latest if there is one, else start)",
    )
    train.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR[:TAG]",
        help="continued training: start from another run's weights (any ZeRO stage), fresh optimizer, "
        "schedule and data position (= --train.init_from; --train.init_keys='[heads.*]' loads a subset)",
    )
    train.add_argument(
        "--init-calibrator", action="store_true", help="with --init-from: also take the source's calibrator state"
    )
    train.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the checks of data, out_dir, --resume, metrics ports and init_from that the launching "
        "process runs before torchrun starts (cluster/preflight.py)",
    )

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    ev.add_argument("run_dir")
    ev.add_argument("--data", required=True, help="split folder (holding index.json)")
    ev.add_argument("--checkpoint", default="latest")
    ev.add_argument("--out", default=None)
    add_use_parsers(sub)
    from cluster.k8s import add_k8s_parser
    from cluster.slurm import add_launch_parser

    launch = add_launch_parser(sub)
    add_k8s_parser(launch)
    add_sweep_parser(sub)
    add_benchmark_parser(sub)
    add_search_parser(sub)
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
            return cmd_benchmark(args, extra)
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        if args.command == "data":
            return cmd_data_build(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "search":
            return cmd_search(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "embed":
            return cmd_embed(args)
        return cmd_eval(args)
    except ConfigError as exc:
        print(f"calmrl: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A store that does not answer, a split that is not there, a damaged checkpoint: the
        # message names the URL or file and the fix; the traceback adds nothing for a user.
        from data_pipeline.errors import DataError
        from data_pipeline.storage import StorageError
        from pretrain.checkpoint import CheckpointError

        if args.command in ("export", "embed", "search") and "RANK" not in os.environ:
            # using a model: a wrong path, a model of the wrong kind, an unusable input are one line
            from evals.embed_inputs import EmbedInputError
            from evals.vector_file import VectorFileError
            from pretrain.encoder import InputError, ModelLoadError
            from pretrain.export import ExportError

            usage = (EmbedInputError, VectorFileError, InputError, ModelLoadError, ExportError, ValueError, OSError)
            if isinstance(exc, (*usage, StorageError, DataError, CheckpointError)):
                print(f"calmrl {args.command}: {exc}", file=sys.stderr)
                return 2
        if "RANK" in os.environ or not isinstance(exc, StorageError | DataError | CheckpointError):
            raise  # in a rank, the launcher's summary reports it, with the trace in the rank's log
        print(f"calmrl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
