"""Atomic, self-checking checkpoints of a DeepSpeed engine plus per-rank trainer state.

Layout under `DIR/checkpoints/`:
    step_00000010/            one complete checkpoint (DeepSpeed files +
                              trainer_state_rank{R}.pt for every rank +
                              manifest.json, written last)
    step_00000010.universal/  the same checkpoint in DeepSpeed's universal form,
                              made on the first resume by a different number of ranks
    latest                    text file naming the newest complete step folder
A checkpoint is written as `.tmp-step_...` and renamed into place by rank 0
only after every rank has finished writing and rank 0 has written the manifest
(every file's relative path and size, the writing world size, step and ZeRO
stage); `latest` is replaced atomically after that. A crash at any moment
leaves `latest` naming a complete checkpoint.

What a resume survives:
- a damaged checkpoint (a file lost or truncated after the save): `resolve` checks
  the manifest; `latest` falls back to the newest intact `step_*` folder with a
  warning, an explicit tag that is damaged is an error naming the file and the
  intact tags. Folders written before manifests existed are checked for the files
  every checkpoint holds (not their sizes) and accepted with a warning.
- a full or read-only disk during a save: a `CheckpointError` naming the folder,
  the free space and the size the checkpoint needs; the partial folder is removed,
  `latest` and the previous checkpoints are untouched. `check_can_save` is the
  same check before training starts.
- a different number of ranks: `load` converts the checkpoint once to DeepSpeed's
  universal form (ZeRO 1-3) and loads weights and optimizer state from it; ZeRO 0
  holds the whole model and optimizer in one file and loads on any world size.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write, atomic_write_json
from pretrain.distributed import is_distributed, rank, world_size

LATEST = "latest"
AUTO = "auto"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
UNIVERSAL_SUFFIX = ".universal"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What a full, over-quota, read-only or forbidden folder raises.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# torch.save's zip writer reports a short write (a full disk) as a RuntimeError,
# e.g. "[enforce fail at inline_container.cc] . unexpected pos 32640 vs 32544".
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")

T = TypeVar("T")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def is_step_tag(name: str) -> bool:
    return _STEP_DIR.match(name) is not None


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class CheckpointError(RuntimeError):
    pass


class CheckpointWarning(UserWarning):
    """A resume went on despite something wrong (a damaged `latest`, a checkpoint without manifest)."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


