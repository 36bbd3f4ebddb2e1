"""A user's own data as a folder: files sharing a stem form one record.

    DIR/dogs/dog1.png   DIR/dogs/dog1.txt   DIR/dogs/dog1.wav   -> record "dogs/dog1", label "dogs"
    DIR/cats/cat7.jpg                                           -> record "cats/cat7", image only
    DIR/misc.txt                                                -> record "misc", no label (-1)

- image: .png .jpg .jpeg .webp (stored as they are), .bmp .gif .tif .tiff
  (re-encoded to PNG) or .svg (rasterised to a longest side of 512 with alpha,
  stored as PNG: common.check_image); two images with one stem are an error
  (which one?).
- text: .txt, UTF-8, the whole file stripped. An empty or blank caption file
  means the text is absent (counted in `build.empty_captions`), not an error.
- audio: .ogg .flac .wav .mp3 (any sample rate); several files with one stem (dog1.ogg, dog1.wav)
  are several tracks of the record (kind and lang unknown: null).
- label: the first-level subfolder; records directly in DIR have label -1.
  `classes` in the index lists the subfolder names, sorted.
Other files (and hidden ones) are ignored and counted. A file that cannot be
decoded leaves its modality absent (`MODALITY_absent` and `dropped` in the
metadata, counted in `build.dropped`) and the record keeps the rest; a record
with nothing usable left stops the build with the file's path and the fix, or,
with --skip-bad, is skipped and counted; a record with no file of any modality
left (only an empty caption) is skipped and counted. The split is by the hash of the record's path (--split-fractions).
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from data_pipeline.sources import BuildOptions, BuildReport, SourceError
from data_pipeline.sources.common import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    SKIP_BAD_HINT,
    TEXT_SUFFIXES,
    BadRecord,
    Dropped,
    KeyMaker,
    Record,
    Track,
    assemble,
    check_audio,
    check_caption,
    format_counts,
    label_classes,
    read_file,
    salvage_summary,
    split_summary,
    write_records,
)


def reject_synthetic_flags(opts: BuildOptions, source: str) -> None:
    if opts.num_samples is not None or opts.image_size is not None or opts.cache is not None:
        raise SourceError(f"--source {source} takes no --num-samples, --image-size or --cache")


def _load(
    files: list[Path],
    root: Path,
    key: str,
    stem: str,
    label: int,
    label_name: str | None,
    counters: Counter[str],
    opts: BuildOptions,
) -> dict[str, Any]:
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    audios = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    if len(images) > 1:
        raise BadRecord(
            "ambiguous_image",
            f"{root}: record '{stem}' has {len(images)} images "
            f"({', '.join(rel(p) for p in images)}); keep one per stem, {SKIP_BAD_HINT}",
        )
    meta: dict[str, Any] = {
        "source": "folder",
        "label": label,
        "class": label_name,
        "record": stem,
        "files": [rel(p) for p in files],
    }
    dropped = Dropped()  # a file that does not decode leaves its modality absent, not the record
    image = None
    if images:
        path = images[0]
        checked = dropped.image(path, rel(path), str(path), opts)
        if checked is not None:
            image, info = checked
            meta["image"] = {"file": rel(path), **info}
    caption = None
    if texts:
        text = texts[0]
        caption = dropped.attempt("text", rel(text), lambda: check_caption(read_file(text, rel(text)), str(text)))
        if caption is None and not dropped.entries_for("text"):
            counters["empty_captions"] += 1
            meta["text_absent"] = "empty_caption"

    def load_track(path: Path) -> Track:
        data = read_file(path, rel(path))
        info = check_audio(data, str(path))
        return Track(data, path.suffix.lower().lstrip("."), None, None, {"file": rel(path), **info})

    tracks = []
    for path in audios:
        track = dropped.attempt("audio", rel(path), partial(load_track, path))
        if track is not None:
            tracks.append(track)
    return assemble(key, meta, image, caption, tracks, dropped)


def build_folder(opts: BuildOptions) -> BuildReport:
    reject_synthetic_flags(opts, "folder")
    if opts.input is None:
        raise SourceError(
            "--source folder needs --input DIR (a folder of NAME.png/.jpg/.svg, NAME.txt, NAME.wav/.ogg/.flac/.mp3)"
        )
    root = Path(opts.input)
    if not root.is_dir():
        raise SourceError(f"--input {root}: not a folder")
    known = IMAGE_SUFFIXES + TEXT_SUFFIXES + AUDIO_SUFFIXES
    groups: dict[str, list[Path]] = {}
    ignored = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            ignored += path.is_file()
            continue
        if not path.is_file():
            continue
        if path.suffix.lower() not in known:
            ignored += 1
            continue
        groups.setdefault(str(rel.with_suffix("")), []).append(path)
    if not groups:
        raise SourceError(
            f"--input {root}: no image ({', '.join(IMAGE_SUFFIXES)}), caption (.txt) or audio "
            f"({', '.join(AUDIO_SUFFIXES)}) file found"
        )
    labelled = {stem.split("/", 1)[0] for stem in groups if "/" in stem}
    classes, class_id = label_classes(labelled)
    counters: Counter[str] = Counter()
    build: dict[str, Any] = {"input": str(root), "ignored_files": ignored, "counters": counters}
    make_key = KeyMaker()
    records = []
    for stem, files in groups.items():
        name = stem.split("/", 1)[0] if "/" in stem else None
        label = class_id[name] if name is not None else -1
        key = make_key(stem)
        records.append(Record(key, stem, partial(_load, files, root, key, stem, label, name, counters, opts)))
    extra = {"num_classes": len(classes), "classes": classes, "input": str(root)}
    result = write_records(opts, "folder", records, extra, build)
    summary = (
        f"wrote {opts.out} from folder {root}: {len(records)} records ({split_summary(result.indexes)}); "
        f"patterns: {format_counts(dict(result.totals))}; {len(classes)} classes; "
        f"empty captions {counters['empty_captions']}, skipped {format_counts(dict(result.skipped))}, "
        f"ignored files {ignored}" + salvage_summary(result, opts.max_image_side)
    )
    return BuildReport(result.indexes, summary, {"build": build})
