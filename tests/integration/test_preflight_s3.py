"""The preflight on a split on S3 (moto's real server on 127.0.0.1): one listing
finds every missing shard, no shard is opened."""

from __future__ import annotations

import pytest

from cluster.preflight import PreflightError, preflight
from data_pipeline.storage import filesystem
from tests.helpers import tiny_config
from tests.integration.test_s3 import s3_env, s3_server, s3_split  # noqa: F401  (the fixtures)


def test_missing_shards_on_s3_are_named_from_one_listing(s3_split, tmp_path):  # noqa: F811
    split = f"{s3_split}/train"
    cfg = tiny_config(split, tmp_path / "run")
    assert preflight(cfg, 2, None).summary.startswith("preflight: 8 shards (800 samples) for 2 ranks x 1 worker")
    fs = filesystem(split)
    fs.rm(f"{split}/shard-000002.tar")
    fs.rm(f"{split}/shard-000007.tar")
    with pytest.raises(PreflightError) as caught:
        preflight(cfg, 2, None)
    (problem,) = caught.value.problems
    assert f"2 of the 8 shards listed in {split}/index.json are missing: shard-000002.tar, shard-000007.tar" in problem
