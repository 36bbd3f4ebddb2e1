"""`calmrl embed`: embeddings of every record of a folder, a manifest or a shard split, as Parquet.

Inputs, as users have them:
- a folder: files sharing a stem form a record, as `calmrl data build --source folder` reads
  it (DIR/dogs/dog1.png + dog1.txt + dog1.wav -> record "dogs/dog1"); several audio files of
  one stem: the first by name is embedded;
- a JSONL manifest (`--source jsonl`'s format: image, caption, audio, id; paths relative to
  the manifest's folder; several audio tracks: the first);
- a shard split (a folder or s3:// prefix holding index.json), decoded by the training
  decoder itself (`SampleDecoder`, audio track by `data.audio_policy`).
Records are decoded and encoded as in training (`pretrain.encoder.Encoder`); with
`complete` the calibrator imputes what each record lacks. A record that cannot be used (a
file that does not decode, nothing usable, a bad manifest line) is counted and reported by
key, in the summary and in the file's metadata (`bad`), never dropped silently.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_pipeline.contract import MODALITIES
from data_pipeline.decode import TEXT_EXTENSIONS
from data_pipeline.errors import DataError
from data_pipeline.samples import SampleDecoder, collate
from data_pipeline.sources.common import AUDIO_SUFFIXES, IMAGE_SUFFIXES
from data_pipeline.split import open_split
from data_pipeline.storage import is_remote
from data_pipeline.tar_reading import BadInputLog, raw_samples
from data_pipeline.wire import init_loader_worker, keep_as_is
from evals.vector_file import THUMBNAIL_SIDE, VectorFileWriter, VectorRows
from pretrain.encoder import Encoder, InputError

TEXT_SUFFIXES = tuple(f".{e}" for e in TEXT_EXTENSIONS)


class EmbedInputError(ValueError):
    """The --input is not a folder, a manifest or a split."""


@dataclass
class InputRecord:
    """One record to embed: its key, where each part comes from, and the parts themselves."""

    key: str
    image: str | bytes | None = None
    text: str | None = None
    audio: str | bytes | None = None
    sources: dict[str, str] = field(default_factory=dict)  # modality -> file path or URL#key
    sample: dict[str, Any] | None = None  # already decoded (shard splits)
    error: str | None = None  # a record that cannot be used, and why


@dataclass
class EmbedReport:
    path: Path
    records: int
    rows: int
    observed: dict[str, int]
    imputed: dict[str, int]
    bad: dict[str, str]
    seconds: float

    @property
    def summary(self) -> str:
        obs = ", ".join(f"{m} {self.observed[m]}" for m in MODALITIES)
        imp = ", ".join(f"{m} {self.imputed[m]}" for m in MODALITIES if self.imputed[m])
        bad = f"; {len(self.bad)} bad records: " + ", ".join(list(self.bad)[:5]) if self.bad else "; no bad record"
        rate = self.records / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"embedded {self.records} records into {self.path} ({self.rows} vectors; observed {obs}"
            + (f"; imputed {imp}" if imp else "")
            + f"){bad} in {self.seconds:.1f} s ({rate:.1f} records/s)"
        )


# -- inputs -------------------------------------------------------------------
def folder_records(root: Path) -> list[InputRecord]:
    groups: dict[str, list[Path]] = {}
    known = IMAGE_SUFFIXES + TEXT_SUFFIXES + AUDIO_SUFFIXES
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in known:
            groups.setdefault(str(rel.with_suffix("")), []).append(path)
    if not groups:
        raise EmbedInputError(
            f"--input {root}: no image ({', '.join(IMAGE_SUFFIXES)}), caption (.txt) or audio "
            f"({', '.join(AUDIO_SUFFIXES)}) file found"
        )
    records = []
    for stem, files in groups.items():
        record = InputRecord(stem)
        by_kind: dict[str, list[Path]] = {}
        for f in files:
            s = f.suffix.lower()
            kind = "image" if s in IMAGE_SUFFIXES else "text" if s in TEXT_SUFFIXES else "audio"
            by_kind.setdefault(kind, []).append(f)
        if len(by_kind.get("image", [])) > 1:
            record.error = f"two images with one stem: {', '.join(str(p) for p in by_kind['image'])} (which one?)"
        elif "image" in by_kind:
            record.image = str(by_kind["image"][0])
            record.sources["image"] = record.image
        if "text" in by_kind:
            try:
                caption = by_kind["text"][0].read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as exc:
                record.error = f"{by_kind['text'][0]}: caption is not UTF-8 ({exc})"
                caption = ""
            if caption:
                record.text = caption
                record.sources["text"] = str(by_kind["text"][0])
        if "audio" in by_kind:
            record.audio = str(by_kind["audio"][0])
            record.sources["audio"] = record.audio
        records.append(record)
    return records


def _first_track(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) else None


def manifest_records(manifest: Path) -> list[InputRecord]:
    base = manifest.parent
    records: list[InputRecord] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("a line must be a JSON object")
        except ValueError as exc:
            records.append(InputRecord(f"line-{number}", error=f"{where}: not a JSON object ({exc})"))
            continue
        image, audio = obj.get("image"), _first_track(obj.get("audio"))
        caption = obj.get("caption")
        name = str(obj.get("id") or image or audio or caption or f"line-{number}")
        count = seen.get(name, 0)
        seen[name] = count + 1
        record = InputRecord(name if count == 0 else f"{name}-{count}")
        if image:
            record.image = str(base / image)
            record.sources["image"] = record.image
        if isinstance(caption, str) and caption.strip():
            record.text = caption.strip()
            record.sources["text"] = where
        if audio:
            record.audio = str(base / audio)
            record.sources["audio"] = record.audio
        records.append(record)
    if not records:
        raise EmbedInputError(f"--input {manifest}: the manifest holds no record")
    return records


def split_records(split_dir: str, encoder: Encoder) -> tuple[int, Iterator[InputRecord]]:
    """(number of samples, records) of a shard split, decoded by the training decoder."""
    cfg = encoder.cfg.data
    split = open_split(split_dir, cfg.tokenizer)
    decoder = SampleDecoder(cfg, encoder.tokenizer_json)

    def records() -> Iterator[InputRecord]:
        bad = BadInputLog()
        for raw in raw_samples(split.shards, bad, split.count_of, split.layout_of):
            key = str(raw.get("__key__"))
            url = f"{raw.get('__url__')}#{key}"
            try:
                sample = decoder(raw)
            except DataError as exc:
                yield InputRecord(key, error=str(exc))
                continue
            caption = raw.get("txt")
            record = InputRecord(
                key, sample=sample, text=caption.decode("utf-8", "replace").strip() if caption else None
            )
            record.sources = {m: url for m, p in zip(MODALITIES, sample["present"]) if p}
            yield record
        if bad.count:  # a shard that broke off: what it lost is reported, never dropped silently
            yield InputRecord(f"<{bad.count} samples of broken shards>", error=bad.first or "shard broke off")

    return split.num_samples, records()


def open_inputs(source: str, encoder: Encoder) -> tuple[int, Iterator[InputRecord]]:
    """The records of --input: a split (index.json), a manifest (.jsonl) or a folder."""
    if is_remote(source):
        return split_records(source, encoder)
    path = Path(source)
    if not path.exists():
        raise EmbedInputError(f"--input {path}: no such file or folder")
    if path.is_dir() and (path / "index.json").is_file():
        return split_records(str(path), encoder)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        recs = manifest_records(path)
        return len(recs), iter(recs)
    if path.is_dir():
        recs = folder_records(path)
        return len(recs), iter(recs)
    raise EmbedInputError(
        f"--input {path}: give a folder of files, a JSONL manifest (.jsonl) or a shard split (a folder with index.json)"
    )


# -- output -------------------------------------------------------------------
def thumbnail(image: torch.Tensor) -> bytes:
    """PNG of at most THUMBNAIL_SIDE px from a decoded image [3, S, S] in [-1, 1]."""
    array = ((image.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class _DecodedBatches(IterableDataset):
    """The records of --input decoded and collated in batches (in loader workers when asked,
    so decoding overlaps the forward pass); each item carries its records' keys, sources,
    captions and thumbnails, and the records that could not be used."""

    def __init__(self, encoder: Encoder, source: str, batch_size: int):
        super().__init__()
        self.encoder, self.source, self.batch_size = encoder, source, batch_size

    def _pack(self, pending: list[InputRecord], bad: list[tuple[str, str]]) -> dict[str, Any]:
        samples = [r.sample for r in pending if r.sample is not None]
        return {
            "batch": collate(samples, self.encoder.cfg.data, self.encoder.audio_format, len(samples))
            if samples
            else None,
            "records": [(r.key, r.sources, r.text) for r in pending],
            "thumbnails": [thumbnail(s["image"]) if "image" in s else None for s in samples],
            "bad": bad,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        _, records = open_inputs(self.source, self.encoder)
        pending: list[InputRecord] = []
        bad: list[tuple[str, str]] = []
        for index, record in enumerate(records):
            if index % parts != part:  # records dealt round-robin to the workers
                continue
            if record.error is None and record.sample is None:
                try:
                    record.sample = self.encoder.decode(index, record.image, record.text, record.audio)
                except InputError as exc:
                    record.error = str(exc).split(": ", 1)[1]
            if record.error is not None:
                bad.append((record.key, record.error))
                continue
            pending.append(record)
            if len(pending) == self.batch_size:
                yield self._pack(pending, bad)
                pending, bad = [], []
        if pending or bad:
            yield self._pack(pending, bad)


def embed_inputs(
    model: str | Path,
    source: str,
    out: str | Path,
    complete: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    encoder: Encoder | None = None,
    progress: bool = True,
    workers: int = 1,
) -> EmbedReport:
    """Embed every record of `source` into the Parquet file `out` (see the module doc);
    `workers` loader processes decode while this one encodes (0: decode here)."""
    start = time.perf_counter()
    encoder = encoder or Encoder.load(model, device=device)
    if complete and not encoder.has_calibrator:
        raise ValueError(
            f"{model} was trained with calibration.method={encoder.cfg.calibration.method}: it has no calibrator; "
            "embed without --complete"
        )
    total, _ = open_inputs(source, encoder)  # a wrong --input fails here, before any worker starts
    observed = dict.fromkeys(MODALITIES, 0)
    imputed = dict.fromkeys(MODALITIES, 0)
    bad: dict[str, str] = {}
    count = 0
    meta = {"model": str(model), "input": str(source), "complete": complete}
    loader = DataLoader(
        _DecodedBatches(encoder, source, batch_size),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=init_loader_worker if workers > 0 else None,
        collate_fn=keep_as_is,
    )
    with VectorFileWriter(out, encoder.dim, meta) as writer:
        bar = tqdm(total=total, desc="embed", unit="record", disable=not progress)
        for item in loader:
            bad.update(dict(item["bad"]))
            bar.update(len(item["bad"]))
            if item["batch"] is None:
                continue
            encoded = encoder.encode_batch(item["batch"], complete)
            rows = VectorRows()
            for i, ((key, sources, caption), thumb) in enumerate(zip(item["records"], item["thumbnails"])):
                for j, m in enumerate(MODALITIES):
                    if bool(encoded.observed[i, j]):
                        observed[m] += 1
                        rows.add(key, m, True, encoded.emb[m][i].numpy(), None, sources.get(m), caption, thumb)
                    elif bool(encoded.imputed[i, j]):
                        imputed[m] += 1
                        variance = float(encoded.variance[m][i])
                        rows.add(key, m, False, encoded.emb[m][i].numpy(), variance, None, caption, thumb)
            writer.write(rows)
            count += len(item["records"])
            bar.update(len(item["records"]))
        bar.close()
        if count == 0:
            first = next(iter(bad.items()), ("", ""))
            raise EmbedInputError(f"--input {source}: none of its {len(bad)} records could be used (first: {first})")
        extra = {"counts": {"records": count, "observed": observed, "imputed": imputed}, "bad": bad}
        path = writer.close(extra)
    rows_written = sum(observed.values()) + sum(imputed.values())
    return EmbedReport(path, count, rows_written, observed, imputed, bad, time.perf_counter() - start)
