"""The built-in real data set: Tux Paint's stamps (Debian `tuxpaint-stamps-default`).

A stamp is a file stem in a folder under `stamps/<category>/...` with a picture
(`NAME.png` and/or `NAME.svg`) or a caption file (`NAME.txt`). Its parts:
- image: the PNG bytes as shipped (real sizes, mostly RGBA/LA with a
  transparent background); a stamp with both `NAME.png` and `NAME.svg` keeps
  its PNG. A stamp with only `NAME.svg` gets it rasterised by resvg (the
  `resvg-py` wheel, no system library) to a longest side of 512 with alpha,
  stored as PNG, its metadata `image: {"file": "....svg", "rasterised_from":
  "svg", "width", "height", ...}`; an SVG that does not rasterise leaves the
  image absent (`image_absent: "bad_svg"`, in `dropped`). A stamp with neither
  has `image_absent: "no_image_file"`. `build.images` in the index counts the
  stamps by what their picture came from: `png`, `png+svg` (the PNG kept),
  `svg_rasterised`, `svg_not_rasterised`, `no_image_file`.
  `NAME_mirror.png` / `NAME_flip.png` are Tux Paint's alternate pictures of the
  same stamp, not stamps: they are counted and listed in `alternate_images`.
- text: the first line of `NAME.txt` (English); the following `LANG.utf8=...`
  lines are kept as `caption_translations` in the metadata.
- audio, every track kept, ordered effect first, then descriptions:
  `NAME.ogg` (kind "effect", lang null), `NAME_LANG.ogg` (a localized effect,
  e.g. a spoken digit), `NAME_desc.ogg` ("description", "en") and
  `NAME_desc_LANG.ogg|wav` ("description", LANG). An audio file naming no
  stamp of its folder exactly (Tux Paint matches exact names too) is an orphan:
  counted and listed in the index, not written.
- a file that does not decode leaves its modality absent (`image_absent:
  "bad_image"`, `dropped` in the metadata, `build.dropped` in the index) and
  the stamp keeps the rest; a stamp with nothing usable left is a bad record.
- label: the category (top-level folder), `classes` in the index.
The split is by stamp: the hash of its path (e.g. `animals/birds/blackbird`).

The package is fetched without root: `apt-get download` into the cache, its
SHA-256 checked against `apt-cache show`, then `dpkg-deb -x`. A marker written
after a verified extraction lets later builds reuse it (the .deb is re-hashed
every time).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write_json
from data_pipeline.cache import cache_dir
from data_pipeline.sources import BuildOptions, BuildReport, SourceError
from data_pipeline.sources.common import (
    BadRecord,
    Dropped,
    KeyMaker,
    Record,
    Track,
    assemble,
    check_audio,
    format_counts,
    label_classes,
    read_file,
    salvage_summary,
    split_summary,
    write_records,
)

PACKAGE = "tuxpaint-stamps-default"
STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")
APT_LISTS = Path("/var/lib/apt/lists")
MARKER = "extracted.json"
ALTERNATE_SUFFIXES = ("_mirror_flip", "_mirror", "_flip")
# What a stamp's picture came from, counted in the index's `build.images`.
IMAGE_COUNTS = ("png", "png+svg", "svg_rasterised", "svg_not_rasterised", "no_image_file")
TRANSLATION_LINE = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z]{2,3})?(?:@[A-Za-z]+)?)\.utf8=(.*)$")
# Reader policies over the audio tracks whose missing patterns the index reports.
AUDIO_POLICIES = {
    "all_tracks": lambda t: True,
    "effect": lambda t: t["kind"] == "effect",
    "english": lambda t: t["lang"] is None or t["lang"] == "en" or t["lang"].startswith("en_"),
    "description_en": lambda t: t["kind"] == "description" and t["lang"] == "en",
}


# ---------------------------------------------------------------- getting the package


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    sha256: str
    filename: str  # pool path, e.g. pool/main/t/tuxpaint-stamps/..._all.deb
    size: int


@dataclass(frozen=True)
class PreparedPackage:
    info: PackageInfo
    deb: Path
    stamps_dir: Path
    reused: bool  # an earlier verified extraction was used


def _apt_lists_empty() -> bool:
    return not any(APT_LISTS.glob("*Packages*"))


def _apt_failure(what: str, output: str) -> SourceError:
    said = " ".join(output.split())[-400:] or "nothing"
    if _apt_lists_empty():
        return SourceError(
            f"{what} failed: the APT package lists in {APT_LISTS} are empty (a fresh Debian image ships "
            f"none), so APT does not know {PACKAGE}. Run `apt-get update` as root once, then rerun. "
            f"(apt said: {said})"
        )
    return SourceError(
        f"{what} failed (apt said: {said}). {PACKAGE} is in Debian 'main' (bookworm and later): check "
        "your APT sources and refresh them with `apt-get update` as root, then rerun."
    )


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise SourceError(
            f"`{cmd[0]}` not found: the tuxpaint source downloads a Debian package and "
            "needs a Debian or Ubuntu system with APT and dpkg"
        ) from None


def apt_package_info(package: str = PACKAGE) -> PackageInfo:
    """Version and SHA-256 of the candidate version, from `apt-cache show`."""
    cmd = ["apt-cache", "show", "--no-all-versions", package]
    proc = _run(cmd)
    fields: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line and not line[0].isspace() and ":" in line:
            name, value = line.split(":", 1)
            fields.setdefault(name.strip(), value.strip())
    if proc.returncode != 0 or not {"Version", "SHA256", "Filename"} <= fields.keys():
        raise _apt_failure(f"`{' '.join(cmd)}`", proc.stderr + proc.stdout)
    return PackageInfo(
        package, fields["Version"], fields["SHA256"].lower(), fields["Filename"], int(fields.get("Size", 0))
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(deb: Path, info: PackageInfo, downloaded: bool) -> None:
    actual = sha256_file(deb)
    if actual == info.sha256:
        return
    origin = "downloaded" if downloaded else "cached"
    if downloaded:
        deb.unlink()
    raise SourceError(
        f"{origin} {deb}: SHA256 mismatch: the file has {actual} but `apt-cache show --no-all-versions "
        f"{info.name}` gives {info.sha256} for version {info.version}. The file is corrupt or was replaced: "
        + (
            "it was deleted; rerun to download it again."
            if downloaded
            else f"delete {deb} and rerun to download it again."
        )
    )


def _download(info: PackageInfo, cache: Path) -> Path:
    tmp = cache / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cmd = ["apt-get", "download", f"{info.name}={info.version}"]
        proc = _run(cmd, cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise _apt_failure(f"`{' '.join(cmd)}`", proc.stderr + proc.stdout)
        deb = cache / Path(info.filename).name
        os.replace(debs[0], deb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return deb


def _extract(deb: Path, info: PackageInfo, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)  # a partial extraction (no marker) from a crash
    target.mkdir(parents=True)
    tmp_root = target / "root.tmp"
    proc = _run(["dpkg-deb", "-x", str(deb), str(tmp_root)])
    if proc.returncode != 0:
        raise SourceError(f"`dpkg-deb -x {deb}` failed: {proc.stderr.strip()[-400:]}")
    os.replace(tmp_root, target / "root")
    if not (target / "root" / STAMPS_SUBDIR).is_dir():
        raise SourceError(f"{deb} holds no {STAMPS_SUBDIR}: not the expected {info.name} package")
    atomic_write_json(target / MARKER, {"package": asdict(info), "deb": deb.name})


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:  # concurrent builds share one download and extraction
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _recorded_extractions(cache: Path) -> list[PackageInfo]:
    found = []
    for marker in sorted(cache.glob(f"*/{MARKER}")):
        try:
            found.append(PackageInfo(**json.loads(marker.read_text())["package"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def prepare_package(cache: Path | None = None, package: str = PACKAGE) -> PreparedPackage:
    """Download (if needed), verify and extract the package under `cache/tuxpaint/`."""
    root = Path(cache or cache_dir()) / "tuxpaint"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        try:
            info = apt_package_info(package)
        except SourceError:
            recorded = [i for i in _recorded_extractions(root) if i.name == package]
            if len(recorded) != 1 or not (root / Path(recorded[0].filename).name).is_file():
                raise
            info = recorded[0]  # no APT here, but a verified extraction is: check the .deb against it
            print(
                f"calmrl: apt-cache cannot tell {package}'s checksum; using the cached {info.version} "
                "verified when it was extracted",
                file=sys.stderr,
            )
        deb = root / Path(info.filename).name
        downloaded = not deb.is_file()
        if downloaded:
            deb = _download(info, root)
        _verify(deb, info, downloaded)
        target = root / deb.name.removesuffix(".deb")
        marker = target / MARKER
        reused = False
        if marker.is_file() and (target / "root" / STAMPS_SUBDIR).is_dir():
            try:
                reused = json.loads(marker.read_text())["package"]["sha256"] == info.sha256
            except (ValueError, KeyError, TypeError):
                reused = False
        if not reused:
            _extract(deb, info, target)
    return PreparedPackage(info, deb, target / "root" / STAMPS_SUBDIR, reused)


# ---------------------------------------------------------------- reading the stamps


def _split_group(stamp: Stamp) -> str:
    """What decides a stamp's split: its lower-cased English caption when it has
    one, so variants that share a caption ("The letter J.", chess pieces) stay
    in one split and retrieval cannot match a test caption seen in training;
    else its path."""
    if stamp.txt is not None:
        try:
            caption, _, _ = parse_caption_file(stamp.txt.read_bytes())
        except (OSError, UnicodeDecodeError):
            caption = None
        if caption:
            return "caption:" + " ".join(caption.lower().split())
    return "path:" + stamp.rel


@dataclass
class Stamp:
    rel: str  # path of the stem under stamps/, e.g. "animals/birds/blackbird"
    category: str
    png: Path | None
    svg: Path | None
    txt: Path | None
    dat: Path | None
    tracks: list[tuple[Path, str, str | None]]  # (file, kind, lang), in entry order
    alternates: list[Path]


def parse_caption_file(data: bytes) -> tuple[str | None, dict[str, str], int]:
    """(English caption or None, {lang: translation}, unparsed lines)."""
    text = data.decode("utf-8-sig")
    lines = text.splitlines()
    english = None
    translations: dict[str, str] = {}
    unparsed = 0
    for i, line in enumerate(lines):
        match = TRANSLATION_LINE.match(line.strip())
        if match:
            translations.setdefault(match.group(1), match.group(2).strip())
        elif i == 0:
            english = line.strip() or None
        elif line.strip():
            unparsed += 1
    return english, translations, unparsed


def _known_languages(stamps_dir: Path) -> dict[str, str]:
    """lower-case code -> code as the caption files spell it (zh_tw -> zh_TW)."""
    langs = {"en": "en"}
    for txt in stamps_dir.rglob("*.txt"):
        for line in txt.read_bytes().decode("utf-8", "replace").splitlines()[1:]:
            match = TRANSLATION_LINE.match(line.strip())
            if match:
                langs.setdefault(match.group(1).lower(), match.group(1))
    return langs


def _match_audio(stem: str, stamps: set[str], langs: dict[str, str]) -> tuple[str, str, str | None] | None:
    """(stamp stem, kind, lang) that the audio file `stem` belongs to, the longest stamp name first."""
    if stem in stamps:
        return stem, "effect", None
    if stem.endswith("_desc") and stem[: -len("_desc")] in stamps:
        return stem[: -len("_desc")], "description", "en"
    for name in sorted((s for s in stamps if stem.startswith(s + "_")), key=len, reverse=True):
        rest = stem[len(name) + 1 :]
        if rest.startswith("desc_") and rest[5:].lower() in langs:
            return name, "description", langs[rest[5:].lower()]
        if rest.lower() in langs:
            return name, "effect", langs[rest.lower()]
    return None


def _track_order(track: tuple[Path, str, str | None]) -> tuple:
    _, kind, lang = track
    return (kind != "effect", lang is not None, lang != "en", lang or "")


def scan_stamps(stamps_dir: Path) -> tuple[list[Stamp], list[str]]:
    """Every stamp under `stamps_dir` and the orphan audio files (relative paths)."""
    langs = _known_languages(stamps_dir)
    stamps: list[Stamp] = []
    orphans: list[str] = []
    for folder in sorted([stamps_dir, *(p for p in stamps_dir.rglob("*") if p.is_dir())]):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        by_suffix: dict[str, dict[str, Path]] = {}
        for p in files:
            by_suffix.setdefault(p.suffix.lower(), {})[p.stem] = p
        images = set(by_suffix.get(".png", {})) | set(by_suffix.get(".svg", {}))
        captions = set(by_suffix.get(".txt", {}))
        alternates: dict[str, list[Path]] = {}
        for stem in sorted(images):
            for suffix in ALTERNATE_SUFFIXES:
                base = stem[: -len(suffix)]
                if stem.endswith(suffix) and base in (images | captions) - {stem}:
                    alternates.setdefault(base, []).extend(
                        by_suffix[ext][stem] for ext in (".png", ".svg") if stem in by_suffix.get(ext, {})
                    )
                    break
        alternate_stems = {p.stem for ps in alternates.values() for p in ps}
        names = (images - alternate_stems) | captions
        tracks: dict[str, list[tuple[Path, str, str | None]]] = {n: [] for n in names}
        for ext in (".ogg", ".wav", ".flac"):
            for stem, path in by_suffix.get(ext, {}).items():
                match = _match_audio(stem, names, langs)
                if match is None:
                    orphans.append(str(path.relative_to(stamps_dir)))
                else:
                    tracks[match[0]].append((path, match[1], match[2]))
        for name in sorted(names):
            rel = str((folder / name).relative_to(stamps_dir))
            if "/" not in rel:
                raise SourceError(
                    f"{folder / name}: a stamp outside a category folder; is {stamps_dir} "
                    f"the stamps folder of {PACKAGE}?"
                )
            stamps.append(
                Stamp(
                    rel=rel,
                    category=rel.split("/", 1)[0],
                    png=by_suffix.get(".png", {}).get(name),
                    svg=by_suffix.get(".svg", {}).get(name),
                    txt=by_suffix.get(".txt", {}).get(name),
                    dat=by_suffix.get(".dat", {}).get(name),
                    tracks=sorted(tracks[name], key=_track_order),
                    alternates=alternates.get(name, []),
                )
            )
    return stamps, sorted(orphans)


# ---------------------------------------------------------------- building


def _load_stamp(
    stamp: Stamp,
    key: str,
    label: int,
    stamps_dir: Path,
    build: dict[str, Any],
    timing: dict[str, float],
    opts: BuildOptions,
) -> dict[str, Any]:
    def rel(p: Path) -> str:
        return str(p.relative_to(stamps_dir))

    meta: dict[str, Any] = {
        "source": "tuxpaint",
        "label": label,
        "class": stamp.category,
        "stamp": stamp.rel,
        "image_absent": None,
        "text_absent": None,
    }
    dropped = Dropped()  # a file that does not decode leaves its modality absent, not the stamp
    image = None
    # The shipped PNG when there is one; else the SVG, rasterised (check_image).
    picture = stamp.png or stamp.svg
    if picture is not None:
        started = time.perf_counter()
        checked = dropped.image(picture, rel(picture), rel(picture), opts)
        if picture == stamp.svg:
            timing["svg_rasterise_seconds"] += time.perf_counter() - started
            build["images"]["svg_rasterised" if checked is not None else "svg_not_rasterised"] += 1
        if checked is not None:
            image, info = checked
            meta["image"] = {"file": rel(picture), **info}
            build["image_modes"][info["mode"]] += 1
            build["image_with_alpha"] += int(info["has_alpha"])
            sizes = build["image_size_range"]
            sizes["min"] = [min(a, b) for a, b in zip(sizes["min"], (info["width"], info["height"]))]
            sizes["max"] = [max(a, b) for a, b in zip(sizes["max"], (info["width"], info["height"]))]
    else:
        meta["image_absent"] = "no_image_file"
    if stamp.svg is not None:
        meta["svg_file"] = rel(stamp.svg)
    meta["alternate_images"] = [rel(p) for p in stamp.alternates]
    caption = None
    meta["caption_translations"] = {}
    if stamp.txt is not None:
        txt = stamp.txt

        def load_caption() -> tuple[str | None, dict[str, str], int]:
            try:
                return parse_caption_file(read_file(txt, rel(txt)))
            except UnicodeDecodeError as exc:
                raise BadRecord("bad_caption", f"{rel(txt)}: caption file is not UTF-8 ({exc})") from exc

        parsed = dropped.attempt("text", rel(txt), load_caption)
        if parsed is not None:
            caption, translations, unparsed = parsed
            meta["caption_translations"] = translations
            build["caption_lines_unparsed"] += unparsed
            if caption is None:
                meta["text_absent"] = "no_english_caption"
    else:
        meta["text_absent"] = "no_caption_file"
    if stamp.dat is not None:
        meta["stamp_options"] = [
            line.strip() for line in stamp.dat.read_text("utf-8", "replace").splitlines() if line.strip()
        ]

    def load_track(path: Path, kind: str, lang: str | None) -> Track:
        data = read_file(path, rel(path))
        info = check_audio(data, rel(path), full_decode=False)
        return Track(data, path.suffix.lower().lstrip("."), kind, lang, {"file": rel(path), **info})

    tracks = []
    for path, kind, lang in stamp.tracks:
        track = dropped.attempt("audio", rel(path), partial(load_track, path, kind, lang))
        if track is None:
            continue
        tracks.append(track)
        build["audio_sample_rates"][str(track.info["sample_rate"])] += 1
        build["audio_channels"][str(track.info["channels"])] += 1
        build["audio_seconds_range"] = [
            min(build["audio_seconds_range"][0], track.info["seconds"]),
            max(build["audio_seconds_range"][1], track.info["seconds"]),
        ]
    return assemble(key, meta, image, caption, tracks, dropped)


def build_tuxpaint(opts: BuildOptions) -> BuildReport:
    if opts.input is not None or opts.num_samples is not None or opts.image_size is not None:
        raise SourceError(
            "--source tuxpaint takes no --input, --num-samples or --image-size "
            "(the package is the input; --cache says where it is kept)"
        )
    return build_stamps(opts, prepare_package(opts.cache))


def build_stamps(opts: BuildOptions, package: PreparedPackage) -> BuildReport:
    """Write the stamps of an extracted package (`prepare_package`) as shards."""
    stamps_dir = package.stamps_dir
    stamps, orphans = scan_stamps(stamps_dir)
    classes, class_id = label_classes(s.category for s in stamps)
    make_key = KeyMaker()
    images: Counter[str] = Counter(dict.fromkeys(IMAGE_COUNTS, 0))
    # svg_rasterised / svg_not_rasterised are counted as the SVG-only stamps load.
    images.update(
        "png+svg" if s.png and s.svg else "png" if s.png else "no_image_file" for s in stamps if not s.svg or s.png
    )
    # The summary's, not the index's: an index does not change with the machine.
    timing = {"svg_rasterise_seconds": 0.0}
    build: dict[str, Any] = {
        "package": {"name": package.info.name, "version": package.info.version, "sha256": package.info.sha256},
        "stamps": len(stamps),
        # svg_rasterised / svg_not_rasterised are counted as the SVG-only stamps load.
        "images": images,
        "alternate_images_skipped": sum(len(s.alternates) for s in stamps),
        "orphan_audio_files": orphans,
        "caption_lines_unparsed": 0,
        "image_modes": Counter(),
        "image_with_alpha": 0,
        "image_size_range": {"min": [10**9, 10**9], "max": [0, 0]},
        "audio_sample_rates": Counter(),
        "audio_channels": Counter(),
        "audio_seconds_range": [1e9, 0.0],
    }
    records = []
    for stamp in stamps:
        key = make_key(stamp.rel)
        label = class_id[stamp.category]
        records.append(
            Record(key, _split_group(stamp), partial(_load_stamp, stamp, key, label, stamps_dir, build, timing, opts))
        )
    extra = {
        "num_classes": len(classes),
        "classes": classes,
        "package": build["package"],
        "audio_policies": sorted(AUDIO_POLICIES),
    }
    result = write_records(opts, "tuxpaint", records, extra, build, AUDIO_POLICIES)

    tracks: Counter[str] = Counter()
    with_track: Counter[str] = Counter()
    for idx in result.indexes.values():
        tracks.update(idx["audio_track_counts"])
        with_track.update(idx["samples_with_audio_track"])
    langs_other = {k.split("/")[1] for k in tracks if k.startswith("description/") and k != "description/en"}
    n_desc_other = sum(v for k, v in tracks.items() if k.startswith("description/") and k != "description/en")
    n_eff_loc = sum(v for k, v in tracks.items() if k.startswith("effect/") and k != "effect/-")
    stamps_other = sum(1 for s in stamps if any(k == "description" and lang != "en" for _, k, lang in s.tracks))
    summary = (
        f"wrote {opts.out} from {package.info.name} {package.info.version}: {len(stamps)} stamps "
        f"({split_summary(result.indexes)}); natural patterns: {format_counts(dict(result.totals))}; "
        f"stamps with a sound effect {with_track['effect/-']}, an English description "
        f"{with_track['description/en']}, another-language description {stamps_other}; tracks: effect "
        f"{tracks['effect/-']} (+{n_eff_loc} localized), description en {tracks['description/en']}, "
        f"other languages {n_desc_other} ({len(langs_other)} languages); images: png {images['png']}, "
        f"png+svg (png kept) {images['png+svg']}, rasterised from svg {images['svg_rasterised']} "
        f"(in {timing['svg_rasterise_seconds']:.1f} s), svg not rasterised {images['svg_not_rasterised']}, "
        f"no file {images['no_image_file']}; not written: "
        f"{build['alternate_images_skipped']} mirror/flip images, {len(orphans)} orphan audio files"
        + (f", skipped {format_counts(dict(result.skipped))}" if result.skipped else "")
        + salvage_summary(result, opts.max_image_side)
    )
    return BuildReport(result.indexes, summary, {"package": package, "build": build})
