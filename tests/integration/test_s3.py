"""Shards on S3 through s3fs, against moto's real S3 server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
from moto.server import ThreadedMotoServer

from data_pipeline.contract import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.reader import BatchLoader, iterate_split
from data_pipeline.split import open_split
from data_pipeline.storage import StorageError, filesystem, upload_tree
from tests.helpers import free_port, run_cli


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def s3_split(s3_env, synthetic_dir):
    fs = filesystem("s3://calmrl-test")
    if not fs.exists("calmrl-test"):
        fs.mkdir("calmrl-test")
    upload_tree(synthetic_dir, "s3://calmrl-test/synthetic")
    return "s3://calmrl-test/synthetic"


def test_upload_puts_index_last_and_reads_back_like_local(s3_split, synthetic_dir):
    fs = filesystem(s3_split)
    assert fs.exists(f"{s3_split}/train/index.json") and fs.exists(f"{s3_split}/tokenizer.json")
    cfg = DataConfig(shards=f"{s3_split}/val", batch_size=16)
    remote = [k for b in iterate_split(cfg, f"{s3_split}/val", 16) for k in b["key"] if k]
    local = [k for b in iterate_split(cfg, synthetic_dir / "val", 16) for k in b["key"] if k]
    assert remote == local and len(remote) == 100


def test_loader_workers_stream_from_s3(s3_split, synthetic_dir):
    remote_cfg = DataConfig(shards=f"{s3_split}/train", batch_size=10, num_workers=2, shuffle_buffer=20)
    local_cfg = DataConfig(shards=str(synthetic_dir / "train"), batch_size=10, num_workers=2, shuffle_buffer=20)
    remote, local = BatchLoader(remote_cfg, 0, 2), BatchLoader(local_cfg, 0, 2)
    for _ in range(6):
        assert next(remote)["key"] == next(local)["key"]


def test_missing_shard_on_s3_is_named(s3_split):
    filesystem(s3_split).rm(f"{s3_split}/train/shard-000002.tar")
    with pytest.raises(DataError, match="shard-000002.tar"):
        open_split(f"{s3_split}/train")


@pytest.mark.timeout(120)
def test_unreachable_store_fails_fast_with_a_clear_error(monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("CALMRL_S3_RETRIES", "2")
    start = time.monotonic()
    with pytest.raises((StorageError, FileNotFoundError)) as err:
        open_split("s3://calmrl-test/synthetic/train")
    assert time.monotonic() - start < 90
    assert dead in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


@pytest.mark.timeout(200)
def test_cli_builds_shards_straight_to_s3(s3_env, tmp_path):

    fs = filesystem("s3://calmrl-cli")
    if not fs.exists("calmrl-cli"):
        fs.mkdir("calmrl-cli")
    result = run_cli(
        *[
            "data",
            "build",
            "--source",
            "synthetic",
            "--out",
            "s3://calmrl-cli/syn",
            "--num-samples",
            "200",
            "--shard-size",
            "50",
        ],
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "uploaded to s3://calmrl-cli/syn" in result.stdout
    cfg = DataConfig(shards="s3://calmrl-cli/syn/train", batch_size=16)
    keys = [k for b in iterate_split(cfg, "s3://calmrl-cli/syn/train", 16) for k in b["key"] if k]
    assert len(keys) == 160
