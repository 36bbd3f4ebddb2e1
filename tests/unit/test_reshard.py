"""Resuming the data position on another number of ranks: every sample of the
interrupted epoch is seen exactly once (data_pipeline/reader.py, `reshard_loader_state`)."""

from __future__ import annotations

from collections import Counter

import pytest

from data_pipeline.reader import BatchLoader, LoaderState, reshard_loader_state
from data_pipeline.split import open_split
from tests.helpers import tiny_config


def _keys(loader: BatchLoader, batches: int) -> list[str]:
    out: list[str] = []
    for _ in range(batches):
        out += [k for k in next(loader)["key"] if k]
    return out


def _epoch_keys(split) -> Counter:
    from data_pipeline.tar_reading import BadInputLog, raw_samples

    return Counter(s["__key__"] for s in raw_samples(split.shards, BadInputLog(), split.count_of, split.layout_of))


@pytest.mark.parametrize(("old_world", "new_world", "workers"), [(2, 1, 0), (1, 2, 0), (2, 3, 1), (3, 2, 2)])
def test_the_interrupted_epoch_is_seen_exactly_once(synthetic_dir, tmp_path, old_world, new_world, workers):
    cfg = tiny_config(synthetic_dir / "train", tmp_path, data={"num_workers": workers}).data
    split = open_split(cfg.shards, cfg.tokenizer)
    everything = _epoch_keys(split)
    assert sum(everything.values()) == split.num_samples

    old = [BatchLoader(cfg, r, old_world) for r in range(old_world)]
    before = [k for loader in old for k in _keys(loader, 3)]
    states = [loader.state.to_dict() for loader in old]
    for loader in old:
        loader.close()

    new = [
        BatchLoader(cfg, r, new_world, reshard_loader_state(states, max(workers, 1), r, new_world, max(workers, 1)))
        for r in range(new_world)
    ]
    rest = Counter(everything) - Counter(before)
    carried: list[str] = []  # keys of batches that completed inside the carried streams
    other: list[str] = []  # the batch that ends a carry (its tail is the next epoch), and the next epoch
    for _ in range(400):
        busy = [loader for loader in new if loader.state.carry]
        if not busy:
            break
        for loader in busy:
            keys = _keys(loader, 1)
            (carried if loader.in_carry else other).extend(keys)
    for loader in new:
        loader.close()
    assert not any(loader.state.carry for loader in new)
    assert len(carried) == len(set(carried)), "a sample of the interrupted epoch came twice"
    assert not Counter(carried) - rest, "a carried sample was one the old ranks had already seen"
    missing = rest - Counter(carried) - Counter(other)
    assert not missing, f"{sum(missing.values())} samples of the interrupted epoch were never seen"
    assert len(carried) >= sum(rest.values()) - len(new) * max(workers, 1) * cfg.batch_size


def test_the_loader_state_round_trips_with_its_carry(synthetic_dir, tmp_path):
    cfg = tiny_config(synthetic_dir / "train", tmp_path).data
    loader = BatchLoader(cfg, 0, 2)
    _keys(loader, 2)
    state = reshard_loader_state([loader.state.to_dict(), LoaderState().to_dict()], 1, 0, 1, 1)
    loader.close()
    assert state.carry and LoaderState.from_dict(state.to_dict()) == state


def test_a_chain_of_reshards_still_sees_the_epoch_exactly_once(synthetic_dir, tmp_path):
    """2 ranks -> 1 -> 3, each stopped while the previous reshard's streams were unfinished."""
    cfg = tiny_config(synthetic_dir / "train", tmp_path).data
    split = open_split(cfg.shards, cfg.tokenizer)
    everything = _epoch_keys(split)
    old = [BatchLoader(cfg, r, 2) for r in range(2)]
    seen = [k for loader in old for k in _keys(loader, 2)]
    states = [loader.state.to_dict() for loader in old]
    for world in (1, 3):
        new = [BatchLoader(cfg, r, world, reshard_loader_state(states, 1, r, world, 1)) for r in range(world)]
        for loader in new:
            assert loader.state.carry
            keys = _keys(loader, 2)
            assert loader.in_carry  # still inside the carried streams: the next reshard has carry to pass on
            seen += keys
        states = [loader.state.to_dict() for loader in new]
        for loader in new:
            loader.close()
    final = [BatchLoader(cfg, r, 2, reshard_loader_state(states, 1, r, 2, 1)) for r in range(2)]
    carried: list[str] = []
    other: list[str] = []
    for _ in range(400):
        busy = [loader for loader in final if loader.state.carry]
        if not busy:
            break
        for loader in busy:
            keys = _keys(loader, 1)
            (carried if loader.in_carry else other).extend(keys)
    for loader in final:
        loader.close()
    whole = seen + carried
    assert len(whole) == len(set(whole)), "a sample of the interrupted epoch came twice"
    missing = Counter(everything) - Counter(whole) - Counter(other)
    assert not missing, f"{sum(missing.values())} samples of the interrupted epoch were never seen"
