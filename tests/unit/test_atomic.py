"""Atomic writes: the target is whole or untouched, and nothing is left beside it."""

from __future__ import annotations

import json

import pytest

from data_pipeline.atomic import atomic_save_figure, atomic_write, atomic_write_json


def test_writes_replace_whole_files_and_leave_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "index.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    atomic_write(target, "new text", mode=0o640)
    assert target.read_text() == "new text" and (target.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["index.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, b"step_00000002")

    class Broken:
        def savefig(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save_figure(Broken(), target)
    assert target.read_bytes() == b"step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_figures_are_written_in_their_suffix_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = atomic_save_figure(fig, tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_named_temporary_file_is_renamed_in_or_removed(tmp_path):
    from data_pipeline.atomic import atomic_path

    target = tmp_path / "x.faiss"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    with pytest.raises(RuntimeError, match="half"), atomic_path(target) as tmp:
        tmp.write_bytes(b"ha")
        raise RuntimeError("half written")
    assert target.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == ["x.faiss"]
