"""Manifests, verification, the choice of checkpoint to resume, and the save preflight.

Checkpoint folders here are real files laid out as a save lays them out (DeepSpeed's
file names, rank states written by torch.save, the manifest by `write_manifest`);
no engine is needed to choose among them. Saving and loading through DeepSpeed is in
tests/distributed/test_checkpoint.py."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    check_can_save,
    expected_checkpoint_bytes,
    read_manifest,
    step_tag,
    verify_folder,
    write_manifest,
)
from pretrain.run_dir import RunDir
from tests.helpers import mounted_tmpfs

WORLD = 2


def _write_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    """A ZeRO-1 checkpoint of 2 ranks as `Checkpointer.save` leaves it."""
    folder = root / step_tag(step)
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(100.0)}}, folder / "mp_rank_00_model_states.pt")
    for r in range(WORLD):
        torch.save({"exp_avg": torch.full((50,), float(r))}, folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        state = {"loader": {"rank": r}, "world_size": WORLD, "step": step}
        torch.save(state, folder / Checkpointer.rank_state_name(r))
    if manifest:
        write_manifest(folder, step=step, world=WORLD, zero_stage=1)
    (root / "latest").write_text(step_tag(step))
    return folder


def _resolve(ckpt: Checkpointer, tag: str) -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = ckpt.resolve(tag)
    return chosen, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_manifest_round_trip(tmp_path):
    folder = _write_checkpoint(tmp_path, 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.bin").write_bytes(b"x" * 7)
    written = write_manifest(folder, step=10, world=WORLD, zero_stage=1)
    read = read_manifest(folder)
    assert read == written
    assert read["step"] == 10 and read["world_size"] == WORLD and read["zero_stage"] == 1
    names = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    del names[MANIFEST]
    assert read["files"] == names  # every file but the manifest itself, with its size
    assert read["files"]["sub/extra.bin"] == 7
    assert read["total_bytes"] == sum(names.values())
    assert verify_folder(folder).ok


def test_missing_file_in_latest_falls_back_to_the_previous(tmp_path):
    _write_checkpoint(tmp_path, 1)
    damaged = _write_checkpoint(tmp_path, 2)
    lost = damaged / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = lost.stat().st_size
    lost.unlink()
    problem = verify_folder(damaged).problem
    assert problem is not None and str(lost) in problem and f"expected {size} bytes" in problem
    chosen, warned = _resolve(Checkpointer(tmp_path), "latest")
    assert chosen == "step_00000001"
    assert len(warned) == 1
    assert "step_00000002" in warned[0] and lost.name in warned[0] and "resuming from step_00000001" in warned[0]
    # `auto` is `latest` for a run that has a checkpoint
    assert _resolve(Checkpointer(tmp_path), "auto")[0] == "step_00000001"


def test_missing_rank_state_is_named(tmp_path):
    _write_checkpoint(tmp_path, 1)
    damaged = _write_checkpoint(tmp_path, 2)
    (damaged / "trainer_state_rank1.pt").unlink()
    problem = verify_folder(damaged).problem
    assert problem is not None and "trainer_state_rank1.pt is missing" in problem
    assert _resolve(Checkpointer(tmp_path), "latest")[0] == "step_00000001"


def test_truncated_file_falls_back_to_the_previous(tmp_path):
    _write_checkpoint(tmp_path, 1)
    damaged = _write_checkpoint(tmp_path, 2)
    cut = damaged / "mp_rank_00_model_states.pt"
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(size - 96)
    problem = verify_folder(damaged).problem
    assert problem is not None and f"{cut} has {size - 96} bytes, expected {size}" in problem
    chosen, warned = _resolve(Checkpointer(tmp_path), "latest")
    assert chosen == "step_00000001" and cut.name in warned[0]


def test_explicit_damaged_tag_is_an_error_naming_the_file_and_the_intact_ones(tmp_path):
    _write_checkpoint(tmp_path, 1)
    _write_checkpoint(tmp_path, 3)
    damaged = _write_checkpoint(tmp_path, 2)
    (damaged / "trainer_state_rank0.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpointer(tmp_path).resolve("step_00000002")
    message = str(err.value)
    assert "trainer_state_rank0.pt is missing" in message
    assert "intact checkpoints: step_00000001, step_00000003" in message and "--resume step_00000003" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpointer(tmp_path).resolve("step_00000009")


def test_latest_missing_or_all_damaged(tmp_path):
    a = _write_checkpoint(tmp_path, 1)
    _write_checkpoint(tmp_path, 2)
    (tmp_path / "latest").unlink()  # lost pointer: the newest intact folder is used
    assert RunDir(tmp_path.parent).has_checkpoint() is False  # (a folder without checkpoints/)
    assert Checkpointer(tmp_path).step_tags() == ["step_00000001", "step_00000002"]
    chosen, warned = _resolve(Checkpointer(tmp_path), "latest")
    assert chosen == "step_00000002" and "missing" in warned[0]
    (tmp_path / "latest").write_text("step_00000002")
    (a / "mp_rank_00_model_states.pt").unlink()
    (tmp_path / "step_00000002" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="no other checkpoint .* is intact") as err:
        Checkpointer(tmp_path).resolve("latest")
    assert "step_00000001: " in str(err.value)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        Checkpointer(tmp_path / "empty").resolve("latest")


def test_checkpoint_without_manifest_is_checked_for_presence_with_a_warning(tmp_path):
    _write_checkpoint(tmp_path, 1, manifest=False)
    chosen, warned = _resolve(Checkpointer(tmp_path), "latest")
    assert chosen == "step_00000001" and "no manifest.json" in warned[0] and "not their sizes" in warned[0]
    (tmp_path / "step_00000001" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    problem = verify_folder(tmp_path / "step_00000001").problem
    assert problem is not None and "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing or empty" in problem
    with pytest.raises(CheckpointError, match="zero_pp_rank_1"):
        Checkpointer(tmp_path).resolve("latest")


def test_run_dir_readers_use_the_intact_checkpoint(tmp_path):
    _write_checkpoint(tmp_path / "checkpoints", 1)
    damaged = _write_checkpoint(tmp_path / "checkpoints", 2)
    (damaged / "trainer_state_rank0.pt").unlink()
    run = RunDir(tmp_path)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert run.has_checkpoint()  # --resume auto resumes a run whose `latest` was lost
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    with pytest.warns(CheckpointWarning, match="resuming from step_00000001"):
        assert run.rank_state("latest", rank=1)["loader"] == {"rank": 1}
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000001")
    with pytest.raises(CheckpointError, match="trainer_state_rank0.pt is missing"):
        run.rank_state("latest")


def test_check_can_save(tmp_path):
    check_can_save(tmp_path / "new" / "checkpoints", 1024)  # creates the folder, leaves nothing else
    assert list((tmp_path / "new" / "checkpoints").iterdir()) == []
    with pytest.raises(CheckpointError) as err:
        check_can_save(tmp_path, 1 << 60)
    free = shutil.disk_usage(tmp_path).free
    assert f"{1 << 60} bytes" in str(err.value) and "free" in str(err.value)
    reported = int(str(err.value).split(" free (")[1].split(" bytes")[0])
    assert abs(reported - free) < 64 << 20


def test_check_can_save_on_a_small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", size="1m") as disk:
        check_can_save(disk, 512 << 10)
        with pytest.raises(CheckpointError, match=r"has 1\.0 MiB free \(1048576 bytes\) but one checkpoint needs"):
            check_can_save(disk, 2 << 20)


def test_check_can_save_on_a_read_only_folder(tmp_path):
    with (
        mounted_tmpfs(tmp_path / "ro", size="1m", read_only=True) as folder,
        pytest.raises(CheckpointError, match="cannot write checkpoints to .*Read-only file system"),
    ):
        check_can_save(folder, 1)


def test_expected_checkpoint_bytes():
    n = 1_000_000
    assert expected_checkpoint_bytes(n, 1, margin=0) == 16 * n + 65536  # fp32 weights + master + 2 moments
    assert expected_checkpoint_bytes(n, 3, margin=0) == 12 * n + 65536  # stage 3: weights only as master shards
    assert expected_checkpoint_bytes(n, 0, margin=0) == 12 * n + 65536  # stage 0: module + torch Adam moments
    assert expected_checkpoint_bytes(n, 2, precision="bf16", margin=0) == 14 * n + 65536
    assert expected_checkpoint_bytes(n, 1, world_size=4) > expected_checkpoint_bytes(n, 1, world_size=1)
    with pytest.raises(ValueError):
        expected_checkpoint_bytes(n, 4)


def test_unreadable_manifest_is_a_problem_not_a_crash(tmp_path):
    folder = _write_checkpoint(tmp_path, 1)
    (folder / MANIFEST).write_text("{not json")
    problem = verify_folder(folder).problem
    assert problem is not None and "unreadable" in problem
    (folder / MANIFEST).write_text(json.dumps({"files": {}}))
    assert verify_folder(folder).ok
