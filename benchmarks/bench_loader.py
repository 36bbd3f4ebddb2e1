"""Loader throughput against the bare limit.

The bare limit iterates the same tar files with Python's tarfile in
one process and decodes every entry with the same decoders (PIL, soundfile +
librosa, tokenizers), with no framework, no shuffle, no collation. Two
stricter references take from it what the loader does better: log-mels per
batch ("batched"), and also reading shards by their layouts ("seek"). The
loader is `BatchLoader` (layout seeking or webdataset's tar grouping, shuffle
buffer, DataLoader workers, collation into the batch contract) with 1 and 2
workers.

    python benchmarks/bench_loader.py SPLIT_DIR [SPLIT_DIR ...] [--samples 2000] [--batch 32]

Goal: per worker at least 0.9x the bare limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.contract import DataConfig
from data_pipeline.decode import AudioFormat, decode_audio, decode_image, decode_text, decode_waveform, log_mel_batch
from data_pipeline.reader import BatchLoader
from data_pipeline.samples import SampleDecoder
from data_pipeline.split import open_split
from data_pipeline.tar_reading import seek_samples
from data_pipeline.tokenizer import load_tokenizer


def _bare_samples(split, seek: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample of the split, in order, forever:
    by tarfile's member iteration, or with `seek` by the shards' layouts."""
    while True:
        for url in split.shards:
            if seek:
                layout = json.loads(Path(split.layout_of[url]).read_text())
                with open(url, "rb") as f:
                    for sample in seek_samples(url, f, layout):
                        yield sample["__key__"], sample
                continue
            with tarfile.open(url) as tar:
                members = [(m.name, fh.read()) for m in tar if m.isfile() and (fh := tar.extractfile(m)) is not None]
            current: dict[str, bytes] = {}
            key = None
            for name, data in members + [("__end__.x", b"")]:
                k, ext = name.split(".", 1)
                if key is not None and k != key:
                    yield key, current
                    current = {}
                key = k
                current[ext] = data


def bare_limit(cfg: DataConfig, limit: int, batched_mels: bool = False, seek: bool = False) -> float:
    """Samples/s of tarfile + the decoders, one sample at a time; with
    `batched_mels`, log-mels are computed per batch of waveforms as the
    loader does (`log_mel_batch`); with `seek` too, shards are read by their
    layouts as the loader reads them, which leaves only the framework's own
    cost (shuffle, collation, workers) between this and the loader."""
    split = open_split(cfg.shards)
    tok = load_tokenizer(split.tokenizer_json, cfg.max_text_len)
    fmt = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)
    policy = SampleDecoder(cfg, split.tokenizer_json)
    waves: list = []
    start = time.perf_counter()
    for done, (key, current) in enumerate(_bare_samples(split, seek), start=1):
        meta = json.loads(current.get("json", b"{}"))
        if "png" in current:
            decode_image(current["png"], cfg.image_size)
        if "txt" in current:
            tok.encode(decode_text(current["txt"]))
        audio = policy._pick_track({**current, "__key__": key}, meta, 0)
        if audio is not None and batched_mels:
            waves.append(decode_waveform(audio, fmt))
            if len(waves) == cfg.batch_size:
                log_mel_batch(np.stack(waves), fmt)
                waves = []
        elif audio is not None:
            decode_audio(audio, fmt)
        if done >= limit:
            return done / (time.perf_counter() - start)
    raise AssertionError("unreachable: the sample stream is endless")


def loader_rate(cfg: DataConfig, limit: int) -> float:
    loader = BatchLoader(cfg, 0, 1)
    next(loader)  # workers started, first batch out
    batches = max(1, limit // cfg.batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("splits", nargs="+")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many measurements")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    # A DataLoader worker runs torch with one thread; the bare limit must too,
    # or OpenMP spin-waits on small tensors make it slower or faster by chance.
    torch.set_num_threads(1)
    for split in args.splits:
        base = DataConfig(shards=split, batch_size=args.batch, shuffle_buffer=256, image_size=args.image_size)
        seekable = set(open_split(split).layout_of) == set(open_split(split).shards)
        bare_limit(base, 64)  # warm-up: first calls into librosa/numpy FFT plans and PIL plugins
        refs = {"bare": statistics.median(bare_limit(base, args.samples) for _ in range(args.repeats))}
        print(f"{split}: bare limit {refs['bare']:8.1f} samples/s (one process, tarfile + decoders)")
        refs["batched"] = statistics.median(
            bare_limit(base, args.samples, batched_mels=True) for _ in range(args.repeats)
        )
        print(
            f"{split}: bare limit {refs['batched']:8.1f} samples/s with log-mels per batch, as the loader computes them"
        )
        if seekable:
            refs["seek"] = statistics.median(
                bare_limit(base, args.samples, batched_mels=True, seek=True) for _ in range(args.repeats)
            )
            print(
                f"{split}: bare limit {refs['seek']:8.1f} samples/s with log-mels per batch and shards read by "
                "their layouts, as the loader reads them"
            )
        else:
            print(f"{split}: its shards have no layouts (built before them): rebuild it to read by seeking")
        for workers in (1, 2):
            cfg = DataConfig(**{**base.__dict__, "num_workers": workers})
            rate = statistics.median(loader_rate(cfg, args.samples) for _ in range(args.repeats))
            ratios = ", ".join(f"{rate / workers / ref:.2f}x {name}" for name, ref in refs.items())
            print(f"  loader, {workers} worker(s): {rate:8.1f} samples/s; per worker {ratios}")
    print(
        "goal: >= 0.90x the bare limit per worker (bare: tarfile + per-sample decoding; batched: same decoding as the "
        "loader; seek: same decoding and reading, so only the framework's own cost remains)"
    )


if __name__ == "__main__":
    main()
