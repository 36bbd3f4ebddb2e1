"""Checks a training launch can start, run in the launching process before torchrun.

Problems a cluster job otherwise meets only after torchrun has started every rank
(tens of seconds, a traceback per rank) are found here in about a second, all
at once, each as one line naming the file, port or setting and the fix:

- the split (`data.shards`): its `index.json` parses and has the expected
  fields, every shard it lists exists (local: one listing, then the first tar
  header of each shard; remote: one listing), its tokenizer loads;
- enough shards for the readers (ranks x loader workers) unless `data.resampled`;
- `train.out_dir` (or its nearest existing parent) takes a real write, and its
  filesystem has room for one checkpoint of the model (counted on the meta
  device; skipped with a note for pretrained towers, which load their weights);
- `--resume`: the tag resolves in the run's checkpoints to an
  intact checkpoint (`auto` without a checkpoint starts fresh; another number of
  ranks is resharded);
- `metrics.port + local rank` is free on `metrics.addr` for every local rank;
- `train.init_from` names a run folder whose checkpoint tag resolves;
- every `model.<modality>.name` is a registered tower.

No DeepSpeed import and no real model build: `calmrl train` calls `preflight`
and prints its one-line summary, or the problems and exit code 2.
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.shards import TAR_BLOCK, read_index
from data_pipeline.storage import StorageError, is_remote, join, list_names
from pretrain.config import Config, ConfigError, MetricsConfig

LISTED = 5  # names shown in one problem line before "... and N more"


class PreflightError(RuntimeError):
    """Everything the preflight found wrong, one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"preflight found {count}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class PreflightReport:
    parts: list[str] = field(default_factory=list)  # one phrase per check that passed
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    seconds: float = 0.0

    @property
    def summary(self) -> str:
        line = "preflight: " + ", ".join(self.parts) + f" ({self.seconds:.1f} s)"
        return line + "".join(f"; {note}" for note in self.notes)


def preflight(cfg: Config, nproc: int, resume: str | None) -> PreflightReport:
    """Run every check; raise PreflightError listing all problems, else return the report.
    `nproc`: the processes this launch starts on this machine (1 without --nproc)."""
    start = time.perf_counter()
    nproc = max(nproc, 1)
    report = PreflightReport()
    problems: list[str] = []
    vocab = _check_split(cfg, nproc, problems, report)
    expected = _checkpoint_bytes(cfg, vocab, problems, report)
    try:
        report.parts.append(_check_out_dir(Path(cfg.train.out_dir), expected))
    except PreflightError as exc:
        problems += exc.problems
    _check_resume(cfg, nproc, resume, problems, report)
    _check_metrics_ports(cfg.metrics, nproc, problems, report)
    _check_init_from(cfg, problems, report)
    report.seconds = time.perf_counter() - start
    if problems:
        raise PreflightError(problems)
    return report


# -- the split -----------------------------------------------------------------
def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" ... and {len(names) - LISTED} more" if len(names) > LISTED else "")


def _tar_header_problem(path: str) -> str:
    """Why a local shard cannot be read as a tar ('' when its first header is sound)."""
    try:
        with open(path, "rb") as f:
            block = f.read(TAR_BLOCK)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not block:
        return "is empty"
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return f"does not start with a tar header ({exc})"
    return ""


