"""The launch preflight (cluster/preflight.py): each check on real files and real
sockets, every problem one line naming the file, port or setting and the fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from cluster.preflight import PreflightError, _check_out_dir, preflight
from data_pipeline.errors import DataError
from data_pipeline.split import open_split
from pretrain.checkpoint import Checkpointer, write_manifest
from tests.helpers import tiny_config


@pytest.fixture
def split(synthetic_dir, tmp_path) -> Path:
    """A private copy of the synthetic train split (8 shards of 100) with its tokenizer."""
    shutil.copy(synthetic_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copytree(synthetic_dir / "train", tmp_path / "train")
    return tmp_path / "train"


def _problems(cfg, nproc=2, resume=None) -> list[str]:
    with pytest.raises(PreflightError) as caught:
        preflight(cfg, nproc, resume)
    return caught.value.problems


def _listening(addr: str = "127.0.0.1") -> socket.socket:
    """A real server socket holding a port, as another job's exporter would."""
    s = socket.socket()
    s.bind((addr, 0))
    s.listen()
    return s


def _checkpoint(run: Path, tag: str, ranks: int, latest: bool = True) -> None:
    """A checkpoint folder as Checkpointer.save lays it out (per-rank trainer states)."""
    folder = run / "checkpoints" / tag
    folder.mkdir(parents=True)
    for r in range(ranks):
        (folder / Checkpointer.rank_state_name(r)).write_bytes(b"state")
    write_manifest(folder, step=int(tag.split("_")[1]), world=ranks, zero_stage=1)
    if latest:
        (run / "checkpoints" / "latest").write_text(tag)


def test_sound_launch_passes_with_a_one_line_summary(split, tmp_path):
    with _listening() as probe:  # a port that was just free: ranks would bind it and the next one
        port = probe.getsockname()[1]
    cfg = tiny_config(split, tmp_path / "runs" / "a", metrics={"enabled": True, "port": port, "addr": "127.0.0.1"})
    report = preflight(cfg, 2, None)
    line = report.summary
    assert line.startswith("preflight: 8 shards (800 samples) for 2 ranks x 1 worker")
    assert f"out_dir {tmp_path / 'runs' / 'a'} writable" in line and "GiB free" in line and "a checkpoint ~" in line
    assert f"metrics ports {port}-{port + 1} free" in line and "\n" not in line
    assert not (tmp_path / "runs").exists()  # nothing created: the run makes its folder
    assert report.seconds < 10


def test_missing_shards_are_all_named(split, tmp_path):
    (split / "shard-000002.tar").unlink()
    (split / "shard-000005.tar").unlink()
    (problem,) = _problems(tiny_config(split, tmp_path / "run"))
    assert f"2 of the 8 shards listed in {split / 'index.json'} are missing" in problem
    assert "shard-000002.tar, shard-000005.tar" in problem and "restore the shards" in problem


def test_invalid_index_names_the_file_and_the_line_here_and_on_the_ranks(split, tmp_path):
    text = json.dumps(json.loads((split / "index.json").read_text()), indent=1)
    (split / "index.json").write_text(text.replace('"shards": [', '"shards": [,', 1))
    (problem,) = _problems(tiny_config(split, tmp_path / "run"))
    assert f"{split / 'index.json'} is not valid JSON (line " in problem and "calmrl data build" in problem
    with pytest.raises(DataError, match=r"index\.json is not valid JSON \(line \d+ column \d+"):
        open_split(split)  # what every rank's loader reads


def test_index_without_its_fields_is_named(split, tmp_path):
    index = json.loads((split / "index.json").read_text())
    del index["num_samples"]
    index["shards"][3] = {"name": "shard-000003.tar"}
    (split / "index.json").write_text(json.dumps(index))
    (problem,) = _problems(tiny_config(split, tmp_path / "run"))
    assert f"{split / 'index.json'} is not a shard index: it has no 'num_samples' field" in problem
    index["num_samples"] = 800
    (split / "index.json").write_text(json.dumps(index))
    (problem,) = _problems(tiny_config(split, tmp_path / "run"))
    assert "shards[3] is {'name': 'shard-000003.tar'}" in problem


def test_a_shard_that_is_not_a_tar_is_named(split, tmp_path):
    (split / "shard-000004.tar").write_bytes(b"<html>403 Forbidden</html>" * 40)
    (split / "shard-000006.tar").write_bytes(b"")
    (problem,) = _problems(tiny_config(split, tmp_path / "run"))
    assert "2 shards cannot be read as tar files" in problem
    assert f"{split / 'shard-000004.tar'} does not start with a tar header" in problem
    assert f"{split / 'shard-000006.tar'} is empty" in problem


def test_a_missing_tokenizer_is_named(split, tmp_path):
    (split.parent / "tokenizer.json").unlink()
    (problem,) = _problems(tiny_config(split, tmp_path / "run"))
    assert problem.startswith("data.tokenizer:") and "tokenizer.json" in problem


