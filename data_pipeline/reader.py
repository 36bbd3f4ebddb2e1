"""Streaming shards into batches of the batch contract (docs/design.md).

Shards are split over "readers": every (rank, loader worker) pair is one
reader and owns `shards[reader::num_readers]`. A reader's stream is infinite
and deterministic: epoch e shuffles its own shards and its samples with seeds
derived from (seed, reader, e). Its position is (epoch, samples taken from
that epoch's shuffled stream), which is all a checkpoint needs to resume
exactly: the resumed reader replays the same shuffle and skips undecoded
samples up to the position. In resampled mode a reader draws shards from the
whole split with replacement and an epoch is `epoch_samples` long (virtual).

Torch's DataLoader hands out batches from its workers round-robin. A worker
does not own a fixed reader: on resume after N batches, worker w plays reader
role (w + N) mod num_workers, so the batch order continues unchanged.

Parts, one file each: the split's index (`split.py`), reading a shard's
samples by layout or tar headers (`tar_reading.py`), decoding and collating
(`samples.py`), and the worker-to-trainer wire format (`wire.py`). This file
is the stream, its position, and the loader around it.

Bad input: a sample that does not decode (corrupt image or audio, empty
caption, no modality, entries missing from a truncated tar) is counted,
logged once with its key and shard, and skipped; a shard whose tar breaks
off is counted and the rest of it skipped. The counts travel with the
batches (`LoaderState.bad_samples`). A missing shard or an unreachable store
is an error that names it.

`data.extra_missing` hides more modalities in training streams only (the
benchmark's imposed missing rates; data_pipeline/missing.py): the hidden
entries are not decoded, and evaluation (`iterate_split`) sees every one.
"""

from __future__ import annotations

import atexit
import random
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.contract import DataConfig
from data_pipeline.decode import AudioFormat
from data_pipeline.errors import DataError
from data_pipeline.samples import SampleDecoder, collate
from data_pipeline.split import open_split
from data_pipeline.tar_reading import BadInputLog, raw_samples
from data_pipeline.wire import from_wire, init_loader_worker, keep_as_is, to_wire

# A stream of another world size to finish first (resharded resume): (old reader, old
# number of readers, epoch, samples already taken from it, stride, phase): this reader
# takes the stream's samples whose 1-based position p has p % stride == phase.
CarryItem = tuple[int, int, int, int, int, int]


