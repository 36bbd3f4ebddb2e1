"""An S3 endpoint that accepts TCP connections and never answers.

A real loopback server accepts every connection and holds it open without a
byte in reply (what a wedged proxy or store does). Reading a split, the
evaluation path and one shard must each raise StorageError within the bound
data_pipeline/storage.py states, having made exactly the configured attempts;
so must a store that stops sending in the middle of an object; and a store
that hangs once and then answers must still be read (retried).
"""

from __future__ import annotations

import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from moto.server import ThreadedMotoServer

from data_pipeline.contract import DataConfig
from data_pipeline.reader import iterate_split
from data_pipeline.split import open_split
from data_pipeline.storage import StorageError, filesystem, read_bytes, s3_request_bound_s, upload_tree
from data_pipeline.tar_reading import BadInputLog, raw_samples

ATTEMPTS, TIMEOUT_S = 2, 1.0
# Beyond the bound: creating the S3 client (credentials, endpoint rules) on a
# loaded 2-core machine. Before the fix these reads took 100 s and 15 connections.
SLACK_S = 5.0


class Endpoint:
    """A TCP server on 127.0.0.1 that counts the connections it accepts. The
    first `silent` ones are held open and never answered; later ones are
    forwarded byte for byte to `upstream` (host, port)."""

    def __init__(self, silent: float = math.inf, upstream: tuple[str, int] | None = None):
        self.silent, self.upstream = silent, upstream
        self.connections = 0
        self._held: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            self._held.append(conn)
            if self.connections > self.silent and self.upstream is not None:
                up = socket.create_connection(self.upstream)
                self._held.append(up)
                threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
                threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._server.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def limits(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("CALMRL_S3_RETRIES", str(ATTEMPTS))
    monkeypatch.setenv("CALMRL_S3_TIMEOUT_S", str(TIMEOUT_S))
    return monkeypatch


@pytest.fixture
def silent_store(limits):
    endpoint = Endpoint()
    limits.setenv("AWS_ENDPOINT_URL", endpoint.url)
    yield endpoint
    endpoint.close()


def _open_split() -> None:
    open_split("s3://calmrl-hang/x")


def _evaluation_pass() -> None:
    url = "s3://calmrl-hang/x/test"
    next(iterate_split(DataConfig(shards=url, batch_size=4), url, 4))


def _one_shard() -> None:
    next(raw_samples(["s3://calmrl-hang/x/train/shard-000000.tar"], BadInputLog()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("read", [_open_split, _evaluation_pass, _one_shard], ids=lambda f: f.__name__.strip("_"))
def test_a_store_that_never_answers_fails_within_the_bound(silent_store, read):
    bound = s3_request_bound_s(ATTEMPTS, TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        read()
    elapsed = time.monotonic() - start
    assert elapsed <= bound + SLACK_S, f"gave up after {elapsed:.1f} s, bound {bound:.0f} s"
    assert silent_store.connections == ATTEMPTS
    message = str(err.value)
    assert "s3://calmrl-hang/x/" in message and silent_store.url in message
    assert "CALMRL_S3_RETRIES=2" in message and "CALMRL_S3_TIMEOUT_S=1" in message and " s:" in message


@pytest.fixture(scope="module")
def moto_url():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.mark.timeout(120)
def test_a_store_that_hangs_once_is_retried_and_read(limits, moto_url, synthetic_dir):
    limits.setenv("AWS_ENDPOINT_URL", moto_url)
    fs = filesystem("s3://calmrl-retry")
    if not fs.exists("calmrl-retry"):
        fs.mkdir("calmrl-retry")
    upload_tree(synthetic_dir / "val", "s3://calmrl-retry/val")
    host, port = moto_url.removeprefix("http://").split(":")
    upstream = (host, int(port))
    flaky = Endpoint(silent=1, upstream=upstream)
    try:
        limits.setenv("AWS_ENDPOINT_URL", flaky.url)
        index = read_bytes("s3://calmrl-retry/val/index.json")
        assert index == (synthetic_dir / "val" / "index.json").read_bytes()
        assert flaky.connections >= 2  # the first attempt timed out; a retry (and the GET) were answered
    finally:
        flaky.close()
    once = Endpoint(silent=1, upstream=upstream)  # the same store without retries: the hang is fatal
    try:
        limits.setenv("AWS_ENDPOINT_URL", once.url)
        limits.setenv("CALMRL_S3_RETRIES", "1")
        with pytest.raises(StorageError, match="ReadTimeoutError"):
            read_bytes("s3://calmrl-retry/val/index.json")
        assert once.connections == 1
    finally:
        once.close()


class StallingObject(BaseHTTPRequestHandler):
    """An S3 object of SIZE bytes whose GET sends the headers and 1000 bytes, then
    nothing more while the connection stays open."""

    SIZE = 200_000
    protocol_version = "HTTP/1.1"
    gets: list[str] = []
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def _headers(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(self.SIZE))
        self.send_header("ETag", '"stalling"')
        self.send_header("Last-Modified", "Wed, 02 Dec 2026 05:00:00 GMT")
        if status == 206:
            self.send_header("Content-Range", f"bytes 0-{self.SIZE - 1}/{self.SIZE}")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._headers(200)

    def do_GET(self) -> None:
        self.gets.append(self.path)
        self._headers(206)
        self.wfile.write(bytes(1000))
        self.wfile.flush()
        self.release.wait(60)


@pytest.mark.timeout(120)
def test_a_store_that_stops_mid_object_fails_within_the_bound(limits):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StallingObject)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StallingObject.gets.clear()
    limits.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        start = time.monotonic()
        with pytest.raises(StorageError) as err:
            list(raw_samples(["s3://calmrl-hang/x/shard-000000.tar"], BadInputLog()))
        elapsed = time.monotonic() - start
    finally:
        StallingObject.release.set()
        server.shutdown()
        server.server_close()
    assert elapsed <= s3_request_bound_s(ATTEMPTS, TIMEOUT_S) + SLACK_S
    assert 1 <= len(StallingObject.gets) <= ATTEMPTS
    message = str(err.value)  # the message alone, though webdataset appends to the error's args
    assert message.startswith("cannot read s3://calmrl-hang/x/shard-000000.tar") and "ReadTimeoutError" in message