# -- the manifest ----------------------------------------------------------------
def folder_files(folder: Path) -> dict[str, int]:
    """Every regular file under `folder` (relative POSIX path -> size), the manifest excluded."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def write_manifest(folder: Path, *, step: int, world: int, zero_stage: int) -> dict[str, Any]:
    """Record every file of a finished checkpoint folder; written last, before the rename into place."""
    files = folder_files(folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "world_size": world,
        "zero_stage": zero_stage,
        "total_bytes": sum(files.values()),
        "files": files,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, None if it has none; a manifest that does not parse is a CheckpointError."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
        return manifest
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from e


@dataclass(frozen=True)
class Verification:
    """What `verify` found: `problem` is None for an intact checkpoint. `manifest` is None for a
    checkpoint written before manifests: then only the presence of the files every checkpoint
    holds was checked, not their sizes."""

    folder: Path
    problem: str | None
    manifest: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def tag(self) -> str:
        return self.folder.name


def verify_folder(folder: Path) -> Verification:
    """Check a checkpoint folder against its manifest; name the first problem and its fix."""
    if not folder.is_dir():
        return Verification(folder, f"{folder} does not exist", None)
    try:
        manifest = read_manifest(folder)
    except CheckpointError as e:
        return Verification(folder, f"{e}: the save did not finish cleanly; use another checkpoint", None)
    if manifest is None:
        return Verification(folder, _legacy_problem(folder), None)
    for rel, expected in sorted(manifest["files"].items()):
        path = folder / rel
        if not path.is_file():
            return Verification(
                folder,
                f"{path} is missing (expected {expected} bytes): the file was lost after the save; "
                "restore it from a copy or resume another checkpoint",
                manifest,
            )
        found = path.stat().st_size
        if found != expected:
            return Verification(
                folder,
                f"{path} has {found} bytes, expected {expected}: the file was truncated or overwritten "
                "after the save; restore it from a copy or resume another checkpoint",
                manifest,
            )
    return Verification(folder, None, manifest)


def _legacy_problem(folder: Path) -> str | None:
    """A checkpoint written before manifests: check that the files every checkpoint holds exist and
    are not empty (rank states for every writing rank, the module file(s), one optimizer shard per
    rank when there are any); sizes cannot be checked."""
    rank0 = folder / Checkpointer.rank_state_name(0)
    if not rank0.is_file() or rank0.stat().st_size == 0:
        return f"{rank0} is missing or empty (a checkpoint without manifest); resume another checkpoint"
    try:
        world = int(torch.load(rank0, map_location="cpu", weights_only=False)["world_size"])
    except Exception as e:  # a truncated zip, a missing key: the file is damaged either way
        return f"{rank0} is unreadable ({type(e).__name__}: {e}); resume another checkpoint"
    required = [folder / Checkpointer.rank_state_name(r) for r in range(world)]
    zero3 = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    if zero3:
        required += [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:
        required.append(folder / "mp_rank_00_model_states.pt")
    shards = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    if shards:
        prefix = shards[0].name.split("zero_pp_rank_")[0]
        required += [folder / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    for path in required:
        if not path.is_file() or path.stat().st_size == 0:
            return (
                f"{path} is missing or empty (the checkpoint was written by {world} ranks, "
                "before manifests were kept); resume another checkpoint"
            )
    return None


# -- before and during a save: space and permissions -----------------------------------
def expected_checkpoint_bytes(
    num_params: int, zero_stage: int, world_size: int = 1, precision: str = "fp32", margin: float = 0.1
) -> int:
    """What one checkpoint of a model with `num_params` trainable parameters takes on disk, as written.

    - the module weights in the training precision (fp32: 4 bytes, bf16: 2): in
      `mp_rank_00_model_states.pt` (ZeRO 0-2); ZeRO 3 writes its weights only as the fp32
      master partitions below;
    - ZeRO 1-3: the fp32 master copy (4) and Adam's two moments (8), split over the ranks
      but summing to 12 bytes per parameter; ZeRO 0: Adam's moments (8) in the module file,
      and a bf16 run's fp32 master copy (4) there too;
    plus `margin` for pickling and zip headers and 64 KiB per rank for the small files
    (trainer state, scheduler, manifest)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    weight = 2 if precision == "bf16" else 4
    per_param = 0 if zero_stage == 3 else weight
    if zero_stage == 0:
        per_param += 8 + (4 if precision == "bf16" else 0)
    else:
        per_param += 12
    return int(num_params * per_param * (1 + margin)) + 65536 * max(world_size, 1)


