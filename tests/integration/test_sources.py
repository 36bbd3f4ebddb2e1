"""Data sources: the real Tux Paint stamps (built from the Debian package), a
folder of files and a JSONL manifest, each written as shards the reader reads.

The tuxpaint build downloads ~160 MB once into the calmrl cache
($CALMRL_CACHE or ~/.cache/calmrl), kept across runs; later runs verify the
cached .deb and reuse its extraction."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from cluster.cli import main as cli_main
from data_pipeline.cache import cache_dir
from data_pipeline.contract import MODALITIES, DataConfig, pattern_name
from data_pipeline.reader import iterate_split
from data_pipeline.shards import read_index
from data_pipeline.sources import SOURCES, SPLITS, BuildOptions, SourceError, tuxpaint
from data_pipeline.sources.common import split_of
from data_pipeline.tar_reading import BadInputLog

AUDIO_EXTS = ("ogg", "flac", "wav")


def shard_samples(split_dir: Path):
    """Every sample of a split, in shard order, as (raw dict, metadata)."""
    for shard in read_index(split_dir)["shards"]:
        for raw in wds.WebDataset(str(split_dir / shard["name"]), shardshuffle=False):
            yield raw, json.loads(raw["json"])


def read_back(out: Path, split: str = "train", audio_policy: str = "first") -> tuple[dict, BadInputLog]:
    """key -> (present mask, label) through the real reader."""
    cfg = DataConfig(shards=str(out / split), audio_policy=audio_policy)
    bad = BadInputLog()
    rows = {}
    for batch in iterate_split(cfg, out / split, batch_size=8, bad=bad):
        for key, present, label in zip(batch["key"], batch["present"], batch["label"]):
            if key:
                rows[key] = (tuple(bool(v) for v in present), int(label))
    return rows, bad


def mask_of(meta: dict) -> tuple[bool, ...]:
    return tuple(m in meta["modalities"] for m in MODALITIES)


# ---------------------------------------------------------------- tuxpaint, for real


@pytest.fixture(scope="session")
def tuxpaint_build(tmp_path_factory):
    if not (shutil.which("apt-get") and shutil.which("apt-cache") and shutil.which("dpkg-deb")):
        pytest.fail("the tuxpaint source needs apt-get, apt-cache and dpkg-deb (Debian/Ubuntu): none found on PATH")
    out = tmp_path_factory.mktemp("tuxpaint")
    report = SOURCES["tuxpaint"](BuildOptions(out=out, cache=cache_dir(), progress=False))
    return out, report


def test_tuxpaint_index_counts_match_shards(tuxpaint_build):
    out, report = tuxpaint_build
    totals: Counter[str] = Counter()
    tracks: Counter[str] = Counter()
    stamps_with: Counter[str] = Counter()
    for split in SPLITS:
        index = read_index(out / split)
        assert index["source"] == "tuxpaint" and index["split"] == split
        assert index["tokenizer"] == "../tokenizer.json" and (out / "tokenizer.json").is_file()
        classes = index["classes"]
        assert index["num_classes"] == len(classes) >= 10 and "animals" in classes  # 16 in 2022.06.04-1
        seen: Counter[str] = Counter()
        split_tracks: Counter[str] = Counter()
        for raw, meta in shard_samples(out / split):
            assert meta["split"] == split and meta["source"] == "tuxpaint"
            assert 0 <= meta["label"] < len(classes) and classes[meta["label"]] == meta["stamp"].split("/")[0]
            assert ("png" in raw) == ("image" in meta["modalities"])
            assert ("txt" in raw) == ("text" in meta["modalities"])
            names = [t["name"] for t in meta["audio_tracks"]]
            assert sorted(k for k in raw if k.startswith("audio")) == sorted(names)
            assert ("audio" in meta["modalities"]) == bool(names)
            assert names == [f"audio{i}.{t['file'].rsplit('.', 1)[1]}" for i, t in enumerate(meta["audio_tracks"])]
            assert meta["modalities"] == [m for m in MODALITIES if m in meta["modalities"]]
            if "png" not in raw:
                assert meta["image_absent"] in ("bad_svg", "no_image_file")
            elif meta["image"]["file"].endswith(".svg"):
                assert (
                    meta["image"]["rasterised_from"] == "svg"
                    and max(meta["image"]["width"], meta["image"]["height"]) == 512
                )
            if "txt" in raw:
                assert raw["txt"].decode().strip() and "\n" not in raw["txt"].decode()
            assert "." not in raw["__key__"]
            seen[pattern_name(meta["modalities"])] += 1
            for t in meta["audio_tracks"]:
                assert t["kind"] in ("effect", "description")
                split_tracks[f"{t['kind']}/{t['lang'] or '-'}"] += 1
            for tag in {f"{t['kind']}/{t['lang'] or '-'}" for t in meta["audio_tracks"]}:
                stamps_with[tag] += 1
        assert dict(seen) == index["pattern_counts"]
        assert sum(seen.values()) == index["num_samples"] == sum(s["count"] for s in index["shards"])
        assert dict(split_tracks) == index["audio_track_counts"]
        for policy, counts in index["pattern_counts_by_audio_policy"].items():
            assert sum(counts.values()) == index["num_samples"], policy
        totals.update(seen)
        tracks.update(split_tracks)
    # The natural gaps of the real data (package 2022.06.04-1: 952 stamps; 135
    # effects, 65 English and 7341 other-language descriptions). Ranges, so a
    # newer Debian package still passes.
    assert 900 <= sum(totals.values()) <= 1100
    # 2022.06.04-1: 925 complete, 25 image+text, 2 text+audio (SVG-only stamps rasterised)
    assert len(totals) >= 3 and totals["image+text+audio"] > 800 and totals["text+audio"] >= 1
    assert 100 <= stamps_with["effect/-"] <= 200
    assert 40 <= stamps_with["description/en"] <= 120
    assert tracks["description/fr"] > 600 and sum(v for k, v in tracks.items() if k.startswith("description/")) > 5000
    build = read_index(out / "train")["build"]
    images = build["images"]  # 2022.06.04-1: png 702, png+svg 83, svg_rasterised 165, no_image_file 2
    assert images["svg_rasterised"] > 100 and images["svg_not_rasterised"] == 0 and build["orphan_audio_files"]
    assert sum(images.values()) == build["stamps"]
    assert "natural patterns" in report.summary and "image+text+audio" in report.summary


def _decode_shard(path: str) -> tuple[int, list[str]]:
    """Decode every audio track of one shard with soundfile; (tracks, problems)."""
    n, problems = 0, []
    for raw in wds.WebDataset(path, shardshuffle=False):
        meta = json.loads(raw["json"])
        for t in meta["audio_tracks"]:
            wave, rate = soundfile.read(io.BytesIO(raw[t["name"]]), dtype="float32", always_2d=True)
            n += 1
            if (
                rate != t["sample_rate"]
                or wave.shape[0] == 0
                or wave.shape[1] != t["channels"]
                or not np.isfinite(wave).all()
                or abs(wave.shape[0] / rate - t["seconds"]) > 0.01
            ):
                problems.append(f"{raw['__key__']}/{t['name']}")
    return n, problems


def test_tuxpaint_every_audio_track_decodes(tuxpaint_build):
    out, _ = tuxpaint_build
    shards = [str(out / split / s["name"]) for split in SPLITS for s in read_index(out / split)["shards"]]
    expected = sum(sum(read_index(out / s)["audio_track_counts"].values()) for s in SPLITS)
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_decode_shard, shards))
    assert sum(n for n, _ in results) == expected > 7000
    assert [p for _, ps in results for p in ps] == []


def test_tuxpaint_images_keep_their_real_size(tuxpaint_build):
    out, _ = tuxpaint_build
    modes: Counter[str] = Counter()
    for raw, meta in shard_samples(out / "val"):
        if "png" in raw:
            with Image.open(io.BytesIO(raw["png"])) as img:
                img.load()
                assert img.size == (meta["image"]["width"], meta["image"]["height"])
                modes[img.mode] += 1
    assert modes["RGBA"] + modes["LA"] + modes["P"] > 0  # stamps carry alpha: the decoder composites on white


def test_tuxpaint_split_by_stamp_is_deterministic_and_disjoint(tuxpaint_build):
    out, _ = tuxpaint_build
    stamps_of, captions_of = {}, {}
    for split in SPLITS:
        samples = list(shard_samples(out / split))
        stamps_of[split] = {meta["stamp"]: meta for _, meta in samples}
        captions_of[split] = {" ".join(raw["txt"].decode().lower().split()) for raw, _ in samples if "txt" in raw}
        for raw, meta in samples:
            # stamps sharing an English caption share a split; stamps without one go by path
            group = (
                "caption:" + " ".join(raw["txt"].decode().lower().split()) if "txt" in raw else "path:" + meta["stamp"]
            )
            assert split_of(group, (0.8, 0.1, 0.1)) == split
    train, val, test = (set(stamps_of[s]) for s in SPLITS)
    assert not (train & val or train & test or val & test)
    c_train, c_val, c_test = (captions_of[s] for s in SPLITS)
    assert not (c_train & c_val or c_train & c_test or c_val & c_test)  # no caption leaks across splits
    n = len(train | val | test)
    assert 0.7 < len(train) / n < 0.9 and len(val) > 50 and len(test) > 50


def test_tuxpaint_reads_back_through_the_reader(tuxpaint_build):
    out, _ = tuxpaint_build
    metas = {raw["__key__"]: meta for raw, meta in shard_samples(out / "test")}
    rows, bad = read_back(out, "test", audio_policy="description:en")
    assert bad.count == 0
    assert set(rows) == set(metas)
    for key, (present, label) in rows.items():
        assert present == mask_of(metas[key]) and label == metas[key]["label"]


def test_tuxpaint_corrupt_cached_deb_is_detected(tuxpaint_build, tmp_path):
    _, report = tuxpaint_build
    real_deb: Path = report.details["package"].deb
    cache = tmp_path / "cache"
    (cache / "tuxpaint").mkdir(parents=True)
    deb = cache / "tuxpaint" / real_deb.name
    shutil.copyfile(real_deb, deb)
    with open(deb, "r+b") as f:  # flip one byte in the middle
        f.seek(deb.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SourceError, match="SHA256 mismatch") as err:
        tuxpaint.prepare_package(cache)
    assert str(deb) in str(err.value) and "delete" in str(err.value)
    # A verified extraction from before does not excuse the corrupt .deb.
    target = cache / "tuxpaint" / real_deb.name.removesuffix(".deb")
    (target / "root" / tuxpaint.STAMPS_SUBDIR).mkdir(parents=True)
    info = report.details["package"].info
    (target / tuxpaint.MARKER).write_text(json.dumps({"package": info.__dict__, "deb": deb.name}))
    with pytest.raises(SourceError, match="SHA256 mismatch"):
        tuxpaint.prepare_package(cache)


def _fake_apt(tmp_path: Path, monkeypatch) -> None:
    """apt-cache and apt-get that know no package, as with empty package lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-cache", "apt-get"):
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\necho 'N: Unable to locate package tuxpaint-stamps-default' >&2\n"
            "echo 'E: No packages found' >&2\nexit 100\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_tuxpaint_empty_apt_lists_say_run_apt_get_update(tmp_path, monkeypatch):
    _fake_apt(tmp_path, monkeypatch)
    lists = tmp_path / "lists"
    lists.mkdir()
    monkeypatch.setattr(tuxpaint, "APT_LISTS", lists)
    with pytest.raises(SourceError) as err:
        tuxpaint.prepare_package(tmp_path / "cache")
    assert "apt-get update" in str(err.value) and "as root" in str(err.value) and "empty" in str(err.value)
    # Without APT, a verified extraction in the cache is still used (its .deb re-hashed against the marker).
    root = tmp_path / "cache" / "tuxpaint"
    deb = root / "tuxpaint-stamps-default_1.0_all.deb"
    deb.write_bytes(b"not really a deb")
    info = tuxpaint.PackageInfo(tuxpaint.PACKAGE, "1.0", tuxpaint.sha256_file(deb), f"pool/{deb.name}", 16)
    (root / deb.stem / "root" / tuxpaint.STAMPS_SUBDIR).mkdir(parents=True)
    (root / deb.stem / tuxpaint.MARKER).write_text(json.dumps({"package": info.__dict__, "deb": deb.name}))
    prepared = tuxpaint.prepare_package(tmp_path / "cache")
    assert prepared.reused and prepared.info.version == "1.0"


