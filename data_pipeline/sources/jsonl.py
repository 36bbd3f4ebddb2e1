"""A user's own data as a JSONL manifest, one record per line:

    {"image": "img/dog1.png", "caption": "a dog", "audio": "snd/dog1.ogg", "label": "dog"}
    {"caption": "only text", "label": "cat"}
    {"image": "img/cat.jpg", "audio": ["a.ogg", {"path": "b.wav", "kind": "speech", "lang": "fr"}]}

Every field is optional: `image` (a path: PNG, JPEG, WebP stored as they are,
other Pillow formats re-encoded to PNG, SVG rasterised to PNG), `caption`
(text; "" or blank = absent, counted), `audio` (WAV, FLAC, OGG or MP3 at any
sample rate: a path, or a list of paths / {"path", "kind", "lang"} objects:
several tracks), `label` (a class name, or an integer class id; one kind per
manifest), `id` (the record's name; default: the image path, else the first
audio path, else the caption) and `meta` (an object kept in the metadata).
Paths are relative to the manifest's folder. Any other field is an error (a
typo would otherwise drop a modality silently). Blank lines are skipped.

Lines with the same id (e.g. one image with five captions) go to the same
split and get keys `name`, `name-1`, ... Errors name the line and the file;
--skip-bad counts and skips unusable lines instead. A file that does not
decode (or is missing) leaves its modality absent and the record keeps the
rest (common.Dropped); a record left with nothing is a bad record.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from data_pipeline.sources import BuildOptions, BuildReport, SourceError
from data_pipeline.sources.common import (
    AUDIO_SUFFIXES,
    SKIP_BAD_HINT,
    BadRecord,
    Dropped,
    KeyMaker,
    Record,
    Track,
    assemble,
    check_audio,
    check_image,
    format_counts,
    read_file,
    salvage_summary,
    split_summary,
    write_records,
)
from data_pipeline.sources.folder import reject_synthetic_flags

FIELDS = {"id", "image", "caption", "audio", "label", "meta"}


def _where(manifest: Path, line: int) -> str:
    return f"{manifest}:{line}"


def _track_specs(value: Any, where: str) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    specs = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "kind", "lang"}:
            raise BadRecord(
                "bad_line",
                f"{where}: 'audio' must be a path, or a list of paths or of "
                f'{{"path", "kind", "lang"}} objects; got {json.dumps(item)[:120]}',
            )
        specs.append(item)
    return specs


def _parse_line(text: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord("bad_line", f"{where}: not JSON ({exc.msg} at column {exc.colno}); {SKIP_BAD_HINT}") from None
    if not isinstance(obj, dict):
        raise BadRecord("bad_line", f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - FIELDS
    if unknown:
        raise BadRecord(
            "bad_line",
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
            f"the fields are {', '.join(sorted(FIELDS))} (put anything else under 'meta')",
        )
    for name in ("id", "image", "caption"):
        if name in obj and obj[name] is not None and not isinstance(obj[name], str):
            raise BadRecord("bad_line", f"{where}: '{name}' must be a string")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        raise BadRecord("bad_line", f"{where}: 'meta' must be an object")
    label = obj.get("label")
    if label is not None and (
        isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, int) and label < 0)
    ):
        raise BadRecord("bad_line", f"{where}: 'label' must be a class name or a non-negative integer")
    obj["audio"] = _track_specs(obj["audio"], where) if obj.get("audio") is not None else []
    return obj


def _load(
    obj: dict[str, Any],
    base: Path,
    key: str,
    label: int,
    manifest: Path,
    line: int,
    counters: Counter[str],
    opts: BuildOptions,
) -> dict[str, Any]:
    where = _where(manifest, line)

    def resolve(rel: str, what: str) -> tuple[Path, str]:
        path = base / rel
        origin = f"{where}: {what} {path}"
        if not path.is_file():
            raise BadRecord(
                "missing_file",
                f"{origin} does not exist (paths are relative to the manifest's "
                f"folder {base}); fix the path, {SKIP_BAD_HINT}",
            )
        return path, origin

    meta: dict[str, Any] = {
        "source": "jsonl",
        "label": label,
        "class": obj.get("label"),
        "line": line,
        "id": obj.get("id"),
        "meta": obj.get("meta", {}),
    }
    dropped = Dropped()  # a file that does not decode leaves its modality absent, not the record

    def load_image(rel: str) -> tuple[str, bytes, dict[str, Any]]:
        path, origin = resolve(rel, "image")
        return check_image(read_file(path, origin), origin, opts.max_image_side, opts.max_image_pixels, path.parent)

    image = None
    if obj.get("image"):
        checked = dropped.attempt("image", obj["image"], partial(load_image, obj["image"]))
        if checked is not None:
            ext, data, info = checked
            image = (ext, data)
            meta["image"] = {"file": obj["image"], **info}
    caption = (obj.get("caption") or "").strip() or None
    if "caption" in obj and caption is None:
        counters["empty_captions"] += 1
        meta["text_absent"] = "empty_caption"

    def load_track(spec: dict[str, Any]) -> Track:
        path, origin = resolve(spec["path"], "audio")
        ext = path.suffix.lower()
        if ext not in AUDIO_SUFFIXES:
            raise BadRecord(
                "bad_audio", f"{origin}: audio must be {', '.join(AUDIO_SUFFIXES)}; convert it, {SKIP_BAD_HINT}"
            )
        data = read_file(path, origin)
        info = check_audio(data, origin)
        return Track(data, ext.lstrip("."), spec.get("kind"), spec.get("lang"), {"file": spec["path"], **info})

    tracks = []
    for spec in obj["audio"]:
        track = dropped.attempt("audio", spec["path"], partial(load_track, spec))
        if track is not None:
            tracks.append(track)
    return assemble(key, meta, image, caption, tracks, dropped)


def build_jsonl(opts: BuildOptions) -> BuildReport:
    reject_synthetic_flags(opts, "jsonl")
    if opts.input is None:
        raise SourceError("--source jsonl needs --input MANIFEST.jsonl")
    manifest = Path(opts.input)
    if not manifest.is_file():
        raise SourceError(f"--input {manifest}: no such manifest file")
    base = manifest.parent
    counters: Counter[str] = Counter()
    parsed: list[tuple[int, dict[str, Any]]] = []
    bad_lines = 0
    with open(manifest, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = _where(manifest, number)
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                text = None
            try:
                if text is None:
                    raise BadRecord("bad_line", f"{where}: not UTF-8; {SKIP_BAD_HINT}")
                if not text.strip():
                    continue
                parsed.append((number, _parse_line(text, where)))
            except BadRecord as bad:
                if not opts.skip_bad:
                    raise SourceError(str(bad)) from bad
                bad_lines += 1
    labels = [obj["label"] for _, obj in parsed if obj.get("label") is not None]
    if any(isinstance(v, str) for v in labels) and any(isinstance(v, int) for v in labels):
        first_int = next(n for n, obj in parsed if isinstance(obj.get("label"), int))
        raise SourceError(
            f"{_where(manifest, first_int)}: 'label' mixes class names and integers in one manifest; use one kind"
        )
    classes: list[str] | None = None
    class_id: dict[str, int] = {}
    if labels and isinstance(labels[0], str):
        names = sorted(set(labels))
        classes, class_id = names, {name: i for i, name in enumerate(names)}
        num_classes = len(names)
    else:
        num_classes = max(labels) + 1 if labels else 0
    make_key = KeyMaker()
    seen: Counter[str] = Counter()
    records = []
    for number, obj in parsed:
        audio0 = obj["audio"][0]["path"] if obj["audio"] else None
        name = obj.get("id") or obj.get("image") or audio0 or (obj.get("caption") or "").strip() or f"line{number}"
        group = name
        seen[group] += 1
        key = make_key(name if seen[group] == 1 else f"{name}-{seen[group] - 1}")
        label = obj.get("label")
        label_id = class_id[label] if isinstance(label, str) else (label if label is not None else -1)
        records.append(Record(key, group, partial(_load, obj, base, key, label_id, manifest, number, counters, opts)))
    extra: dict[str, Any] = {"num_classes": num_classes, "manifest": str(manifest)}
    if classes is not None:
        extra["classes"] = classes
    build = {
        "manifest": str(manifest),
        "lines": len(parsed) + bad_lines,
        "bad_lines_skipped": bad_lines,
        "counters": counters,
    }
    result = write_records(
        opts, "jsonl", records, extra, build, skipped_before={"bad_line": bad_lines} if bad_lines else None
    )
    skipped = result.skipped
    summary = (
        f"wrote {opts.out} from {manifest}: {len(records)} records ({split_summary(result.indexes)}); "
        f"patterns: {format_counts(dict(result.totals))}; {num_classes} classes; "
        f"empty captions {counters['empty_captions']}, skipped {format_counts(dict(skipped))}"
        + salvage_summary(result, opts.max_image_side)
    )
    return BuildReport(result.indexes, summary, {"build": build})