def check_can_save(root: str | Path, expected_bytes: int) -> None:
    """Preflight before training: the checkpoint folder `root` is writable (a real small atomic
    write and removal) and its file system has at least `expected_bytes` free; otherwise a
    CheckpointError saying which, with both numbers."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = atomic_write(root / f".write-check-{uuid.uuid4().hex}", b"calmrl checks it can save here\n")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints to {root}: {e.strerror or e} (errno {e.errno}); make the folder "
            "writable (mounted read-write, owned by this user) or set train.out_dir elsewhere"
        ) from e
    free = shutil.disk_usage(root).free
    if free < expected_bytes:
        raise CheckpointError(
            f"{root} has {_human(free)} free ({free} bytes) but one checkpoint needs about "
            f"{_human(expected_bytes)} ({expected_bytes} bytes); free space, or set train.out_dir on a larger disk"
        )


def _is_disk_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILURES)


# -- collective agreement ------------------------------------------------------------
def _on_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and give its result, or its CheckpointError, to every rank.

    Decisions taken from the file system (which tag to resume, whether a conversion
    worked) must be the same on every rank; a rank that raised alone would leave the
    others waiting in the next collective."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as e:
            box[0] = ("error", str(e))
        except Exception as e:  # anything else: every rank stops, with rank 0's reason
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status != "ok":
        raise CheckpointError(value)
    return value


def _all_ok(failed: bool) -> bool:
    """Collective: True when no rank failed (replaces the barrier after the writes of a save).
    An object gather rather than a CPU tensor all-reduce: it also works on NCCL."""
    if not is_distributed():
        return not failed
    flags: list[Any] = [None] * world_size()
    dist.all_gather_object(flags, bool(failed))
    return not any(flags)


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def rank_state_name(rank: int) -> str:
        return f"trainer_state_rank{rank}.pt"

    # -- saving -----------------------------------------------------------------------
    def save(self, engine: Any, step: int, rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own `rank_state`.

        A full, over-quota or read-only disk (OSError ENOSPC, EDQUOT, EROFS, EACCES, EPERM,
        or torch's short-write error) on any rank raises a CheckpointError on every rank,
        naming the folder, its free space and the checkpoint's size; the partial folder is
        removed and `latest` and earlier checkpoints stay as they were."""
        tag = step_tag(step)
        tmp_tag = f".tmp-{tag}"
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        failure: BaseException | None = None
        if rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                # Every rank is inside this save, so any other partial folder was left by a crash.
                for stale in self.root.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp_dir.mkdir()
            except OSError as e:
                if not _is_disk_failure(e):
                    raise
                failure = e
        # A read-only or unusable folder stops every rank here, before DeepSpeed's own collectives.
        if not _all_ok(failure is not None):
            self._abort_save(tmp_dir, failure, engine)
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            state = {**rank_state, "world_size": world_size(), "step": step}
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write(tmp_dir / self.rank_state_name(rank()), buf.getvalue())
        except (OSError, RuntimeError) as e:
            if not _is_disk_failure(e):
                raise  # anything else is a crash: leave the partial folder for the next save to clear
            failure = e
        if not _all_ok(failure is not None):
            self._abort_save(tmp_dir, failure, engine)
        if rank() == 0:
            try:
                write_manifest(tmp_dir, step=step, world=world_size(), zero_stage=_zero_stage(engine))
            except OSError as e:
                if not _is_disk_failure(e):
                    raise
                failure = e
        if not _all_ok(failure is not None):
            self._abort_save(tmp_dir, failure, engine)
        if rank() == 0:
            if final_dir.exists():
                shutil.rmtree(final_dir)
                shutil.rmtree(self.root / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
            tmp_dir.rename(final_dir)
            atomic_write(self.root / LATEST, tag.encode())
            self._prune(keep_tag=tag)
        _barrier()
        return final_dir

    def _abort_save(self, tmp_dir: Path, failure: BaseException | None, engine: Any) -> NoReturn:
        """Every rank: remove the partial folder (rank 0, after all ranks stopped writing) and raise."""
        needed = self._checkpoint_bytes(engine)
        _barrier()
        if rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _barrier()
        free = _free_bytes(self.root)
        free_text = "unknown" if free is None else f"{_human(free)} ({free} bytes)"
        cause = f"{type(failure).__name__}: {failure}" if failure is not None else "another rank failed to write"
        raise CheckpointError(
            f"could not save checkpoint {tmp_dir.name[len('.tmp-') :]} in {self.root}: {cause}. "
            f"Free space there: {free_text}; a checkpoint of this run needs about "
            f"{_human(needed)} ({needed} bytes). The partial folder was removed; `latest` and the "
            "earlier checkpoints are intact. Free space or make the folder writable, then resume "
            "with --resume latest."
        ) from failure

    def _checkpoint_bytes(self, engine: Any) -> int:
        """The size of the previous checkpoint if there is one, else the estimate."""
        for tag in reversed(self.step_tags()):
            manifest = read_manifest_quiet(self.root / tag)
            if manifest is not None:
                return int(manifest["total_bytes"])
        module = getattr(engine, "module", None)
        # ZeRO 3 leaves each rank an empty local tensor; `ds_numel` is the full size.
        params = (
            sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
            if module is not None
            else 0
        )
        bf16 = bool(getattr(engine, "bfloat16_enabled", lambda: False)())
        return expected_checkpoint_bytes(params, _zero_stage(engine), world_size(), "bf16" if bf16 else "fp32")

    def _prune(self, keep_tag: str) -> None:
        if self.keep <= 0:
            return
        tags = self.step_tags()
        for old in tags[: -self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)
                shutil.rmtree(self.root / f"{old}{UNIVERSAL_SUFFIX}", ignore_errors=True)

    # -- choosing what to resume ----------------------------------------------------------
    def step_tags(self) -> list[str]:
        """The `step_*` checkpoint folders, oldest first (by step number)."""
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if is_step_tag(p.name) and p.is_dir()]
        return sorted(tags, key=lambda t: int(t.split("_")[1]))

    def verify(self, tag: str) -> Verification:
        """Check every file of checkpoint `tag` against its manifest (present, recorded size);
        `Verification.problem` names the first problem and the fix. Local (not collective)."""
        return verify_folder(self.root / tag)

    def resolve(self, tag: str) -> str:
        """The intact checkpoint folder to resume for `tag`: 'latest' / 'auto' or 'step_XXXXXXXX'.

        'latest' (and 'auto') follow the `latest` file; when it is missing, or names a damaged
        or missing folder, the newest intact `step_*` folder is used instead, with a
        CheckpointWarning saying what was wrong and which one is used. An explicit tag that
        is damaged is a CheckpointError naming the file and the intact tags. Deterministic
        from the files: local, not collective (`load` decides on rank 0 for every rank)."""
        if tag not in (LATEST, AUTO):
            if not is_step_tag(tag):
                raise CheckpointError(f"{tag!r} is not a checkpoint tag: use 'latest' or one of {self.step_tags()}")
            return self._checked(self.verify(tag), explicit=True)
        pointer = self.root / LATEST
        named: str | None = None
        if pointer.is_file():
            try:
                named = pointer.read_text().strip()
            except OSError:
                named = None
        if named and is_step_tag(named):
            found = self.verify(named)
            if found.ok:
                return self._checked(found, explicit=False)
            reason = f"checkpoint {named} (named by {pointer}) is damaged: {found.problem}"
        elif named:
            reason = f"{pointer} names {named!r}, which is not a checkpoint"
        else:
            reason = f"{pointer} is missing or unreadable"
        problems = []
        for other in reversed(self.step_tags()):
            if other == named:
                continue
            found = self.verify(other)
            if found.ok:
                warnings.warn(
                    f"{reason}; resuming from {other}, the newest intact checkpoint", CheckpointWarning, stacklevel=3
                )
                return self._checked(found, explicit=False)
            problems.append(f"{other}: {found.problem}")
        if not named and not problems:
            raise CheckpointError(f"no checkpoint to resume: {pointer} does not exist and {self.root} has none")
        listed = "".join(f"\n  {p}" for p in problems) or " (there is no other)"
        raise CheckpointError(f"{reason}; no other checkpoint in {self.root} is intact:{listed}")

    def _checked(self, found: Verification, explicit: bool) -> str:
        if not found.ok:
            intact = [t for t in self.step_tags() if t != found.tag and self.verify(t).ok]
            hint = (
                f"intact checkpoints: {', '.join(intact)}; resume one with --resume {intact[-1]}"
                if intact
                else f"no other checkpoint in {self.root} is intact"
            )
            raise CheckpointError(f"checkpoint {found.tag} is damaged: {found.problem}. {hint}")
        if found.manifest is None:
            warnings.warn(
                f"checkpoint {found.folder} has no {MANIFEST} (written before manifests were kept): checked "
                "that every rank's files are present and not empty, but not their sizes",
                CheckpointWarning,
                stacklevel=3,
            )
        return found.tag

    # -- loading ------------------------------------------------------------------------
    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Collective: load engine state (module, optimizer, scheduler) and the trainer state.

        The checkpoint is chosen by `resolve` on rank 0 (every rank gets the same tag, or the
        same CheckpointError). Returns, with the same world size as the save, this rank's
        state as saved: `step`, `loader`, `rng`, `config`, `completion`, `world_size`, plus
        `resharded: False`.

        With a different world size the engine is loaded from the checkpoint's universal
        form (converted once by rank 0 into the sibling folder `step_X.universal`; ZeRO 1-3:
        fp32 weights, Adam moments and step, scheduler; ZeRO 0 needs no conversion), and the
        state is: `step`, `completion`, `config` and `rng` (rank 0's: `completion` is the same
        on every rank; reseed from `rng` as fits the new ranks), `world_size` (the OLD
        world size), `resharded: True`, and `loaders`: every old rank's `loader` dict, in old
        rank order (there is no `loader`: the caller re-divides the data position)."""
        tag = _on_rank0(lambda: self.resolve(tag))  # rank 0's warnings only: printed once
        folder = self.root / tag
        rank0 = self._rank_state(folder, 0)
        old_world = int(rank0["world_size"])
        if old_world == world_size():
            state = rank0 if rank() == 0 else self._rank_state(folder, rank())
            self._engine_load(engine, str(self.root), tag)
            return {**state, "resharded": False}
        stage = _zero_stage(engine)
        manifest = read_manifest_quiet(folder)
        saved_stage = int(manifest["zero_stage"]) if manifest else stage
        if saved_stage != stage:
            raise CheckpointError(
                f"{folder} was written at ZeRO stage {saved_stage} by {old_world} ranks; this run uses "
                f"stage {stage} on {world_size()}: resume with train.zero_stage={saved_stage}"
            )
        if stage == 0:  # one file holds the whole module and the torch optimizer: no shards to re-divide
            self._engine_load(engine, str(self.root), tag)
        else:
            universal = _on_rank0(lambda: self._universal(tag))
            from pretrain.engine import loading_universal_checkpoint

            with loading_universal_checkpoint(engine):
                self._engine_load(engine, str(self.root), universal)
        loaders = [(rank0 if r == 0 else self._rank_state(folder, r))["loader"] for r in range(old_world)]
        return {
            "step": int(rank0["step"]),
            "completion": rank0["completion"],
            "config": rank0["config"],
            "rng": rank0["rng"],
            "world_size": old_world,
            "resharded": True,
            "loaders": loaders,
        }

    def _rank_state(self, folder: Path, r: int) -> dict[str, Any]:
        path = folder / self.rank_state_name(r)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing: resume another checkpoint") from e
        except Exception as e:
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}): resume another checkpoint") from e

    def _engine_load(self, engine: Any, root: str, tag: str) -> None:
        try:
            path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        except (OSError, RuntimeError, ValueError, AssertionError, KeyError) as e:
            raise CheckpointError(f"DeepSpeed could not load {Path(root) / tag}: {type(e).__name__}: {e}") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {Path(root) / tag}")

    def _universal(self, tag: str) -> str:
        """Rank 0: the tag of `tag`'s universal form, converting it first if needed (atomically:
        into `.tmp-...`, renamed into place; a damaged earlier conversion is redone)."""
        utag = f"{tag}{UNIVERSAL_SUFFIX}"
        final = self.root / utag
        if final.is_dir():
            if verify_folder(final).ok:
                return utag
            shutil.rmtree(final)
        staging = self.root / f".tmp-{utag}"
        shutil.rmtree(staging, ignore_errors=True)
        # DeepSpeed's converter writes `latest_universal` beside its output folder: inside staging.
        out = staging / utag
        out.parent.mkdir(parents=True)
        log = io.StringIO()
        try:
            convert_to_universal(self.root / tag, out, log)
            manifest = read_manifest_quiet(self.root / tag) or {}
            write_manifest(
                out, step=int(manifest.get("step", -1)), world=int(manifest.get("world_size", -1)), zero_stage=-1
            )
            out.rename(final)
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            tail = log.getvalue()[-2000:]
            raise CheckpointError(
                f"could not convert {self.root / tag} to DeepSpeed's universal form for a different number "
                f"of ranks: {type(e).__name__}: {e}\n{tail}"
            ) from e
        shutil.rmtree(staging, ignore_errors=True)
        return utag


def read_manifest_quiet(folder: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(folder)
    except CheckpointError:
        return None


def _zero_stage(engine: Any) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def convert_to_universal(src: Path, out: Path, log: io.StringIO | None = None) -> None:
    """DeepSpeed's `ds_to_universal` of one ZeRO 1-3 checkpoint folder into `out` (in this process:
    one extract and one merge worker). `inject_missing_state`: engines without tensor or pipeline
    parallelism write no UNIVERSAL_CHECKPOINT_INFO, which the converter otherwise requires."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    sink = log if log is not None else io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ds_to_universal(args)
