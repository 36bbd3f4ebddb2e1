"""A build never leaves half a data set: it writes into a staging folder beside
--out and renames it into place when complete; a failure (a bad record, a
signal) removes it, an earlier build survives a failed rebuild, and a folder
with foreign files is refused. Real manifests, real PNGs, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import pytest
from PIL import Image

from cluster.cli import main as cli_main
from data_pipeline.shards import read_index
from data_pipeline.sources import SOURCES, BuildOptions
from data_pipeline.sources.common import hash_unit, sanitize_key

GOOD = 20


def _manifest(root: Path, bad: str | None = None) -> tuple[Path, int]:
    """GOOD image+caption lines and, with `bad`, one line whose only file is a corrupt
    picture; returns the manifest and how many good records the build writes before it."""
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(GOOD):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(data / f"img/g{i}.png")
        lines.append({"image": f"img/g{i}.png", "caption": f"a red square number {i}"})
    before = GOOD
    if bad is not None:
        (data / "img" / bad).write_bytes(b"\x89PNG\r\n\x1a\n not a picture after all")
        lines.append({"image": f"img/{bad}"})
        bad_hash = hash_unit(sanitize_key(f"img/{bad}"))
        before = sum(hash_unit(sanitize_key(f"img/g{i}.png")) < bad_hash for i in range(GOOD))
    path = data / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, before


def _late_bad_name() -> str:
    """A file name whose record comes after most good ones (records are written in hash order)."""
    return next(n for n in (f"bad{i}.png" for i in count()) if hash_unit(sanitize_key(f"img/{n}")) > 0.9)


def _build(manifest: Path, out: Path, *extra: str) -> int:
    argv = ["data", "build", "--source", "jsonl", "--input", str(manifest), "--out", str(out)]
    return cli_main([*argv, "--split-fractions", "1,0,0", "--shard-size", "2", *extra])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_failing_midway_leaves_nothing(tmp_path, capsys):
    manifest, before = _manifest(tmp_path, bad=_late_bad_name())
    assert before >= 16  # at least 8 shards of 2 were complete when the bad record stopped the build
    out = tmp_path / "out"
    assert _build(manifest, out) == 2
    err = capsys.readouterr().err
    assert f"{manifest}:{GOOD + 1}" in err and "does not decode" in err and "--skip-bad" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no out, no staging folder


def test_failed_rebuild_keeps_the_previous_build_and_a_good_one_replaces_it(tmp_path, capsys):
    manifest, _ = _manifest(tmp_path)
    out = tmp_path / "out"
    assert _build(manifest, out) == 0
    first = _tree(out)
    assert read_index(out / "train")["num_samples"] == GOOD and "train/shard-000009.tar" in first
    assert f"wrote {out} " in capsys.readouterr().out  # the summary names --out, not the staging folder

    _manifest(tmp_path, bad=_late_bad_name())
    assert _build(manifest, out) == 2
    assert _tree(out) == first  # the complete earlier build, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]

    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:5]))
    assert _build(manifest, out) == 0
    assert read_index(out / "train")["num_samples"] == 5
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def test_out_with_foreign_files_is_refused_before_building(tmp_path, capsys):
    manifest, _ = _manifest(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert _build(manifest, out) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "notes.txt" in err and "new or empty folder" in err
    assert _tree(out) == {"notes.txt": b"my notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]


def test_empty_out_folder_is_filled(tmp_path):
    manifest, _ = _manifest(tmp_path)
    (tmp_path / "out").mkdir()
    report = SOURCES["jsonl"](BuildOptions(out=tmp_path / "out", input=manifest, progress=False))
    assert sum(idx["num_samples"] for idx in report.indexes.values()) == GOOD
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "tokenizer.json", "train", "val"]


def _start_long_build(out: Path) -> subprocess.Popen:
    argv = ["data", "build", "--source", "synthetic", "--num-samples", "1000000", "--shard-size", "20"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *argv, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as in a terminal, even when pytest runs in a background job (which ignores it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_shards(proc: subprocess.Popen, parent: Path, n: int = 2) -> Path:
    """The staging folder, once `n` train shards are complete in it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for staging in parent.glob(".out.building-*"):
            if len(list(staging.glob("train/shard-*.tar"))) >= n:
                return staging
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the build wrote no shards within 120 s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_build_removes_the_staging_folder(tmp_path, signum):
    proc = _start_long_build(tmp_path / "out")
    try:
        staging = _wait_for_shards(proc, tmp_path)
        assert not (tmp_path / "out").exists()  # nothing at --out while building
        proc.send_signal(signum)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not staging.exists() and list(tmp_path.iterdir()) == []


def test_staging_left_by_a_killed_build_is_removed_by_the_next(tmp_path, capsys):
    proc = _start_long_build(tmp_path / "out")
    try:
        staging = _wait_for_shards(proc, tmp_path)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.communicate(timeout=60)
    assert staging.is_dir()  # left behind, hidden, beside the (absent) output
    manifest, _ = _manifest(tmp_path / "in")
    SOURCES["jsonl"](BuildOptions(out=tmp_path / "out", input=manifest, progress=False))
    assert f"removed {staging}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_staging_of_another_host_is_named_not_removed(tmp_path, capsys):
    other = tmp_path / ".out.building-othernode-12345"
    (other / "train").mkdir(parents=True)
    manifest, _ = _manifest(tmp_path / "in")
    SOURCES["jsonl"](BuildOptions(out=tmp_path / "out", input=manifest, progress=False))
    err = capsys.readouterr().err
    assert str(other) in err and "othernode" in err and "delete it" in err
    assert other.is_dir() and read_index(tmp_path / "out" / "train")["num_samples"] > 0