def _check_split(cfg: Config, nproc: int, problems: list[str], report: PreflightReport) -> int | None:
    """The split's index, shards, reader count and tokenizer; returns the vocabulary size
    (None when the split has problems)."""
    root = cfg.data.shards
    if not root:
        problems.append("data.shards is not set: point it at a split folder holding index.json (--data.shards=DIR)")
        return None
    try:
        index = read_index(root)
    except (FileNotFoundError, DataError, StorageError) as exc:
        problems.append(f"data.shards: {exc}")
        return None
    found = len(problems)
    names = [s["name"] for s in index["shards"]]
    try:
        present = list_names(root)
    except StorageError as exc:
        problems.append(f"data.shards: {exc}")
        return None
    missing = [n for n in names if n not in present]
    if missing:
        problems.append(
            f"data.shards: {len(missing)} of the {len(names)} shards listed in {join(root, 'index.json')} "
            f"{'is' if len(missing) == 1 else 'are'} missing: {_names(missing)}; rebuild the split or restore the shards"
        )
    if not is_remote(root):  # a remote listing is enough; locally the first header is one small read
        bad = [(n, why) for n in names if n in present and (why := _tar_header_problem(join(root, n)))]
        if bad:
            problems.append(
                f"data.shards: {len(bad)} shards cannot be read as tar files: "
                + _names([f"{join(root, n)} {why}" for n, why in bad])
                + "; rebuild the split or restore the shards"
            )
    workers = max(cfg.data.num_workers, 1)
    readers = nproc * workers
    if len(names) < readers and not cfg.data.resampled:
        problems.append(
            f"data.shards: {root} has {len(names)} shards, fewer than the {readers} readers "
            f"({nproc} ranks x {workers} workers); rebuild it with a smaller --shard-size "
            f"(e.g. {max(int(index['num_samples']) // readers, 1)}), lower data.num_workers, or set data.resampled=true"
        )
    if len(problems) > found:
        return None
    from data_pipeline.split import vocab_size

    try:
        vocab = vocab_size(cfg.data)
    except Exception as exc:  # a tokenizer file that is missing or not a tokenizer: any error of the loader
        problems.append(f"data.tokenizer: the tokenizer of {root} does not load ({exc}); rebuild the split or set it")
        return None
    mode = " (resampled)" if cfg.data.resampled else ""
    ranks, each = f"{nproc} rank{'s' if nproc > 1 else ''}", f"{workers} worker{'s' if workers > 1 else ''}"
    report.parts.append(f"{len(names)} shards ({int(index['num_samples']):,} samples){mode} for {ranks} x {each}")
    return vocab


# -- out_dir and the size of a checkpoint ------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _checkpoint_bytes(cfg: Config, vocab: int | None, problems: list[str], report: PreflightReport) -> int | None:
    """About one checkpoint's bytes: every weight at the training precision, plus fp32
    master weight and two Adam moments for each trainable one (ZeRO shards sum to
    that), counted on the meta device (about a second: meta-tensor init imports
    torch._dynamo). None (with a note) when it cannot be cheap; a tower name that
    is not registered is a problem."""
    import pretrain.towers  # noqa: F401  (registers the built-in and pretrained towers)
    from data_pipeline.contract import MODALITIES
    from pretrain.registry import TOWERS

    towers = {m: getattr(cfg.model, m).name for m in MODALITIES}
    for m, name in towers.items():
        if (m, name) not in TOWERS:
            known = ", ".join(sorted(n for (k, n) in TOWERS if k == m))
            problems.append(f"model.{m}.name: no {m} tower named '{name}'; registered: {known}")
    loaded = [
        f"{m}: {n}" for m, n in towers.items() if getattr(TOWERS.get((m, n)), "__module__", "") != "pretrain.towers"
    ]
    if vocab is None or any(p.startswith("model.") for p in problems):
        return None
    if loaded:
        report.notes.append(f"checkpoint size not estimated ({', '.join(loaded)} would load weights to be counted)")
        return None
    import torch

    from pretrain.model import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg, vocab)
    except Exception as exc:  # a tower that cannot be built on the meta device: the ranks build it for real
        report.notes.append(f"checkpoint size not estimated (the model does not build on the meta device: {exc})")
        return None
    params = list(model.parameters())
    weight = 2 if cfg.train.precision == "bf16" else 4
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return total * weight + trainable * 12


