"""Synthetic shards: written atomically with an index, read back into the batch
contract, split by rank and worker without overlap, resumable exactly."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_pipeline.contract import DataConfig
from data_pipeline.decode import AudioFormat, decode_audio
from data_pipeline.errors import DataError
from data_pipeline.reader import BatchLoader, LoaderState, ShardStream, iterate_split
from data_pipeline.shards import ShardSetWriter, read_index
from data_pipeline.split import open_split
from data_pipeline.tar_reading import BadInputLog, raw_samples


def data_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        shards=str(root / "train"),
        batch_size=kw.pop("batch_size", 16),
        num_workers=kw.pop("num_workers", 0),
        shuffle_buffer=kw.pop("shuffle_buffer", 32),
        **kw,
    )


def test_index_counts_match_shards(synthetic_dir):
    index = read_index(synthetic_dir / "train")
    assert index["num_samples"] == sum(s["count"] for s in index["shards"]) == 800
    assert sum(index["pattern_counts"].values()) == 800
    assert len(index["pattern_counts"]) >= 5  # the missing rates produce many patterns
    seen: Counter[str] = Counter()
    for shard in index["shards"]:
        for sample in wds.WebDataset(str(synthetic_dir / "train" / shard["name"]), shardshuffle=False):
            meta = json.loads(sample["json"])
            seen["+".join(meta["modalities"])] += 1
            assert ("png" in sample) == ("image" in meta["modalities"])
            assert ("txt" in sample) == ("text" in meta["modalities"])
            assert ("flac" in sample) == ("audio" in meta["modalities"])
            assert set(meta["attributes"]) == {"shape", "colour", "size", "position"}
    assert dict(seen) == index["pattern_counts"]
    assert not list((synthetic_dir / "train").glob("*.tmp"))


def test_shards_have_plain_headers_and_rebuild_byte_identical(tmp_path, monkeypatch):
    """Whole-second mtimes: no PAX header per member (half the headers to parse),
    and with SOURCE_DATE_EPOCH the same samples give the same bytes."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    samples = [
        {"__key__": f"s{i:03d}", "txt": f"caption {i}".encode(), "json": {"modalities": ["text"]}} for i in range(12)
    ]
    shards = []
    for name in ("a", "b"):
        with ShardSetWriter(tmp_path / name, shard_size=5) as writer:
            for sample in samples:
                writer.write(dict(sample))
        shards.append(sorted((tmp_path / name).glob("*.tar")))
    assert [p.read_bytes() for p in shards[0]] == [p.read_bytes() for p in shards[1]]
    with tarfile.open(shards[0][0]) as tar:
        members = tar.getmembers()
    assert members and all(m.mtime == 1700000000 and not m.pax_headers for m in members)


def test_reading_by_layout_gives_the_samples_of_the_tar_headers(synthetic_dir):
    """Every shard gets a layout, and seeking by it yields the very samples,
    bytes for bytes, that webdataset's grouping of the tar headers yields."""
    split = open_split(synthetic_dir / "train")
    assert set(split.layout_of) == set(split.shards)
    for url, layout_url in split.layout_of.items():
        assert (
            Path(layout_url).exists() and json.loads(Path(layout_url).read_text())["bytes"] == Path(url).stat().st_size
        )
    by_layout, by_headers = BadInputLog(), BadInputLog()
    seeking = list(raw_samples(split.shards, by_layout, split.count_of, split.layout_of))
    headers = list(raw_samples(split.shards, by_headers, split.count_of))
    assert len(seeking) == 800 and by_layout.count == by_headers.count == 0
    assert seeking == headers
    assert [s["__key__"] for s in seeking] == [s["__key__"] for s in wds.WebDataset(split.shards, shardshuffle=False)]


def test_shard_with_long_names_gets_no_layout_and_reads_by_headers(tmp_path):
    """A member name of 100+ bytes sits behind a PAX header, where a reader
    seeking by layout could not check it: that shard is written without one."""
    long_key = "k" * 120
    with ShardSetWriter(tmp_path, shard_size=2) as writer:
        for key in ("a", "b", long_key, "c"):
            writer.write({"__key__": key, "txt": f"caption {key}".encode(), "json": {"modalities": ["text"]}})
    shards = read_index(tmp_path)["shards"]
    assert [s.get("layout") for s in shards] == ["shard-000000.layout.json", None]
    assert sorted(p.name for p in tmp_path.glob("*.layout.json")) == ["shard-000000.layout.json"]
    urls = [str(tmp_path / s["name"]) for s in shards]
    layouts = {urls[0]: str(tmp_path / "shard-000000.layout.json")}
    bad = BadInputLog()
    assert [s["__key__"] for s in raw_samples(urls, bad, None, layouts)] == ["a", "b", long_key, "c"]
    assert bad.count == 0


