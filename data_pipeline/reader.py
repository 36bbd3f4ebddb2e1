"""Streaming shards into batches of the batch contract (DESIGN.md).

Shards are split over "readers": every (rank, loader worker) pair is one
reader and owns `shards[reader::num_readers]`. A reader's stream is infinite
and deterministic: epoch e shuffles its own shards and its samples with seeds
derived from (seed, reader, e). Its position is (epoch, samples taken from
that epoch's shuffled stream), which is all a checkpoint needs to resume
exactly: the resumed reader replays the same shuffle and skips undecoded
samples up to the position.

Torch's DataLoader hands out batches from its workers round-robin. A worker
does not own a fixed reader: on resume after N batches, worker w plays reader
role (w + N) mod num_workers, so the batch order continues unchanged.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.decode import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
    AudioFormat,
    DecodeError,
    decode_audio,
    decode_image,
    decode_text,
)
from data_pipeline.shards import read_index
from data_pipeline.tokenizer import load_tokenizer
from pretrain.config import MODALITIES, DataConfig


class DataError(RuntimeError):
    """A sample or shard that cannot be used, named with its key and shard."""


@dataclass
class LoaderState:
    """Where each reader role of this rank stands, plus batches handed out."""

    batches: int = 0
    roles: dict[int, tuple[int, int]] = field(default_factory=dict)  # role -> (epoch, offset)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "roles": {str(k): list(v) for k, v in self.roles.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoaderState":
        return cls(batches=int(d["batches"]), roles={int(k): (int(v[0]), int(v[1])) for k, v in d["roles"].items()})


@dataclass(frozen=True)
class SplitInfo:
    root: Path
    shards: list[str]
    num_samples: int
    tokenizer_path: Path
    index: dict[str, Any]


def open_split(split_dir: str | Path) -> SplitInfo:
    root = Path(split_dir)
    index = read_index(root)
    shards = [str(root / s["name"]) for s in index["shards"]]
    for path in shards:
        if not Path(path).is_file():
            raise DataError(f"shard {path} listed in {root / 'index.json'} is missing; rebuild the split")
    tokenizer_path = (root / index.get("tokenizer", "tokenizer.json")).resolve()
    return SplitInfo(root, shards, int(index["num_samples"]), tokenizer_path, index)


class SampleDecoder:
    """Raw tar sample (dict of bytes) -> decoded tensors + present mask."""

    def __init__(self, cfg: DataConfig, tokenizer_path: Path):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(tokenizer_path, cfg.max_text_len)
        self.audio = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)

    @staticmethod
    def _find(raw: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
        for ext in extensions:
            if ext in raw:
                return raw[ext]
        return None

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, shard = raw.get("__key__", "?"), raw.get("__url__", "?")
        try:
            out: dict[str, Any] = {"key": key}
            image = self._find(raw, IMAGE_EXTENSIONS)
            text = self._find(raw, TEXT_EXTENSIONS)
            audio = self._find(raw, AUDIO_EXTENSIONS)
            meta = json.loads(raw["json"]) if "json" in raw else {}
            if image is not None:
                out["image"] = decode_image(image, self.cfg.image_size)
            if text is not None:
                enc = self.tokenizer.encode(decode_text(text))
                out["text"] = torch.tensor(enc.ids, dtype=torch.long)
                out["text_mask"] = torch.tensor(enc.attention_mask, dtype=torch.bool)
            if audio is not None:
                out["audio"] = decode_audio(audio, self.audio)
            out["present"] = torch.tensor([m in out for m in MODALITIES], dtype=torch.bool)
            if not out["present"].any():
                raise DecodeError("sample holds no modality")
            out["label"] = int(meta.get("label", -1))
            return out
        except (DecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"sample '{key}' in shard {shard}: {exc}") from exc


def empty_sample(cfg: DataConfig, audio: AudioFormat) -> dict[str, torch.Tensor]:
    """The zero rows used for absent modalities."""
    return {
        "image": torch.zeros(3, cfg.image_size, cfg.image_size),
        "text": torch.zeros(cfg.max_text_len, dtype=torch.long),
        "text_mask": torch.zeros(cfg.max_text_len, dtype=torch.bool),
        "audio": torch.zeros(cfg.n_mels, audio.num_frames),
    }


def collate(samples: list[dict[str, Any]], cfg: DataConfig, audio: AudioFormat, batch_size: int) -> dict[str, Any]:
    """Stack samples into the batch contract; pad to `batch_size` with absent rows."""
    zeros = empty_sample(cfg, audio)
    rows = samples + [None] * (batch_size - len(samples))
    batch: dict[str, Any] = {}
    for name in ("image", "text", "text_mask", "audio"):
        batch[name] = torch.stack([s[name] if s is not None and name in s else zeros[name] for s in rows])
    batch["present"] = torch.stack(
        [s["present"] if s is not None else torch.zeros(len(MODALITIES), dtype=torch.bool) for s in rows]
    )
    batch["label"] = torch.tensor([s["label"] if s is not None else -1 for s in rows], dtype=torch.long)
    batch["key"] = [s["key"] if s is not None else "" for s in rows]
    return batch


class ShardStream(IterableDataset):
    """Infinite, resumable stream of full batches for one rank (see module doc)."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, state: LoaderState | None = None):
        super().__init__()
        self.cfg = cfg
        self.split = open_split(cfg.shards)
        self.rank, self.world_size = rank, world_size
        self.num_roles = max(cfg.num_workers, 1)
        self.num_readers = world_size * self.num_roles
        if len(self.split.shards) < self.num_readers:
            raise DataError(
                f"{cfg.shards} has {len(self.split.shards)} shards, fewer than the "
                f"{self.num_readers} readers ({world_size} ranks x {self.num_roles} workers); "
                "rebuild it with a smaller --shard-size or lower data.num_workers"
            )
        self.state = state or LoaderState()
        self.audio = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)

    def _role(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.state.batches) % self.num_roles

    def _epoch_samples(self, reader: int, epoch: int) -> Iterator[dict[str, Any]]:
        shards = self.split.shards[reader :: self.num_readers]
        rng = random.Random(f"{self.cfg.seed}/{reader}/{epoch}")
        shards = rng.sample(shards, len(shards))
        raw = wds.tarfile_to_samples()(iter([{"url": url} for url in shards]))
        if self.cfg.shuffle_buffer > 1:
            raw = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(raw)
        return raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        decoder = SampleDecoder(self.cfg, self.split.tokenizer_path)
        role = self._role()
        reader = self.rank * self.num_roles + role
        epoch, offset = self.state.roles.get(role, (0, 0))
        pending: list[dict[str, Any]] = []
        while True:
            taken = 0
            for taken, raw in enumerate(self._epoch_samples(reader, epoch), start=1):
                if taken <= offset:
                    continue  # already consumed before the checkpoint: skip undecoded
                pending.append(decoder(raw))
                if len(pending) == self.cfg.batch_size:
                    batch = collate(pending, self.cfg, self.audio, self.cfg.batch_size)
                    batch["_position"] = torch.tensor([role, epoch, taken])
                    yield batch
                    pending = []
            if taken == 0:
                raise DataError(f"reader {reader} of {self.cfg.shards} got no sample in epoch {epoch}")
            epoch, offset = epoch + 1, 0