def _check_out_dir(path: Path, expected_bytes: int | None) -> str:
    """`path` (or the nearest folder above it that exists) takes a real write, and
    its filesystem has `expected_bytes` free. Returns the summary phrase; raises
    PreflightError. Nothing is created: the run makes the folder itself."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "set --train.out_dir to a writable folder or fix its permissions"
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, a file"
        raise PreflightError([f"train.out_dir {path} {where}, not a folder; {fix}"])
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".calmrl-preflight-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        above = "" if existing == path else f" (it does not exist yet; {existing} is the folder above it that does)"
        raise PreflightError(
            [
                f"train.out_dir {path} is not writable: writing in {existing} failed ({exc.strerror or exc}){above}; {fix}"
            ]
        ) from exc
    free = shutil.disk_usage(existing).free
    if expected_bytes is not None and free < expected_bytes:
        raise PreflightError(
            [
                f"train.out_dir {path}: {_gib(free)} free on its filesystem, less than one checkpoint "
                f"(about {_gib(expected_bytes)}); free space or set --train.out_dir on a larger disk"
            ]
        )
    need = f", a checkpoint ~{_gib(expected_bytes)}" if expected_bytes is not None else ""
    return f"out_dir {path} writable ({_gib(free)} free{need})"


# -- resume ----------------------------------------------------------------------
def _check_resume(cfg: Config, nproc: int, resume: str | None, problems: list[str], report: PreflightReport) -> None:
    """The tag resolves to an intact checkpoint, as the ranks will resolve it (a damaged
    `latest` falls back to the newest intact one: said in a note). A checkpoint of
    another number of ranks is resumed through DeepSpeed's universal checkpoint."""
    if not resume:
        return
    import warnings

    from pretrain.checkpoint import LATEST, Checkpointer, CheckpointError
    from pretrain.run_dir import RunDir

    run = RunDir(cfg.train.out_dir)
    if resume == "auto" and not run.has_checkpoint():
        report.parts.append("resume auto: no checkpoint, starts fresh")
        return
    tag = LATEST if resume == "auto" else resume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            chosen = run.checkpointer().resolve(tag)
        except CheckpointError as exc:
            fresh = "" if run.has_checkpoint() else "; drop --resume (or use --resume auto) to start fresh"
            problems.append(f"--resume {resume}: {exc}{fresh}")
            return
    report.notes.extend(str(w.message) for w in caught)
    folder = run.checkpoints / chosen
    ranks = len(list(folder.glob(Checkpointer.rank_state_name(0).replace("rank0", "rank*"))))
    reshard = f", written by {ranks} ranks: resharded to {nproc}" if ranks and ranks != nproc else ""
    report.parts.append((f"resume {resume} -> {chosen}" if chosen != resume else f"resume {chosen}") + reshard)


# -- metrics ports -------------------------------------------------------------------
def _port_in_use(addr: str, port: int) -> str:
    """Why `addr:port` cannot be bound ('' when it can), binding as prometheus_client's
    HTTP server does (SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def _check_metrics_ports(metrics: MetricsConfig, nproc: int, problems: list[str], report: PreflightReport) -> None:
    if not metrics.enabled:
        return
    if metrics.port == 0:
        report.parts.append("metrics on free ports")
        return
    ports = range(metrics.port, metrics.port + nproc)
    fix = "stop what holds them or set --metrics.port to a free base port (or 0 for any free port)"
    if ports[-1] > 65535:
        problems.append(f"metrics.port {metrics.port} + {nproc - 1} (local ranks) is past 65535; {fix}")
        return
    busy = [(p, why) for p in ports if (why := _port_in_use(metrics.addr, p))]
    if busy:
        listed = ", ".join(f"{p} ({why})" for p, why in busy)
        problems.append(
            f"metrics: port{'s' if len(busy) > 1 else ''} {listed} on {metrics.addr} cannot be bound; "
            f"local rank i serves on metrics.port + i ({ports[0]}-{ports[-1]}); {fix}"
        )
        return
    span = f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else f"{ports[0]}"
    report.parts.append(f"metrics port{'s' if len(ports) > 1 else ''} {span} free")


# -- init_from -----------------------------------------------------------------------
def _check_init_from(cfg: Config, problems: list[str], report: PreflightReport) -> None:
    if not cfg.train.init_from:
        return
    from pretrain.checkpoint import CheckpointError
    from pretrain.init_from import parse_init_from

    try:
        run, tag = parse_init_from(cfg.train.init_from)
        resolved = run.resolve(tag)
    except (ConfigError, CheckpointError) as exc:
        problems.append(f"train.init_from: {exc}" if "train.init_from" not in str(exc) else str(exc))
        return
    report.parts.append(f"init_from {run.path}:{resolved}")