def test_failed_write_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardSetWriter(tmp_path, shard_size=10) as writer:
        writer.write({"__key__": "a", "txt": b"hello", "json": {"modalities": ["text"]}})
        raise RuntimeError("crash while writing")
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.tmp"))
    assert not list(tmp_path.glob("*.layout.json")) and not (tmp_path / "index.json").exists()


def test_batch_contract(synthetic_dir):
    cfg = data_cfg(synthetic_dir)
    batch = next(iter(BatchLoader(cfg, rank=0, world_size=1)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (16, 24) and batch["text"].dtype == torch.long
    assert batch["text_mask"].shape == (16, 24) and batch["text_mask"].dtype == torch.bool
    assert batch["audio"].shape == (16, 32, 1 + 4000 // 128)
    assert batch["present"].shape == (16, 3) and batch["present"].any(1).all()
    assert len(batch["key"]) == 16
    for m, i in (("image", 0), ("audio", 2)):
        absent = ~batch["present"][:, i]
        assert (batch[m][absent] == 0).all()
        assert (batch[m][~absent].abs().sum(dim=tuple(range(1, batch[m].ndim))) > 0).all()
    assert (batch["text_mask"].any(1) == batch["present"][:, 1]).all()


def test_batched_log_mels_equal_per_sample_decoding(synthetic_dir):
    """collate computes a batch's log-mels in one call; each row is what
    decode_audio gives for that sample alone."""
    cfg = data_cfg(synthetic_dir)
    fmt = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)
    raw = {s["__key__"]: s for s in wds.WebDataset(str(synthetic_dir / "val" / "shard-000000.tar"), shardshuffle=False)}
    batch = next(iterate_split(cfg, synthetic_dir / "val", 32))
    rows = [i for i, key in enumerate(batch["key"]) if key and batch["present"][i, 2]]
    assert len(rows) >= 10
    for i in rows:
        assert torch.equal(batch["audio"][i], decode_audio(raw[batch["key"][i]]["flac"], fmt)), batch["key"][i]


def test_eval_pass_reads_every_sample_once_and_pads(synthetic_dir):
    cfg = data_cfg(synthetic_dir)
    keys = []
    for batch in iterate_split(cfg, synthetic_dir / "val", 64):
        assert batch["present"].shape[0] == 64
        keys += [k for k in batch["key"] if k]
    assert len(keys) == len(set(keys)) == read_index(synthetic_dir / "val")["num_samples"]


def _keys(loader, n):
    it = iter(loader)
    return [k for _ in range(n) for k in next(it)["key"]]


def test_ranks_and_workers_read_disjoint_shards(synthetic_dir):
    cfg = data_cfg(synthetic_dir, num_workers=2, batch_size=10)
    # 8 shards, 2 ranks x 2 workers: each reader owns 2 shards (200 samples) per epoch.
    per_rank = [_keys(BatchLoader(cfg, rank=r, world_size=2), 40) for r in range(2)]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert len(set(per_rank[0])) == 400 and len(set(per_rank[1])) == 400  # one epoch each, no repeat


def test_too_few_shards_is_a_clear_error(synthetic_dir):
    cfg = DataConfig(shards=str(synthetic_dir / "val"), num_workers=2)
    with pytest.raises(DataError, match="fewer than the 4 readers"):
        ShardStream(cfg, rank=0, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_stream(synthetic_dir, workers):
    cfg = data_cfg(synthetic_dir, num_workers=workers, batch_size=12)
    full = BatchLoader(cfg, rank=0, world_size=1)
    reference = _keys(full, 50)  # crosses an epoch boundary (800 samples)
    first = BatchLoader(cfg, rank=0, world_size=1)
    head = _keys(first, 23)
    resumed = BatchLoader(cfg, rank=0, world_size=1, state=LoaderState.from_dict(first.state.to_dict()))
    tail = _keys(resumed, 27)
    assert head + tail == reference


def test_missing_shard_names_it(synthetic_dir, tmp_path):
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(synthetic_dir / "train", copy)
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match="shard-000003.tar"):
        ShardStream(DataConfig(shards=str(copy)), rank=0, world_size=1)