@dataclass
class LoaderState:
    """Where each reader role of this rank stands, plus batches handed out.

    `carry` (after a resume on another number of ranks, see `reshard_loader_state`):
    per role, the old readers' unfinished epoch streams this role finishes before
    its own stream starts, so that every sample of the interrupted epoch is seen
    exactly once."""

    batches: int = 0
    roles: dict[int, tuple[int, int]] = field(default_factory=dict)  # role -> (epoch, offset)
    bad: dict[int, int] = field(default_factory=dict)  # role -> bad samples met so far (lost ones of broken shards too)
    bad_shards: dict[int, int] = field(default_factory=dict)  # role -> shards that broke off
    carry: dict[int, list[CarryItem]] = field(default_factory=dict)

    @property
    def bad_samples(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_shard_count(self) -> int:
        return sum(self.bad_shards.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "roles": {str(k): list(v) for k, v in self.roles.items()},
            "bad": {str(k): v for k, v in self.bad.items()},
            "bad_shards": {str(k): v for k, v in self.bad_shards.items()},
            "carry": {str(k): [list(item) for item in v] for k, v in self.carry.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        return cls(
            batches=int(d["batches"]),
            roles={int(k): (int(v[0]), int(v[1])) for k, v in d["roles"].items()},
            bad={int(k): int(v) for k, v in d.get("bad", {}).items()},
            bad_shards={int(k): int(v) for k, v in d.get("bad_shards", {}).items()},
            carry={
                int(k): [(int(a), int(b), int(c), int(e), int(f), int(g)) for a, b, c, e, f, g in v]
                for k, v in d.get("carry", {}).items()
            },
        )


def reshard_loader_state(
    loaders: list[dict[str, Any]], old_roles: int, rank: int, world: int, roles: int, resampled: bool = False
) -> LoaderState:
    """This rank's loader state for a resume on `world` ranks of a checkpoint written by
    `len(loaders)` ranks (their loader states, in rank order, `old_roles` roles each).

    What every old reader had left is finished in its old layout and order: the
    streams it still carried from an earlier reshard, the rest of its current
    epoch, and, for a reader behind the furthest epoch any reader has begun, its
    epochs up to that one whole. Those streams are dealt out whole to the new readers in turn when
    there are at least as many as new readers; else each is shared by all new
    readers (reader j takes every R-th of its samples; each reads the stream's raw
    bytes, decodes only its own share). Then every new reader starts its own
    stream at the epoch after the furthest old one. So each sample of the epochs in
    progress is seen exactly once, over any chain of reshards. In resampled mode
    (shards drawn with replacement) only the epoch carries over. Bad-sample counts
    carry over on rank 0."""
    positions: dict[int, tuple[int, int]] = {}
    carried: list[CarryItem] = []
    total_bad = total_bad_shards = 0
    for old_rank, loader in enumerate(loaders):
        state = LoaderState.from_dict(loader)
        total_bad += state.bad_samples
        total_bad_shards += state.bad_shard_count
        for role in range(old_roles):
            positions[old_rank * old_roles + role] = state.roles.get(role, (0, 0))
            carried += state.carry.get(role, [])
    old_readers = len(loaders) * old_roles
    # The furthest epoch any old reader has begun (an untouched epoch at offset 0 is not begun).
    last = max(epoch if offset > 0 else epoch - 1 for epoch, offset in positions.values())
    streams: list[CarryItem] = []
    if not resampled:
        streams += carried
        for reader in range(old_readers):
            epoch, offset = positions[reader]
            streams.extend((reader, old_readers, e, offset if e == epoch else 0, 1, 0) for e in range(epoch, last + 1))
    new = LoaderState(roles=dict.fromkeys(range(roles), (last + 1, 0)))
    readers = world * roles
    for role in range(roles):
        me = rank * roles + role
        if len(streams) >= readers:
            mine = [item for i, item in enumerate(streams) if i % readers == me]
        else:  # share each: of the positions p = phase (mod stride), the me-th of every `readers`
            mine = [(*item[:4], item[4] * readers, (item[5] + item[4] * me) % (item[4] * readers)) for item in streams]
        if mine:
            new.carry[role] = mine
    if rank == 0:
        new.bad[0] = total_bad
        new.bad_shards[0] = total_bad_shards
    return new


class ShardStream(IterableDataset):
    """Infinite, resumable stream of full batches for one rank (see module doc).

    Batches come out in wire form (small fields as numpy, see `_to_wire`);
    `BatchLoader` hands them out in the batch contract."""

    def __init__(
        self,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        state: LoaderState | None = None,
        undecoded: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.cfg = cfg
        self.undecoded = undecoded  # present but never decoded (see SampleDecoder)
        self.split = open_split(cfg.shards, cfg.tokenizer)
        self.rank, self.world_size = rank, world_size
        self.num_roles = max(cfg.num_workers, 1)
        self.num_readers = world_size * self.num_roles
        if len(self.split.shards) < self.num_readers and not cfg.resampled:
            raise DataError(
                f"{cfg.shards} has {len(self.split.shards)} shards, fewer than the "
                f"{self.num_readers} readers ({world_size} ranks x {self.num_roles} workers); "
                "rebuild it with a smaller --shard-size, lower data.num_workers, or set data.resampled"
            )
        self.state = state or LoaderState()
        self.audio = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)

    def _role(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.state.batches) % self.num_roles

    def _epoch_samples(
        self, reader: int, epoch: int, bad: BadInputLog, num_readers: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Reader `reader`'s samples of `epoch` (of `num_readers`, default this job's readers)."""
        num_readers = num_readers or self.num_readers
        rng = random.Random(f"{self.cfg.seed}/{reader}/{epoch}")
        if self.cfg.resampled:
            own = len(self.split.shards) // num_readers or 1
            length = self.cfg.epoch_samples or sum(self.split.counts) // num_readers
            shards = rng.choices(self.split.shards, k=own)

            def endless() -> Iterator[dict[str, Any]]:
                nonlocal shards
                while True:
                    yield from raw_samples(shards, bad, self.split.count_of, self.split.layout_of)
                    shards = rng.choices(self.split.shards, k=own)

            raw: Iterator[dict[str, Any]] = (s for _, s in zip(range(length), endless()))
        else:
            shards = self.split.shards[reader::num_readers]
            raw = raw_samples(rng.sample(shards, len(shards)), bad, self.split.count_of, self.split.layout_of)
        if self.cfg.shuffle_buffer > 1:
            raw = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(raw)
        return raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        decoder = SampleDecoder(self.cfg, self.split.tokenizer_json, impose_missing=True, undecoded=self.undecoded)
        role = self._role()
        reader = self.rank * self.num_roles + role
        epoch, offset = self.state.roles.get(role, (0, 0))
        bad = BadInputLog(self.state.bad.get(role, 0), self.state.bad_shards.get(role, 0))
        pending: list[dict[str, Any]] = []
        # Position of a batch: (role, epoch, taken, bad samples, carry index, carry taken, bad
        # shards); carry index -1 once the carried streams are done (see LoaderState.carry).
        for index, (old_reader, old_readers, c_epoch, c_offset, stride, phase) in enumerate(
            self.state.carry.get(role, [])
        ):
            for taken, raw in enumerate(self._epoch_samples(old_reader, c_epoch, bad, old_readers), start=1):
                if taken <= c_offset or taken % stride != phase:
                    continue  # consumed before the checkpoint, or another new reader's share
                try:
                    pending.append(decoder(raw, c_epoch))
                except DataError as exc:
                    bad.record(f"{raw.get('__url__')}/{raw.get('__key__')}", str(exc))
                if len(pending) == self.cfg.batch_size:
                    batch = collate(pending, self.cfg, self.audio, self.cfg.batch_size)
                    batch["_position"] = torch.tensor([role, epoch, offset, bad.count, index, taken, bad.shards])
                    yield to_wire(batch)
                    pending = []
        while True:
            taken = 0
            for taken, raw in enumerate(self._epoch_samples(reader, epoch, bad), start=1):
                if taken <= offset:
                    continue  # already consumed before the checkpoint: skip undecoded
                try:
                    pending.append(decoder(raw, epoch))
                except DataError as exc:
                    bad.record(f"{raw.get('__url__')}/{raw.get('__key__')}", str(exc))
                if len(pending) == self.cfg.batch_size:
                    batch = collate(pending, self.cfg, self.audio, self.cfg.batch_size)
                    batch["_position"] = torch.tensor([role, epoch, taken, bad.count, -1, 0, bad.shards])
                    yield to_wire(batch)
                    pending = []
            if taken == 0:
                raise DataError(
                    f"reader {reader} of {self.cfg.shards} got no sample in epoch {epoch}: "
                    "its shards are empty or unreadable"
                )
            epoch, offset = epoch + 1, 0


class BatchLoader:
    """A DataLoader over `ShardStream` that records the position of what it handed out."""

    def __init__(
        self,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        state: LoaderState | None = None,
        undecoded: frozenset[str] = frozenset(),
    ):
        """`undecoded`: modalities whose bytes are not decoded (present only; see SampleDecoder)."""
        self.cfg = cfg
        self.state = LoaderState.from_dict(state.to_dict()) if state else LoaderState()
        self._carry = {role: list(items) for role, items in self.state.carry.items()}  # as the stream starts
        self.in_carry = False
        # The stream gets its own copy: it reads where to start, we record where we are.
        self.dataset = ShardStream(cfg, rank, world_size, LoaderState.from_dict(self.state.to_dict()), undecoded)
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            persistent_workers=False,
            worker_init_fn=init_loader_worker if cfg.num_workers > 0 else None,  # dies with this process
            collate_fn=keep_as_is,
        )
        self._iter: Iterator[dict[str, Any]] | None = None
        _OPEN_LOADERS.add(self)

    def close(self) -> None:
        """Stop the loader's workers now: shut down as torch does, then SIGKILL any worker
        still alive. Needed because workers ignore stop signals (data_pipeline/wire.py), so
        Python's exit, which terminates and then joins daemon children, would wait on
        them forever. Called at the end of `Trainer.fit` and at exit."""
        it, self._iter = self._iter, None
        if it is None:
            return
        workers = list(getattr(it, "_workers", []))
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = from_wire(next(self._iter))
        role, epoch, offset, bad, carry_index, carry_taken, bad_shards = (int(v) for v in batch.pop("_position"))
        self.state.roles[role] = (epoch, offset)
        self.state.bad[role] = bad
        self.state.bad_shards[role] = bad_shards
        self.in_carry = carry_index >= 0  # this batch completed inside the old readers' streams
        if carry_index >= 0:  # still finishing old readers' streams: the rest of them, from here
            rest = self._carry[role][carry_index:]
            first = rest[0]
            self.state.carry[role] = [(first[0], first[1], first[2], carry_taken, first[4], first[5]), *rest[1:]]
        else:
            self.state.carry.pop(role, None)
        self.state.batches += 1
        return batch


_OPEN_LOADERS: weakref.WeakSet[BatchLoader] = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


def iterate_split(
    cfg: DataConfig,
    split_dir: str | Path,
    batch_size: int,
    bad: BadInputLog | None = None,
    *,
    undecoded: frozenset[str] = frozenset(),
    shard_part: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, Any]]:
    """One ordered pass over every sample of a split, in one process (evaluation).

    Bad samples are counted in `bad` and skipped. The last batch is padded
    with absent rows (their `key` is ""). `undecoded` modalities are marked
    present but not decoded; `shard_part` (i, n) reads only shards i, i + n, ..."""
    split = open_split(split_dir, cfg.tokenizer)
    decoder = SampleDecoder(cfg, split.tokenizer_json, undecoded=undecoded)
    audio = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)
    bad = bad if bad is not None else BadInputLog()
    pending: list[dict[str, Any]] = []
    part, parts = shard_part
    for raw in raw_samples(split.shards[part::parts], bad, split.count_of, split.layout_of):
        try:
            pending.append(decoder(raw))
        except DataError as exc:
            bad.record(f"{raw.get('__url__')}/{raw.get('__key__')}", str(exc))
        if len(pending) == batch_size:
            yield collate(pending, cfg, audio, batch_size)
            pending = []
    if pending:
        yield collate(pending, cfg, audio, batch_size)
