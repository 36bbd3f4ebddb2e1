"""What every source shares: keys, the split by hash, checking one file of each
modality, assembling a sample, and writing train/val/test plus the tokenizer.

A sample written by a source is
    KEY.json                 metadata (below)
    KEY.png|jpg|webp         the image bytes as found (other formats re-encoded to PNG)
    KEY.txt                  the English caption, UTF-8, never empty
    KEY.audio{i}.ogg|flac|wav  audio track i, the original container kept
and its metadata holds `source`, `split`, `label` (-1: none), `modalities`
(a subset of image, text, audio in that order; audio iff there is a track) and
`audio_tracks`: [{"name": "audio0.ogg", "kind": ..., "lang": ..., "file": ...,
"sample_rate": ..., "channels": ..., "seconds": ...}] in entry order.

A record that cannot be read raises `BadRecord`; the build stops with a
`SourceError` naming the file and the fix, or with --skip-bad counts it (per
reason, in every index's `build.skipped`) and goes on. A record left with no
modality (e.g. only an empty caption) is always counted and skipped: docs/design.md
says such a sample is an error in the data, never written.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile
from PIL import Image
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.contract import pattern_name
from data_pipeline.shards import ShardSetWriter
from data_pipeline.sources import DEFAULT_SPLIT_FRACTIONS, SPLITS, BuildOptions, BuildReport, SourceError
from data_pipeline.tokenizer import train_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".ogg", ".flac", ".wav")
TEXT_SUFFIXES = (".txt",)
# Image formats the reader decodes as stored; anything else is re-encoded to PNG.
STORED_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
SKIP_BAD_HINT = "or pass --skip-bad to count and skip such records"


class BadRecord(Exception):
    """One record cannot be used; `reason` is the counter it goes to under --skip-bad."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- keys, splits


def hash_unit(text: str) -> float:
    """A deterministic number in [0, 1) from `text` (first 64 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_of(group: str, fractions: tuple[float, float, float], seed: int = 0) -> str:
    """train/val/test from the hash of `group`; seed 0 hashes the group alone."""
    u = hash_unit(group if seed == 0 else f"{seed}/{group}")
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def sanitize_key(text: str) -> str:
    """A WebDataset key: no dots (they start the extension), no slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "record"


class KeyMaker:
    """Unique keys from names; a name whose sanitized form is taken gets a hash suffix."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        key = self.prefix + sanitize_key(name)
        if key in self.used:
            key = f"{key}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
        n = 1
        base = key
        while key in self.used:  # only for pathological names
            key, n = f"{base}-{n}", n + 1
        self.used.add(key)
        return key


# ---------------------------------------------------------------- one file of each modality


def check_image(data: bytes, origin: str) -> tuple[str, bytes, dict[str, Any]]:
    """Decode fully; return (entry extension, bytes to store, info)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode, (width, height) = img.format, img.mode, img.size
            has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
            ext = STORED_IMAGE_FORMATS.get(fmt or "")
            if ext is None:  # a format the reader does not take as-is
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
    except Exception as exc:  # PIL raises many types for bad bytes
        raise BadRecord(
            "bad_image",
            f"{origin}: image does not decode ({type(exc).__name__}: {exc}); "
            f"replace or delete the file, {SKIP_BAD_HINT}",
        ) from exc
    info = {"width": width, "height": height, "mode": mode, "has_alpha": has_alpha, "format": fmt}
    return ext, data, info


def check_audio(data: bytes, origin: str, full_decode: bool = True) -> dict[str, Any]:
    """Sample rate, channels and duration; `full_decode` also decodes every frame."""
    try:
        info = soundfile.info(io.BytesIO(data))
        frames = info.frames
        if full_decode:
            wave, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
            frames = wave.shape[0]
    except Exception as exc:
        raise BadRecord(
            "bad_audio",
            f"{origin}: audio does not decode ({type(exc).__name__}: {exc}); "
            f"replace or delete the file, {SKIP_BAD_HINT}",
        ) from exc
    if frames <= 0:
        raise BadRecord("bad_audio", f"{origin}: audio holds no samples; replace or delete the file, {SKIP_BAD_HINT}")
    return {
        "sample_rate": int(info.samplerate),
        "channels": int(info.channels),
        "seconds": round(frames / info.samplerate, 4),
    }


