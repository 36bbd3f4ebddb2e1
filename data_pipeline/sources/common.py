"""What every source shares: keys, the split by hash, checking one file of each
modality, assembling a sample, and writing train/val/test plus the tokenizer.

A sample written by a source is
    KEY.json                 metadata (below)
    KEY.png|jpg|webp         the image bytes as found (other formats re-encoded to PNG;
                             SVG rasterised to PNG, `rasterise_svg`)
    KEY.txt                  the English caption, UTF-8, never empty
    KEY.audio{i}.ogg|flac|wav|mp3  audio track i, the original container kept
and its metadata holds `source`, `split`, `label` (-1: none), `modalities`
(a subset of image, text, audio in that order; audio iff there is a track) and
`audio_tracks`: [{"name": "audio0.ogg", "kind": ..., "lang": ..., "file": ...,
"sample_rate": ..., "channels": ..., "seconds": ...}] in entry order.

An SVG picture (found by content, `decode.is_svg`) is rasterised by resvg to a
longest side of `decode.SVG_SIDE` (512) and stored as PNG with alpha, its
metadata saying `rasterised_from: "svg"`; one that does not rasterise is
`bad_svg`.

A file that does not decode costs its record only that modality (`Dropped`:
`MODALITY_absent` and `dropped` in the metadata, `build.dropped` in every
index); pictures longer than `max_image_side` are downscaled (`check_image`). A
record with nothing usable left raises `BadRecord`; the build stops with a
`SourceError` naming the file and the fix, or with --skip-bad counts it (per
reason, in every index's `build.skipped`) and goes on. A record left with no
modality (e.g. only an empty caption) is always counted and skipped: docs/design.md
says such a sample is an error in the data, never written.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import soundfile
from PIL import Image
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.contract import pattern_name
from data_pipeline.decode import DecodeError, is_svg, rasterise_svg
from data_pipeline.shards import ShardSetWriter
from data_pipeline.sources import (
    DEFAULT_SPLIT_FRACTIONS,
    MAX_DECODE_PIXELS,
    MAX_IMAGE_SIDE,
    SPLITS,
    BuildOptions,
    BuildReport,
    SourceError,
)
from data_pipeline.tokenizer import train_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg")
AUDIO_SUFFIXES = (".ogg", ".flac", ".wav", ".mp3")
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


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb check off while check_image opens, decodes and
    downscales one picture: check_image applies its own limit (`max_pixels`) to
    the size it is about to decode, so an oversized picture is downscaled, or
    refused with a reason, instead of raising DecompressionBombError or warning
    once per file. The limit is Pillow's module setting, so it is restored right
    after, under a lock."""
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_image(
    data: bytes,
    origin: str,
    max_side: int = MAX_IMAGE_SIDE,
    max_pixels: int = MAX_DECODE_PIXELS,
    folder: Path | None = None,
) -> tuple[str, bytes, dict[str, Any]]:
    """Decode fully; return (entry extension, bytes to store, info).

    A picture whose longest side exceeds `max_side` is downscaled to it (JPEG
    decoded at a reduced scale with `draft`, then `thumbnail`) and stored
    re-encoded (JPEG stays JPEG, anything else becomes PNG); `info` then holds
    its `original_size`. One with more than `max_pixels` to decode raises
    BadRecord("image_too_large").

    SVG bytes are first rasterised (`rasterise_svg`: longest side SVG_SIDE, alpha
    kept; a picture it refers to by a relative path is read from `folder`, the
    file's own) and the PNG is what is checked and stored; `info` then holds
    `rasterised_from: "svg"`. One that does not rasterise raises
    BadRecord("bad_svg") naming `origin`."""
    rasterised = is_svg(data)
    if rasterised:
        try:
            data = rasterise_svg(data, origin, folder=folder)
        except DecodeError as exc:
            raise BadRecord("bad_svg", f"{exc}, {SKIP_BAD_HINT}") from exc
    try:
        with _pixel_limit(), Image.open(io.BytesIO(data)) as img:
            fmt, original = img.format, img.size
            too_big = max(original) > max_side
            if too_big:
                img.draft(None, (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            if img.width * img.height > max_pixels:
                raise BadRecord(
                    "image_too_large",
                    f"{origin}: image of {original[0]} x {original[1]} pixels is larger than the "
                    f"{max_pixels:,} pixels the build decodes; downscale it (longest side {max_side} is "
                    f"what is stored), {SKIP_BAD_HINT}",
                )
            img.load()
            mode, (width, height) = img.mode, img.size
            has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
            ext = STORED_IMAGE_FORMATS.get(fmt or "")
            if too_big:
                img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                width, height = img.size
                ext = "jpg" if fmt == "JPEG" else "png"
            if too_big or ext is None:  # downscaled, or a format the reader does not take as-is
                buf = io.BytesIO()
                if ext == "jpg":
                    img.save(buf, format="JPEG", quality=95)
                else:
                    img.save(buf, format="PNG")
                data, ext = buf.getvalue(), ext or "png"
    except BadRecord:
        raise
    except Exception as exc:  # PIL raises many types for bad bytes
        raise BadRecord(
            "bad_image",
            f"{origin}: image does not decode ({type(exc).__name__}: {exc}); "
            f"replace or delete the file, {SKIP_BAD_HINT}",
        ) from exc
    info: dict[str, Any] = {"width": width, "height": height, "mode": mode, "has_alpha": has_alpha, "format": fmt}
    if too_big:
        info["original_size"] = list(original)
    if rasterised:
        info["rasterised_from"] = "svg"
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
    ext: str  # ogg | flac | wav | mp3
    kind: str | None  # effect | description | speech | ... (None: not known)
    lang: str | None
    info: dict[str, Any] = field(default_factory=dict)  # file, sample_rate, channels, seconds


T = TypeVar("T")


class Dropped:
    """The files of one record that did not decode: the record goes on without
    them and keeps what does decode. Each becomes an entry of the metadata's
    `dropped` list ({"modality", "file", "reason", "error"}); a modality left
    with nothing gets `MODALITY_absent: REASON` (as tuxpaint's `svg_only`)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.errors: list[BadRecord] = []

    def attempt(self, modality: str, file: str, load: Callable[[], T]) -> T | None:
        """`load()`, or None when it raises BadRecord (recorded)."""
        try:
            return load()
        except BadRecord as bad:
            error = str(bad).replace(f", {SKIP_BAD_HINT}", "").replace(f"; {SKIP_BAD_HINT}", "")
            self.entries.append({"modality": modality, "file": file, "reason": bad.reason, "error": error})
            self.errors.append(bad)
            return None

    def image(
        self, path: Path, file: str, origin: str, opts: BuildOptions
    ) -> tuple[tuple[str, bytes], dict[str, Any]] | None:
        """A picture read and checked (`check_image`), as ((ext, bytes), info); None, recorded
        here as dropped, when it does not decode. `file` is its name in the metadata,
        `origin` in error messages."""
        checked = self.attempt(
            "image",
            file,
            lambda: check_image(read_file(path, file), origin, opts.max_image_side, opts.max_image_pixels, path.parent),
        )
        if checked is None:
            return None
        ext, data, info = checked
        return (ext, data), info

    def entries_for(self, modality: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["modality"] == modality]


def assemble(
    key: str,
    meta: dict[str, Any],
    image: tuple[str, bytes] | None,
    caption: str | None,
    tracks: list[Track],
    dropped: Dropped | None = None,
) -> dict[str, Any]:
    """A sample for ShardSetWriter; metadata gets `modalities` and `audio_tracks`,
    and, when files were dropped, `dropped` and `MODALITY_absent` for a modality
    left with nothing. A record whose every file was dropped raises the first
    file's BadRecord: nothing usable is left, so it is a bad record."""
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
    if dropped is not None and dropped.entries:
        if not modalities:
            first = dropped.errors[0]
            more = len(dropped.errors) - 1
            raise BadRecord(first.reason, str(first) + (f" (and {more} more file(s) of this record)" if more else ""))
        for entry in dropped.entries:
            if entry["modality"] not in modalities and not meta.get(f"{entry['modality']}_absent"):
                meta[f"{entry['modality']}_absent"] = entry["reason"]
        meta["dropped"] = dropped.entries
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
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # modality -> reason -> files dropped
    downscaled: int = 0  # pictures stored downscaled (longer than --max_image_side)


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
    dropped: dict[str, Counter[str]] = {}  # over the records written; a skipped record counts in `skipped`
    downscaled = 0
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
            for entry in meta.get("dropped", ()):
                dropped.setdefault(entry["modality"], Counter())[entry["reason"]] += 1
            downscaled += "original_size" in meta.get("image", {})
            if split == "train" and "txt" in sample:
                train_captions.append(sample["txt"].decode("utf-8"))
        bar.close()
        build = {
            **(build_info or {}),
            "records": len(records),
            "written": written,
            "skipped": dict(sorted(skipped.items())),
        }
        # Only when something happened, so a clean build's index stays as it was.
        if dropped:
            build["dropped"] = {m: dict(sorted(c.items())) for m, c in sorted(dropped.items())}
        if downscaled:
            build["images_downscaled"] = {"count": downscaled, "max_side": opts.max_image_side}
        for split, writer in writers.items():
            writer.extra_index.update(stats[split].to_index())
            writer.extra_index["build"] = build
    indexes = {split: _written_index(writers[split]) for split in SPLITS}
    write_tokenizer(out, train_captions, opts.vocab_size)
    return WriteResult(indexes, skipped, written, totals, dropped, downscaled)


def salvage_summary(result: WriteResult, max_side: int) -> str:
    """'; dropped files (record kept): image bad_image 2, ...; images downscaled ...', or '' when none."""
    parts = []
    if result.dropped:
        counts = {f"{m} {r}": n for m, c in result.dropped.items() for r, n in c.items()}
        parts.append(f"dropped files (their records kept the rest): {format_counts(counts)}")
    if result.downscaled:
        parts.append(f"images downscaled to a longest side of {max_side}: {result.downscaled}")
    return "".join(f"; {p}" for p in parts)


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