class BatchLoader:
    """A DataLoader over `ShardStream` that records the position of what it handed out."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, state: LoaderState | None = None):
        self.cfg = cfg
        self.state = LoaderState.from_dict(state.to_dict()) if state else LoaderState()
        # The stream gets its own copy: it reads where to start, we record where we are.
        self.dataset = ShardStream(cfg, rank, world_size, LoaderState.from_dict(self.state.to_dict()))
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            persistent_workers=False,
        )
        self._iter: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        role, epoch, offset = (int(v) for v in batch.pop("_position"))
        self.state.roles[role] = (epoch, offset)
        self.state.batches += 1
        return batch


def iterate_split(cfg: DataConfig, split_dir: str | Path, batch_size: int) -> Iterator[dict[str, Any]]:
    """One ordered pass over every sample of a split, in one process (evaluation).

    The last batch is padded with absent rows (their `key` is "")."""
    split = open_split(split_dir)
    decoder = SampleDecoder(cfg, split.tokenizer_path)
    audio = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)
    pending: list[dict[str, Any]] = []
    for raw in wds.tarfile_to_samples()(iter([{"url": url} for url in split.shards])):
        pending.append(decoder(raw))
        if len(pending) == batch_size:
            yield collate(pending, cfg, audio, batch_size)
            pending = []
    if pending:
        yield collate(pending, cfg, audio, batch_size)