def check_caption(data: bytes, origin: str) -> str | None:
    """The caption text, or None when the file is empty or blank (the text is then absent)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRecord(
            "bad_caption", f"{origin}: caption is not UTF-8 ({exc}); re-save it as UTF-8, {SKIP_BAD_HINT}"
        ) from exc
    text = text.strip()
    return text or None


def read_file(path: Path, origin: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadRecord("unreadable_file", f"{origin}: cannot be read ({exc.strerror}); {SKIP_BAD_HINT}") from exc


# ---------------------------------------------------------------- samples


@dataclass
class Track:
    data: bytes
    ext: str  # ogg | flac | wav
    kind: str | None  # effect | description | speech | ... (None: not known)
    lang: str | None
    info: dict[str, Any] = field(default_factory=dict)  # file, sample_rate, channels, seconds


def assemble(
    key: str, meta: dict[str, Any], image: tuple[str, bytes] | None, caption: str | None, tracks: list[Track]
) -> dict[str, Any]:
    """A sample for ShardSetWriter; metadata gets `modalities` and `audio_tracks`."""
    sample: dict[str, Any] = {"__key__": key}
    modalities = []
    if image is not None:
        sample[image[0]] = image[1]
        modalities.append("image")
    if caption:
        sample["txt"] = caption.encode("utf-8")
        modalities.append("text")
    described = []
    for i, track in enumerate(tracks):
        name = f"audio{i}.{track.ext}"
        sample[name] = track.data
        described.append({"name": name, "kind": track.kind, "lang": track.lang, **track.info})
    if tracks:
        modalities.append("audio")
    sample["json"] = {**meta, "modalities": modalities, "audio_tracks": described}
    return sample


# ---------------------------------------------------------------- writing the splits

TrackFilter = Callable[[dict[str, Any]], bool]


class SplitStats:
    """Counts over the samples written to one split, for its index."""

    def __init__(self, audio_policies: dict[str, TrackFilter]):
        self.audio_policies = audio_policies
        self.tracks: Counter[str] = Counter()  # "kind/lang"
        self.samples_with: Counter[str] = Counter()
        self.labels: Counter[int] = Counter()
        self.by_policy: dict[str, Counter[str]] = {name: Counter() for name in audio_policies}

    def add(self, meta: dict[str, Any]) -> None:
        tracks = meta["audio_tracks"]
        self.labels[meta["label"]] += 1
        for t in tracks:
            self.tracks[f"{t['kind'] or '-'}/{t['lang'] or '-'}"] += 1
        for tag in {f"{t['kind'] or '-'}/{t['lang'] or '-'}" for t in tracks}:
            self.samples_with[tag] += 1
        if tracks:
            self.samples_with["any_audio"] += 1
        others = [m for m in meta["modalities"] if m != "audio"]
        for name, keep in self.audio_policies.items():
            kept = any(keep(t) for t in tracks)
            pattern = pattern_name(others + (["audio"] if kept else []))
            self.by_policy[name][pattern or "none"] += 1

    def to_index(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "audio_track_counts": dict(sorted(self.tracks.items())),
            "samples_with_audio_track": dict(sorted(self.samples_with.items())),
            "label_counts": {str(k): v for k, v in sorted(self.labels.items())},
        }
        if self.by_policy:
            out["pattern_counts_by_audio_policy"] = {
                name: dict(sorted(c.items())) for name, c in self.by_policy.items()
            }
        return out


def _written_index(writer: ShardSetWriter) -> dict[str, Any]:
    if writer.index is None:
        raise RuntimeError(f"{writer.out_dir}: the shard writer was not closed; its index is not written")
    return writer.index


@dataclass
class Record:
    key: str  # unique, sanitized
    group: str  # what the split hash is taken of (records of one group share a split)
    load: Callable[[], dict[str, Any]]  # -> a sample from `assemble`; may raise BadRecord


@dataclass
class WriteResult:
    indexes: dict[str, dict[str, Any]]
    skipped: Counter[str]
    written: int
    totals: Counter[str]  # pattern counts over all splits


def write_records(
    opts: BuildOptions,
    source: str,
    records: list[Record],
    extra_index: dict[str, Any],
    build_info: dict[str, Any] | None = None,
    audio_policies: dict[str, TrackFilter] | None = None,
    skipped_before: dict[str, int] | None = None,
) -> WriteResult:
    """Write every record to its split (train/val/test), then the tokenizer of the train captions.

    Records go to `out/<split>/` in an order fixed by the hash of their key, so
    shards do not follow the folder order (one class after another)."""
    if opts.shard_size < 1:
        raise SourceError(f"--shard-size {opts.shard_size}: must be at least 1")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    fractions = opts.split_fractions or DEFAULT_SPLIT_FRACTIONS
    assigned = sorted(
        ((split_of(r.group, fractions, opts.seed), hash_unit(r.key), r) for r in records),
        key=lambda t: (SPLITS.index(t[0]), t[1]),
    )
    stats = {s: SplitStats(audio_policies or {}) for s in SPLITS}
    skipped: Counter[str] = Counter(skipped_before or {})  # records dropped before loading (bad manifest lines)
    totals: Counter[str] = Counter()
    train_captions: list[str] = []
    written = 0
    with ExitStack() as stack:
        writers = {}
        for split in SPLITS:
            extra = {
                "source": source,
                "split": split,
                "tokenizer": "../tokenizer.json",
                "split_fractions": list(fractions),
                "split_seed": opts.seed,
                **extra_index,
            }
            writers[split] = stack.enter_context(ShardSetWriter(out / split, opts.shard_size, extra))
        bar = tqdm(assigned, desc=f"{source} shards", unit="sample", disable=not opts.progress)
        for split, _, record in bar:
            try:
                sample = record.load()
            except BadRecord as bad:
                if not opts.skip_bad:
                    raise SourceError(str(bad)) from bad
                skipped[bad.reason] += 1
                continue
            meta = sample["json"]
            if not meta["modalities"]:
                skipped["no_modality"] += 1
                continue
            meta["split"] = split
            writers[split].write(sample)
            stats[split].add(meta)
            totals[pattern_name(meta["modalities"])] += 1
            written += 1
            if split == "train" and "txt" in sample:
                train_captions.append(sample["txt"].decode("utf-8"))
        bar.close()
        build = {
            **(build_info or {}),
            "records": len(records),
            "written": written,
            "skipped": dict(sorted(skipped.items())),
        }
        for split, writer in writers.items():
            writer.extra_index.update(stats[split].to_index())
            writer.extra_index["build"] = build
    indexes = {split: _written_index(writers[split]) for split in SPLITS}
    write_tokenizer(out, train_captions, opts.vocab_size)
    return WriteResult(indexes, skipped, written, totals)


def write_tokenizer(out: Path, captions: Iterable[str], vocab_size: int) -> None:
    tok = train_tokenizer(list(captions), vocab_size)
    atomic_write(Path(out) / "tokenizer.json", tok.to_str())


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def split_summary(indexes: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{split} {idx['num_samples']} samples in {len(idx['shards'])} shards" for split, idx in indexes.items()
    )


def label_classes(names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    classes = sorted(set(names))
    return classes, {name: i for i, name in enumerate(classes)}


# ---------------------------------------------------------------- the synthetic source, behind the registry


def build_synthetic_source(opts: BuildOptions) -> BuildReport:
    """The synthetic tri-modal source (data_pipeline.synthetic), unchanged."""
    from data_pipeline.synthetic import SyntheticSpec, build_synthetic

    if opts.input is not None or opts.cache is not None or opts.skip_bad:
        raise SourceError("--source synthetic takes no --input, --cache or --skip-bad")
    kwargs: dict[str, Any] = {"shard_size": opts.shard_size, "seed": opts.seed}
    if opts.num_samples is not None:
        kwargs["num_samples"] = opts.num_samples
    if opts.image_size is not None:
        kwargs["image_size"] = opts.image_size
    if opts.missing is not None:
        kwargs["missing"] = tuple(opts.missing)
    if opts.split_fractions is not None:
        kwargs["split_fractions"] = tuple(opts.split_fractions)
    indexes = build_synthetic(opts.out, SyntheticSpec(**kwargs), progress=opts.progress)
    return BuildReport(indexes, f"wrote {opts.out}: {split_summary(indexes)}")