# ---------------------------------------------------------------- folder and jsonl


def _png(path: Path, colour=(200, 30, 30), size=(20, 12), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def _audio(path: Path, fmt: str, rate: int = 16000, seconds: float = 0.3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    kw = {"format": "OGG", "subtype": "VORBIS"} if fmt == "ogg" else {"format": fmt.upper()}
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, **kw)


@pytest.fixture()
def user_folder(tmp_path) -> Path:
    root = tmp_path / "mydata"
    _png(root / "dogs/dog1.png")
    (root / "dogs/dog1.txt").write_text("a brown dog\n")
    _audio(root / "dogs/dog1.wav", "wav")
    _png(root / "dogs/dog2.png", mode="RGBA", colour=(0, 0, 0, 0))  # fully transparent
    (root / "dogs/dog2.txt").write_text("a sleeping dog")
    (root / "cats").mkdir()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "cats/cat1.jpg")
    (root / "cats/cat2.txt").write_text("a cat purring")
    _audio(root / "cats/cat2.flac", "flac")
    _audio(root / "cats/cat2.ogg", "ogg", rate=44100)
    _audio(root / "cats/cat3.wav", "wav", rate=8000)
    _png(root / "cats/quiet.png")
    (root / "cats/quiet.txt").write_text("")  # empty caption: image only
    (root / "cats/blank.txt").write_text("  \n")  # nothing else: no modality
    (root / "cats/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (root / "cats/broken.txt").write_text("a broken picture")
    _png(root / "top.png")
    (root / "top.txt").write_text("no folder, no label")
    (root / "notes.md").write_text("ignored")
    _png(root / ".hidden.png")
    return root


def test_folder_corrupt_image_names_the_file_and_the_fix(user_folder, tmp_path, capsys):
    (user_folder / "cats/broken.txt").unlink()  # the broken picture is all its record has
    code = cli_main(
        ["data", "build", "--source", "folder", "--input", str(user_folder), "--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(user_folder / "cats/broken.png") in err and "--skip-bad" in err and "does not decode" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]  # no out, no staging folder beside it


def test_folder_builds_and_reads_back(user_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(
        [
            "data",
            "build",
            "--source",
            "folder",
            "--input",
            str(user_folder),
            "--out",
            str(out),
            *["--split-fractions", "1,0,0", "--skip-bad", "--shard-size", "3"],
        ]
    )
    summary = capsys.readouterr().out
    assert code == 0 and "9 records" in summary and "image bad_image 1" in summary
    index = read_index(out / "train")
    assert index["classes"] == ["cats", "dogs"] and index["num_classes"] == 2
    assert index["build"]["skipped"] == {"no_modality": 1}
    # broken.png does not decode: its record keeps the caption, the image absent and counted
    assert index["build"]["dropped"] == {"image": {"bad_image": 1}}
    # quiet.txt (its record keeps the image) and blank.txt (its record, left empty, is skipped)
    assert index["build"]["counters"] == {"empty_captions": 2} and index["build"]["ignored_files"] == 2
    assert index["pattern_counts"] == {
        "image": 2,
        "image+text": 2,
        "image+text+audio": 1,
        "text+audio": 1,
        "audio": 1,
        "text": 1,
    }
    assert read_index(out / "val")["num_samples"] == 0 == read_index(out / "test")["num_samples"]
    metas = {raw["__key__"]: (raw, meta) for raw, meta in shard_samples(out / "train")}
    assert set(metas) == {
        *("dogs_dog1", "dogs_dog2", "cats_cat1", "cats_cat2", "cats_cat3", "cats_quiet", "cats_broken", "top")
    }
    raw, meta = metas["cats_broken"]
    assert raw["txt"] == b"a broken picture" and "png" not in raw and meta["image_absent"] == "bad_image"
    assert [(d["modality"], d["file"], d["reason"]) for d in meta["dropped"]] == [
        ("image", "cats/broken.png", "bad_image")
    ]
    raw, meta = metas["cats_cat2"]
    assert [(t["name"], t["sample_rate"]) for t in meta["audio_tracks"]] == [
        ("audio0.flac", 16000),
        ("audio1.ogg", 44100),
    ]
    assert "jpg" in metas["cats_cat1"][0] and metas["cats_quiet"][1]["text_absent"] == "empty_caption"
    assert metas["top"][1]["label"] == -1 and metas["dogs_dog1"][1]["label"] == 1
    rows, bad = read_back(out)
    assert bad.count == 0 and set(rows) == set(metas)
    for key, (present, label) in rows.items():
        assert present == mask_of(metas[key][1]) and label == metas[key][1]["label"], key


def _manifest(root: Path, lines: list[str]) -> Path:
    path = root / "data" / "manifest.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def manifest_files(tmp_path) -> Path:
    base = tmp_path / "data"
    _png(base / "img/a.png")
    _png(base / "img/b.png", mode="LA", colour=(10, 128))
    _audio(base / "snd/a.wav", "wav")
    _audio(base / "snd/c.flac", "flac", rate=22050)
    (base / "img/bad.png").write_bytes(b"GIF89a but truncated")
    return tmp_path


GOOD_LINES = [
    '{"image": "img/a.png", "caption": "a red square", "audio": "snd/a.wav", "label": "square"}',
    '{"caption": "only text here", "label": "circle"}',
    '{"image": "img/b.png", "audio": ["snd/a.wav", {"path": "snd/c.flac", "kind": "speech", "lang": "fr"}], '
    '"label": "circle", "meta": {"source_id": 7}}',
    "",
    '{"image": "img/a.png", "caption": "the same square, a second caption", "label": "square"}',
    '{"caption": "", "audio": "snd/c.flac"}',
]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"image": "img/a.png", "caption": "x"', "not JSON"),
        ('{"image": "img/missing.png"}', "does not exist"),
        ('{"image": "img/bad.png"}', "image does not decode"),  # nothing else in the record
        ('{"imgae": "img/a.png"}', "unknown field(s) imgae"),
    ],
)
def test_jsonl_errors_name_the_line_and_file(manifest_files, tmp_path, bad_line, message):
    manifest = _manifest(manifest_files, GOOD_LINES + [bad_line])
    with pytest.raises(SourceError) as err:
        SOURCES["jsonl"](BuildOptions(out=tmp_path / "out", input=manifest, progress=False))
    text = str(err.value)
    assert f"{manifest}:{len(GOOD_LINES) + 1}" in text and message in text
    if "img/" in bad_line and "missing" in bad_line:
        assert str(manifest.parent / "img/missing.png") in text


def test_jsonl_builds_and_reads_back(manifest_files, tmp_path):
    lines = GOOD_LINES + ['{"caption": "   "}', '{"image": "img/bad.png", "caption": "x"}', "{not json"]
    manifest = _manifest(manifest_files, lines)
    out = tmp_path / "out"
    report = SOURCES["jsonl"](
        BuildOptions(out=out, input=manifest, split_fractions=(1.0, 0.0, 0.0), skip_bad=True, progress=False)
    )
    index = read_index(out / "train")
    assert index["classes"] == ["circle", "square"]
    assert index["build"]["skipped"] == {"bad_line": 1, "no_modality": 1}
    assert index["build"]["dropped"] == {"image": {"bad_image": 1}}  # its caption "x" is kept
    assert index["build"]["counters"] == {"empty_captions": 2}
    assert index["pattern_counts"] == {"image+text+audio": 1, "text": 2, "image+audio": 1, "image+text": 1, "audio": 1}
    assert "skipped" in report.summary
    metas = {raw["__key__"]: meta for raw, meta in shard_samples(out / "train")}
    assert {"img_a_png", "img_a_png-1"} <= set(metas)  # one image, two captions: two records, one group
    multi = metas["img_b_png"]
    assert [(t["name"], t["kind"], t["lang"]) for t in multi["audio_tracks"]] == [
        ("audio0.wav", None, None),
        ("audio1.flac", "speech", "fr"),
    ]
    assert multi["meta"] == {"source_id": 7} and multi["line"] == 3
    rows, bad = read_back(out, audio_policy="speech:fr")
    assert bad.count == 0 and set(rows) == set(metas)
    for key, (present, label) in rows.items():
        assert present == mask_of(metas[key]) and label == metas[key]["label"], key


def test_jsonl_split_is_deterministic_disjoint_and_keeps_groups(tmp_path):
    lines = [json.dumps({"id": f"item{i % 40}", "caption": f"caption number {i}"}) for i in range(80)]
    manifest = _manifest(tmp_path, lines)
    keys = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        SOURCES["jsonl"](BuildOptions(out=out, input=manifest, split_fractions=(0.5, 0.25, 0.25), progress=False))
        keys.append({s: sorted(raw["__key__"] for raw, _ in shard_samples(out / s)) for s in SPLITS})
    assert keys[0] == keys[1]
    groups = {s: {k.split("-")[0] for k in keys[0][s]} for s in SPLITS}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert all(keys[0][s] for s in SPLITS) and sum(len(v) for v in keys[0].values()) == 80
    with pytest.raises(SourceError, match="split-fractions"):
        from data_pipeline.sources import parse_split_fractions

        parse_split_fractions("0.5,0.5,0.5")


SMALL_SYNTHETIC = ["--num-samples", "60", "--shard-size", "30"]


def test_synthetic_still_builds_through_the_registry(tmp_path, capsys):
    code = cli_main(["data", "build", "--source", "synthetic", "--out", str(tmp_path / "syn"), *SMALL_SYNTHETIC])
    assert code == 0
    assert "train 48 samples in 2 shards" in capsys.readouterr().out
    assert read_index(tmp_path / "syn" / "train")["source"] == "synthetic"


def test_synthetic_missing_rates_from_the_command_line(tmp_path, capsys):
    code = cli_main(
        [
            "data",
            "build",
            "--source",
            "synthetic",
            "--out",
            str(tmp_path / "syn"),
            *SMALL_SYNTHETIC,
            "--missing",
            "0,0,0",
        ]
    )
    assert code == 0
    for split in ("train", "val", "test"):
        assert set(read_index(tmp_path / "syn" / split)["pattern_counts"]) == {"image+text+audio"}
    assert (
        cli_main(["data", "build", "--source", "synthetic", "--out", str(tmp_path / "bad"), "--missing", "0,1.5,0"])
        == 2
    )
    assert "--missing '0,1.5,0'" in capsys.readouterr().err


# ---------------------------------------------------------------- files that do not decode, oversized pictures


def test_jsonl_corrupt_image_keeps_caption_and_audio(manifest_files, tmp_path):
    base = manifest_files / "data"
    (base / "snd/bad.ogg").write_bytes(b"OggS but nothing after")
    line = {"image": "img/bad.png", "caption": "a dog barking", "audio": ["snd/a.wav", "snd/bad.ogg"], "label": "dog"}
    manifest = _manifest(manifest_files, [GOOD_LINES[0], json.dumps(line)])
    out = tmp_path / "out"
    # no --skip-bad: the record is not bad, it has a caption and a good track left
    report = SOURCES["jsonl"](BuildOptions(out=out, input=manifest, split_fractions=(1.0, 0.0, 0.0), progress=False))
    metas = {raw["__key__"]: (raw, meta) for raw, meta in shard_samples(out / "train")}
    raw, meta = metas["img_bad_png"]
    assert meta["modalities"] == ["text", "audio"] and raw["txt"] == b"a dog barking" and "png" not in raw
    assert meta["image_absent"] == "bad_image" and "audio_absent" not in meta
    assert [t["file"] for t in meta["audio_tracks"]] == ["snd/a.wav"] and "audio0.wav" in raw
    assert [(d["modality"], d["file"], d["reason"]) for d in meta["dropped"]] == [
        ("image", "img/bad.png", "bad_image"),
        ("audio", "snd/bad.ogg", "bad_audio"),
    ]
    assert "does not decode" in meta["dropped"][0]["error"] and "--skip-bad" not in meta["dropped"][0]["error"]
    build = read_index(out / "train")["build"]
    assert build["dropped"] == {"audio": {"bad_audio": 1}, "image": {"bad_image": 1}} and build["skipped"] == {}
    assert "dropped files (their records kept the rest): audio bad_audio 1, image bad_image 1" in report.summary
    assert "dropped" not in metas["img_a_png"][1] and "image_absent" not in metas["img_a_png"][1]
    rows, bad = read_back(out)
    assert bad.count == 0 and rows["img_bad_png"][0] == (False, True, True)


def test_folder_record_with_only_broken_files_is_still_bad(tmp_path):
    root = tmp_path / "mydata"
    _png(root / "ok.png")
    (root / "gone.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "gone.wav").write_bytes(b"RIFF broken")
    with pytest.raises(SourceError, match="gone.png: image does not decode.*and 1 more file"):
        SOURCES["folder"](BuildOptions(out=tmp_path / "out", input=root, progress=False))
    report = SOURCES["folder"](BuildOptions(out=tmp_path / "out", input=root, progress=False, skip_bad=True))
    assert read_index(tmp_path / "out" / "train")["build"]["skipped"] == {"bad_image": 1}
    assert "dropped" not in read_index(tmp_path / "out" / "train")["build"] and "dropped" not in report.summary


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """12000 x 12000 of one grey: 144 MP, over Pillow's 89 MP warning limit, a few hundred bytes as PNG."""
    path = tmp_path_factory.mktemp("huge") / "img" / "poster.png"
    path.parent.mkdir()
    Image.new("L", (12000, 12000), 128).save(path)
    return path


def test_huge_png_is_downscaled_and_kept_without_a_warning(huge_png, tmp_path):
    import warnings

    limit = Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):  # what a plain open does, once per file
        Image.open(huge_png).close()
    manifest = huge_png.parent.parent / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": "img/poster.png", "caption": "a grey poster"}) + "\n")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the build
        report = SOURCES["jsonl"](
            BuildOptions(out=out, input=manifest, split_fractions=(1.0, 0.0, 0.0), progress=False)
        )
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's setting is left as it was
    ((raw, meta),) = list(shard_samples(out / "train"))
    with Image.open(io.BytesIO(raw["png"])) as img:
        assert img.size == (4096, 4096) and img.getextrema() == (128, 128)
    assert meta["image"]["original_size"] == [12000, 12000] and meta["image"]["width"] == 4096
    assert meta["modalities"] == ["image", "text"]
    assert read_index(out / "train")["build"]["images_downscaled"] == {"count": 1, "max_side": 4096}
    assert "images downscaled to a longest side of 4096: 1" in report.summary


def test_large_jpeg_is_drafted_down_and_a_picture_over_the_pixel_limit_is_refused(tmp_path):
    base = tmp_path / "data"
    base.mkdir()
    Image.new("RGB", (3000, 2000), (0, 90, 200)).save(base / "wide.jpg", quality=90)
    Image.new("RGB", (1500, 1000), (0, 90, 200)).save(base / "big.png")
    lines = [
        {"image": "wide.jpg", "caption": "a wide blue photo"},
        {"image": "big.png", "caption": "too many pixels for this build"},
    ]
    manifest = _manifest(tmp_path, [json.dumps(line) for line in lines])
    out = tmp_path / "out"
    opts = BuildOptions(
        out=out,
        input=manifest,
        split_fractions=(1.0, 0.0, 0.0),
        progress=False,
        max_image_side=500,
        max_image_pixels=1_000_000,  # wide.jpg decodes at 1/4 scale (750 x 500): under it; big.png is not
    )
    report = SOURCES["jsonl"](opts)
    metas = {raw["__key__"]: (raw, meta) for raw, meta in shard_samples(out / "train")}
    raw, meta = metas["wide_jpg"]
    with Image.open(io.BytesIO(raw["jpg"])) as img:
        assert img.size == (500, 333) and img.format == "JPEG"
    assert meta["image"]["original_size"] == [3000, 2000]
    raw, meta = metas["big_png"]
    assert meta["modalities"] == ["text"] and meta["image_absent"] == "image_too_large"
    assert "1500 x 1000 pixels" in meta["dropped"][0]["error"]
    assert "image image_too_large 1" in report.summary


# ---------------------------------------------------------------- every format users have: SVG, JPEG/PNG/WebP, MP3

RED_CIRCLE_SVG = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<!-- Created with Inkscape -->\n'
    '<svg xmlns="http://www.w3.org/2000/svg" width="60pt" height="30pt" viewBox="0 0 60 30">'
    '<circle cx="30" cy="15" r="12" fill="#ff0000"/></svg>'
)


def _mp3(path: Path, rate: int) -> None:
    """An MP3 written by soundfile itself; skips (saying why) where libsndfile cannot encode MP3."""
    t = np.arange(int(rate * 0.5)) / rate
    try:
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="MP3")
    except (soundfile.LibsndfileError, ValueError, TypeError) as exc:
        pytest.skip(f"libsndfile {soundfile.__libsndfile_version__} here cannot write MP3 ({exc}); needs 1.1.0+")


