"""Bad input is counted, logged once with key and shard, and skipped; missing
shards and dead stores are errors that name them; resume sees an epoch once."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.contract import DataConfig
from data_pipeline.reader import BatchLoader, LoaderState, iterate_split
from data_pipeline.shards import ShardSetWriter, atomic_write_json, read_index
from data_pipeline.storage import StorageError
from data_pipeline.synthetic import SyntheticSpec, make_sample
from data_pipeline.tar_reading import BadInputLog

BAD_KEYS = {"badimage", "badaudio", "emptycaption", "nomodality", "liar"}


def _good(i: int, rng) -> dict:
    return make_sample(i, "train", SyntheticSpec(), rng)


@pytest.fixture(scope="module")
def bad_split(synthetic_dir, tmp_path_factory) -> Path:
    """4 good shards of 20, one shard with 5 bad samples among 5 good, one truncated shard."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copy(synthetic_dir / "tokenizer.json", root / "tokenizer.json")
    split = root / "train"
    rng = np.random.default_rng(1)
    with ShardSetWriter(split, shard_size=20, extra_index={"tokenizer": "../tokenizer.json"}) as writer:
        for i in range(100):
            writer.write(_good(i, rng))
    index = read_index(split)
    # shard 5: hand-written with bad samples (ShardSetWriter refuses some of them)
    good: list[dict[str, Any]] = [_good(1000 + i, rng) for i in range(5)]
    image_only = next(s for s in (_good(2000 + i, rng) for i in range(50)) if "png" in s)
    text_only = next(s for s in (_good(3000 + i, rng) for i in range(50)) if "txt" in s)
    audio_only = next(s for s in (_good(4000 + i, rng) for i in range(50)) if "flac" in s)
    bad: list[dict[str, Any]] = [
        {"__key__": "badimage", "png": b"not a png at all", "json": {"modalities": ["image"]}},
        {"__key__": "badaudio", "flac": b"fLaC garbage", "json": {"modalities": ["audio"]}},
        {"__key__": "emptycaption", "txt": b"   \n", "json": {"modalities": ["text"]}},
        {"__key__": "nomodality", "json": {"modalities": []}},
        {"__key__": "liar", "txt": text_only["txt"], "json": {"modalities": ["image", "text"]}},
    ]
    del image_only, audio_only
    with wds.TarWriter(str(split / "shard-000005.tar")) as tar:
        for s in good[:2] + bad + good[2:]:
            tar.write({**s, "json": json.dumps(s["json"]).encode()})
    # shard 6: a good shard cut in the middle
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:
        for i in range(10):
            s = _good(5000 + i, rng)
            tar.write({**s, "json": json.dumps(s["json"]).encode()})
    data = buf.getvalue()
    (split / "shard-000006.tar").write_bytes(data[: len(data) // 2])
    index["shards"] += [{"name": "shard-000005.tar", "count": 10}, {"name": "shard-000006.tar", "count": 10}]
    index["num_samples"] += 20
    atomic_write_json(split / "index.json", index)
    return split


def cfg_for(split: Path, **kw) -> DataConfig:
    return DataConfig(shards=str(split), batch_size=kw.pop("batch_size", 8), shuffle_buffer=kw.pop("shuffle", 1), **kw)


def test_bad_samples_are_counted_logged_and_skipped(bad_split, caplog):
    bad = BadInputLog()
    with caplog.at_level(logging.WARNING, logger="calmrl.data"):
        keys = [k for b in iterate_split(cfg_for(bad_split), bad_split, 8, bad) for k in b["key"] if k]
    assert not BAD_KEYS & set(keys)
    assert len(keys) == len(set(keys))  # nothing substituted or repeated
    assert 100 + 5 <= len(keys) < 100 + 5 + 10  # the truncated shard gives what precedes the cut
    # every sample is read or counted: the five bad ones, and what the truncated shard lost
    total = sum(s["count"] for s in json.loads((bad_split / "index.json").read_text())["shards"])
    assert bad.count == total - len(keys) and bad.count > len(BAD_KEYS)
    assert bad.shards == 1
    text = caplog.text
    for key in BAD_KEYS:
        assert key in text
    assert "shard-000005.tar" in text and "shard-000006.tar" in text and "breaks off" in text
    assert "metadata lists ['image', 'text'] but the shard holds ['text']" in text


def test_bad_count_reaches_the_loader_state_with_workers(bad_split):
    # 7 shards, 2 workers: one epoch per reader is 60 or 65 samples + bad ones
    loader = BatchLoader(cfg_for(bad_split, num_workers=2, batch_size=5), rank=0, world_size=1)
    for _ in range(30):
        next(loader)
    assert loader.state.bad_samples >= len(BAD_KEYS) + 1
    resumed = BatchLoader(
        cfg_for(bad_split, num_workers=2, batch_size=5), 0, 1, LoaderState.from_dict(loader.state.to_dict())
    )
    next(resumed)
    assert resumed.state.bad_samples >= loader.state.bad_samples  # counts survive a resume


def test_shard_deleted_after_start_is_an_error_naming_it(bad_split, tmp_path):
    copy = tmp_path / "train"
    shutil.copytree(bad_split, copy)
    shutil.copy(bad_split.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    loader = iterate_split(cfg_for(copy), copy, 8)
    next(loader)
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(StorageError, match="shard-000003.tar does not exist"):
        for _ in loader:
            pass


def test_resume_mid_epoch_sees_every_sample_once(synthetic_dir):
    """2 ranks x 2 workers, no resampling: stop mid-epoch, resume, finish the epoch."""
    cfg = DataConfig(shards=str(synthetic_dir / "train"), batch_size=10, num_workers=2, shuffle_buffer=50)
    # 8 shards x 100 samples: each of the 4 readers holds 200 samples = 20 batches; a rank's epoch is 40.
    seen = []
    for rank in range(2):
        first = BatchLoader(cfg, rank, 2)
        for _ in range(17):
            seen += next(first)["key"]
        state = LoaderState.from_dict(first.state.to_dict())
        del first
        second = BatchLoader(cfg, rank, 2, state)
        for _ in range(40 - 17):
            seen += next(second)["key"]
    assert len(seen) == 800 and len(set(seen)) == 800


def test_resampled_mode_has_virtual_epochs_and_resumes(synthetic_dir):
    cfg = DataConfig(
        shards=str(synthetic_dir / "val"),
        batch_size=10,
        num_workers=0,
        resampled=True,
        epoch_samples=30,
        shuffle_buffer=10,
    )
    # val has 1 shard: fine for any number of readers in resampled mode
    ref_loader = BatchLoader(cfg, 0, 2)
    reference = [next(ref_loader)["key"] for _ in range(9)]
    assert ref_loader.state.roles[0][0] == 2  # 9 batches of 10 = three virtual epochs of 30
    first = BatchLoader(cfg, 0, 2)
    head = [next(first)["key"] for _ in range(4)]
    second = BatchLoader(cfg, 0, 2, LoaderState.from_dict(first.state.to_dict()))
    assert head + [next(second)["key"] for _ in range(5)] == reference


def test_shard_cut_at_a_member_boundary_is_noticed(synthetic_dir, tmp_path, caplog):
    """A tar cut between two samples reads as a clean, short archive: the index count catches it."""
    import tarfile

    split = tmp_path / "train"
    shutil.copytree(synthetic_dir / "val", split)
    shutil.copy(synthetic_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shard = split / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2]
    cut_key = cut.name.split(".")[0]
    first_of_key = next(m for m in members if m.name.split(".")[0] == cut_key)
    shard.write_bytes(shard.read_bytes()[: first_of_key.offset])  # ends cleanly before that sample
    bad = BadInputLog()
    with caplog.at_level(logging.WARNING, logger="calmrl.data"):
        keys = [k for b in iterate_split(cfg_for(split), split, 50, bad) for k in b["key"] if k]
    assert 0 < len(keys) < 100 and bad.count == 100 - len(keys) and bad.shards == 1  # what the cut lost
    assert f"ends after {len(keys)} of 100 samples" in caplog.text
    # its size no longer fits its layout: it was read by its tar headers, and said so
    assert f"reading shard {shard} by its tar headers" in caplog.text and "does not fit" in caplog.text


def test_shard_changed_after_build_is_noticed_by_its_layout(synthetic_dir, tmp_path, caplog):
    """Same size, other bytes: a member whose header is not where the layout
    says ends the shard (counted, logged with the fix); nothing is substituted."""
    split = tmp_path / "train"
    shutil.copytree(synthetic_dir / "val", split)
    shutil.copy(synthetic_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shard = split / "shard-000000.tar"
    layout = json.loads((split / "shard-000000.layout.json").read_text())
    key, members = layout["samples"][60]
    ext, offset, _ = members[0]
    data = bytearray(shard.read_bytes())
    name = f"{key}.{ext}".encode()
    assert data[offset - 512 : offset - 512 + len(name)] == name
    data[offset - 512 : offset - 512 + len(name)] = f"{key[:-1]}X.{ext}".encode()  # another member's name
    shard.write_bytes(bytes(data))
    bad = BadInputLog()
    with caplog.at_level(logging.WARNING, logger="calmrl.data"):
        keys = [k for b in iterate_split(cfg_for(split), split, 50, bad) for k in b["key"] if k]
    assert keys == [k for k, _ in layout["samples"][:60]] and bad.count == 40 and bad.shards == 1
    assert f"member {key}.{ext} is not at byte {offset} as its layout says" in caplog.text
    assert "rebuild the split" in caplog.text