def test_too_few_shards_for_the_readers_gives_the_numbers_and_the_fixes(split, tmp_path):
    cfg = tiny_config(split, tmp_path / "run", data={"num_workers": 3})
    (problem,) = _problems(cfg, nproc=4)
    assert "has 8 shards, fewer than the 12 readers (4 ranks x 3 workers)" in problem
    assert "--shard-size (e.g. 66)" in problem and "data.num_workers" in problem and "data.resampled" in problem
    preflight(cfg, 2, None)  # 6 readers: enough
    resampled = tiny_config(split, tmp_path / "run", data={"num_workers": 3, "resampled": True})
    assert "(resampled) for 4 ranks x 3 workers" in preflight(resampled, 4, None).summary


def test_an_out_dir_that_cannot_be_written_is_named(split, tmp_path):
    if os.geteuid() == 0:  # root writes through any mode bits; /sys refuses even root
        blocked, where = Path("/sys/calmrl-preflight-test/run"), Path("/sys")
    else:
        where = tmp_path / "readonly"
        where.mkdir()
        where.chmod(0o555)
        blocked = where / "run"
    (problem,) = _problems(tiny_config(split, blocked))
    assert problem.startswith(f"train.out_dir {blocked} is not writable: writing in {where} failed")
    assert "--train.out_dir" in problem
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (problem,) = _problems(tiny_config(split, a_file / "run"))
    assert f"lies under {a_file}, a file" in problem


def test_an_out_dir_without_room_for_a_checkpoint_is_named(tmp_path):
    assert "writable" in _check_out_dir(tmp_path, 1024)
    with pytest.raises(PreflightError) as caught:
        _check_out_dir(tmp_path / "run", 2**60)  # an exbibyte: no disk has it free
    (problem,) = caught.value.problems
    assert f"train.out_dir {tmp_path / 'run'}:" in problem and "less than one checkpoint (about" in problem


def test_resume_tags_resolve_or_name_the_available_ones(split, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(split, run)
    (problem,) = _problems(cfg, resume="latest")
    assert f"--resume latest: no checkpoint to resume: {run / 'checkpoints' / 'latest'} does not exist" in problem
    assert "resume auto: no checkpoint, starts fresh" in preflight(cfg, 2, "auto").summary

    _checkpoint(run, "step_00000010", ranks=2, latest=False)
    _checkpoint(run, "step_00000020", ranks=2)
    assert "resume latest -> step_00000020" in preflight(cfg, 2, "latest").summary
    assert "resume auto -> step_00000020" in preflight(cfg, 2, "auto").summary
    assert "resume step_00000010" in preflight(cfg, 2, "step_00000010").summary
    (problem,) = _problems(cfg, resume="step_00000030")
    assert f"{run / 'checkpoints' / 'step_00000030'} does not exist" in problem
    assert "step_00000010" in problem and "step_00000020" in problem  # the intact ones are named
    # another number of ranks resumes through the universal checkpoint: said, not refused
    assert "resume latest -> step_00000020, written by 2 ranks: resharded to 1" in preflight(cfg, 1, "latest").summary


def test_a_metrics_port_in_use_is_named(split, tmp_path):
    with _listening() as held:
        port = held.getsockname()[1]
        for addr in ("127.0.0.1", "0.0.0.0"):  # 0.0.0.0 clashes with a port held on loopback too
            cfg = tiny_config(split, tmp_path / "run", metrics={"enabled": True, "port": port - 1, "addr": addr})
            (problem,) = _problems(cfg, nproc=2)
            assert f"metrics: port {port} (Address already in use) on {addr} cannot be bound" in problem
            assert f"metrics.port + i ({port - 1}-{port})" in problem and "--metrics.port" in problem
    free = tiny_config(split, tmp_path / "run", metrics={"enabled": True, "port": port - 1, "addr": "127.0.0.1"})
    assert f"metrics ports {port - 1}-{port} free" in preflight(free, 2, None).summary


def test_init_from_must_name_a_run_with_that_checkpoint(split, tmp_path):
    (problem,) = _problems(tiny_config(split, tmp_path / "run", train={"init_from": str(tmp_path / "nowhere")}))
    assert problem.startswith(f"train.init_from: {tmp_path / 'nowhere'} is not a calmrl run folder")
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.yaml").write_text("{}\n")
    _checkpoint(source, "step_00000004", ranks=1)
    cfg = tiny_config(split, tmp_path / "run", train={"init_from": f"{source}:step_00000008"})
    (problem,) = _problems(cfg)
    assert f"{source / 'checkpoints' / 'step_00000008'} does not exist" in problem
    ok = tiny_config(split, tmp_path / "run", train={"init_from": str(source)})
    assert f"init_from {source}:step_00000004" in preflight(ok, 2, None).summary


def test_an_unknown_tower_is_named_with_the_registered_ones(split, tmp_path):
    cfg = tiny_config(split, tmp_path / "run", model={"image": {"name": "vit_huge"}})
    (problem,) = _problems(cfg)
    assert problem.startswith("model.image.name: no image tower named 'vit_huge'; registered: ") and "cnn" in problem


def test_every_problem_is_reported_at_once(split, tmp_path):
    (split / "shard-000001.tar").unlink()
    with _listening() as held:
        port = held.getsockname()[1]
        cfg = tiny_config(split, tmp_path / "run", metrics={"enabled": True, "port": port, "addr": "127.0.0.1"})
        with pytest.raises(PreflightError) as caught:
            preflight(cfg, 1, "step_00000001")
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["data.shards", "--resume step_00000001", "metrics"]
    assert str(caught.value).startswith("preflight found 3 problems:\n  - data.shards")