def _formats_folder(root: Path) -> None:
    for name, fmt in (("photo_png", "PNG"), ("photo_jpg", "JPEG"), ("photo_webp", "WEBP")):
        path = root / "photos" / f"{name}.{name.rsplit('_', 1)[1]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 12), (200, 30, 30)).save(path, format=fmt)
        (path.with_suffix(".txt")).write_text(f"a red {fmt} picture")
    (root / "drawings").mkdir()
    (root / "drawings/circle.svg").write_text(RED_CIRCLE_SVG)
    (root / "drawings/circle.txt").write_text("a red circle")
    (root / "drawings/broken.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg' width='10'")
    (root / "drawings/broken.txt").write_text("a drawing that does not parse")
    (root / "sounds").mkdir()
    _mp3(root / "sounds/beep.mp3", 22050)
    _audio(root / "sounds/beep.wav", "wav", rate=44100, seconds=0.5)
    (root / "sounds/beep.txt").write_text("a beep, twice")


def test_folder_takes_svg_jpeg_png_webp_and_mp3_and_reads_them_back(tmp_path):
    root = tmp_path / "mydata"
    _formats_folder(root)
    out = tmp_path / "out"
    report = SOURCES["folder"](BuildOptions(out=out, input=root, split_fractions=(1.0, 0.0, 0.0), progress=False))
    metas = {raw["__key__"]: (raw, meta) for raw, meta in shard_samples(out / "train")}
    for key, ext in (("photos_photo_png", "png"), ("photos_photo_jpg", "jpg"), ("photos_photo_webp", "webp")):
        raw, meta = metas[key]
        assert ext in raw and meta["image"]["width"] == 20 and "rasterised_from" not in meta["image"], key
    raw, meta = metas["drawings_circle"]
    with Image.open(io.BytesIO(raw["png"])) as img:  # 60 x 30 pt fitted into 512 x 512, alpha kept
        assert img.format == "PNG" and img.size == (512, 256) and img.mode == "RGBA"
        assert img.getpixel((256, 128)) == (255, 0, 0, 255) and img.getchannel("A").getpixel((0, 0)) == 0
    assert meta["image"]["file"] == "drawings/circle.svg" and meta["image"]["rasterised_from"] == "svg"
    assert (meta["image"]["width"], meta["image"]["height"]) == (512, 256)
    raw, meta = metas["drawings_broken"]
    assert "png" not in raw and meta["modalities"] == ["text"] and meta["image_absent"] == "bad_svg"
    assert "drawings/broken.svg" in meta["dropped"][0]["error"] and "does not rasterise" in meta["dropped"][0]["error"]
    assert "image bad_svg 1" in report.summary
    raw, meta = metas["sounds_beep"]
    assert [(t["name"], t["sample_rate"]) for t in meta["audio_tracks"]] == [
        ("audio0.mp3", 22050),
        ("audio1.wav", 44100),
    ]
    assert abs(meta["audio_tracks"][0]["seconds"] - 0.5) < 0.1
    for policy in ("first", "random"):  # the MP3 track, then either
        cfg = DataConfig(shards=str(out / "train"), audio_policy=policy, image_size=32)
        bad = BadInputLog()
        seen = set()
        for batch in iterate_split(cfg, out / "train", batch_size=4, bad=bad):
            for i, key in enumerate(batch["key"]):
                if not key:
                    continue
                seen.add(key)
                present = tuple(bool(v) for v in batch["present"][i])
                assert present == mask_of(metas[key][1]), key
                if key == "drawings_circle":  # the stored PNG decodes: red centre, white (was transparent) corner
                    assert torch.allclose(batch["image"][i][:, 16, 16], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
                    assert torch.allclose(batch["image"][i][:, 0, 0], torch.ones(3))
                if key.startswith("photos_"):
                    assert torch.allclose(batch["image"][i][:, 16, 16], torch.tensor([0.57, -0.76, -0.76]), atol=0.1)
                if key == "sounds_beep":  # 440 Hz from either track, resampled to the config's rate
                    spectrogram = batch["audio"][i]
                    assert torch.isfinite(spectrogram).all() and spectrogram.mean(1).argmax() < cfg.n_mels // 3
        assert bad.count == 0 and seen == set(metas), policy


def test_jsonl_takes_an_svg_image_and_an_mp3_track(tmp_path):
    base = tmp_path / "data"
    (base / "img").mkdir(parents=True)
    (base / "img/circle.svg").write_text(RED_CIRCLE_SVG)
    (base / "snd").mkdir()
    _mp3(base / "snd/beep.mp3", 22050)
    # An SVG drawing a picture that lies beside it: read from the SVG's folder, not the working directory.
    _png(base / "img/green.png", colour=(0, 255, 0), size=(4, 4))
    (base / "img/framed.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="8" height="8">'
        '<image width="8" height="8" xlink:href="green.png"/></svg>'
    )
    lines = [
        {"image": "img/circle.svg", "caption": "a red circle", "audio": "snd/beep.mp3"},
        {"image": "img/framed.svg", "caption": "a green square"},
    ]
    manifest = _manifest(tmp_path, [json.dumps(line) for line in lines])
    out = tmp_path / "out"
    SOURCES["jsonl"](BuildOptions(out=out, input=manifest, split_fractions=(1.0, 0.0, 0.0), progress=False))
    metas = {raw["__key__"]: (raw, meta) for raw, meta in shard_samples(out / "train")}
    raw, meta = metas["img_circle_svg"]
    assert meta["modalities"] == ["image", "text", "audio"] and "png" in raw and "audio0.mp3" in raw
    assert meta["image"]["rasterised_from"] == "svg" and meta["audio_tracks"][0]["sample_rate"] == 22050
    with Image.open(io.BytesIO(metas["img_framed_svg"][0]["png"])) as img:
        assert img.size == (512, 512) and img.convert("RGBA").getpixel((256, 256)) == (0, 255, 0, 255)
    rows, bad = read_back(out)
    assert bad.count == 0 and rows == {
        "img_circle_svg": ((True, True, True), -1),
        "img_framed_svg": ((True, True, False), -1),
    }


# ---------------------------------------------------------------- tuxpaint's SVG-only stamps, on a package-shaped folder


def _stamps_package(tmp_path: Path) -> tuxpaint.PreparedPackage:
    """A folder shaped like tuxpaint-stamps-default's stamps/ (categories, NAME.png|svg|txt|ogg)."""
    stamps = tmp_path / "root" / tuxpaint.STAMPS_SUBDIR
    (stamps / "animals/birds").mkdir(parents=True)
    (stamps / "shapes").mkdir(parents=True)
    _png(stamps / "animals/birds/robin.png", mode="RGBA", colour=(200, 30, 30, 255))
    (stamps / "animals/birds/robin.svg").write_text(RED_CIRCLE_SVG.replace("#ff0000", "#0000ff"))  # png kept
    (stamps / "animals/birds/robin.txt").write_text("A robin.\nfr.utf8=Un rouge-gorge.\n")
    (stamps / "shapes/circle.svg").write_text(RED_CIRCLE_SVG)  # SVG only: rasterised
    (stamps / "shapes/circle.txt").write_text("A red circle.\n")
    _audio(stamps / "shapes/circle_desc.ogg", "ogg")
    (stamps / "shapes/broken.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><g></svg>")
    (stamps / "shapes/broken.txt").write_text("A broken drawing.\n")
    (stamps / "shapes/words.txt").write_text("Only words.\n")  # no picture at all
    info = tuxpaint.PackageInfo(tuxpaint.PACKAGE, "0-test", "0" * 64, "pool/test.deb", 0)
    return tuxpaint.PreparedPackage(info, tmp_path / "test.deb", stamps, reused=True)


def test_tuxpaint_svg_only_stamp_gets_its_picture_rasterised(tmp_path):
    out = tmp_path / "out"
    report = tuxpaint.build_stamps(
        BuildOptions(out=out, split_fractions=(1.0, 0.0, 0.0), progress=False), _stamps_package(tmp_path)
    )
    metas = {meta["stamp"]: (raw, meta) for raw, meta in shard_samples(out / "train")}
    raw, meta = metas["shapes/circle"]
    assert meta["modalities"] == ["image", "text", "audio"] and meta["image_absent"] is None
    assert meta["image"]["file"] == "shapes/circle.svg" and meta["image"]["rasterised_from"] == "svg"
    with Image.open(io.BytesIO(raw["png"])) as img:
        assert img.size == (512, 256) == (meta["image"]["width"], meta["image"]["height"])
        assert img.convert("RGBA").getpixel((256, 128)) == (255, 0, 0, 255)
    raw, meta = metas["animals/birds/robin"]  # PNG and SVG: the shipped PNG, as it was
    assert raw["png"] == (tmp_path / "root" / tuxpaint.STAMPS_SUBDIR / "animals/birds/robin.png").read_bytes()
    assert meta["image"]["file"] == "animals/birds/robin.png" and "rasterised_from" not in meta["image"]
    assert meta["svg_file"] == "animals/birds/robin.svg"
    raw, meta = metas["shapes/broken"]  # the SVG does not rasterise: image absent, the caption kept
    assert meta["modalities"] == ["text"] and meta["image_absent"] == "bad_svg"
    assert meta["dropped"][0]["file"] == "shapes/broken.svg" and "shapes/broken.svg" in meta["dropped"][0]["error"]
    assert metas["shapes/words"][1]["image_absent"] == "no_image_file"
    build = read_index(out / "train")["build"]
    assert build["images"] == {"png": 0, "png+svg": 1, "svg_rasterised": 1, "svg_not_rasterised": 1, "no_image_file": 1}
    assert build["dropped"] == {"image": {"bad_svg": 1}}
    assert "rasterised from svg 1 (in " in report.summary and "svg not rasterised 1" in report.summary
    rows, bad = read_back(out)
    assert bad.count == 0
    assert {key: present for key, (present, _) in rows.items()} == {
        raw["__key__"]: mask_of(meta) for raw, meta in metas.values()
    }
