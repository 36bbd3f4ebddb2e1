"""Where shards live: local folders or `s3://bucket/prefix` through s3fs.

The S3 endpoint and credentials come from the standard AWS environment and
config files (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`~/.aws/credentials`, ...).

A store that stops answering is reported within a stated bound, not after
minutes. Every S3 request (a HEAD, a GET of a block, one page of a listing)
makes at most `CALMRL_S3_RETRIES` attempts (default 3), each with a connect
timeout and a read timeout of `CALMRL_S3_TIMEOUT_S` (default 5 s), and
botocore sleeps at most min(2^(i-1), 20) s before retry i. So a request
gives up within

    attempts x (connect + read timeout) + sum_{i=1}^{attempts-1} min(2^(i-1), 20)
    = 3 x (5 + 5) + (1 + 2) = 33 s by default

of the store's last answer, with a `StorageError` naming the URL, the
endpoint, the time spent and the variables to change. The read timeout is an
idle timeout: a store that keeps sending bytes is not cut off, however large
the object.

Only botocore retries (standard mode: timeouts, dropped connections, 5xx,
throttling, until a response arrives). s3fs's own retry loop (5 tries) is
switched off: it wrapped botocore's attempts, and wraps them twice for reads
of an open file (`_inner_fetch` around `_call_s3`). With the read timeout
then set to 6 x CALMRL_S3_TIMEOUT_S, `CALMRL_S3_TIMEOUT_S=2
CALMRL_S3_RETRIES=2` made 5 x 3 = 15 connections of 12 s each: 197 s with
backoff. The price: an object whose body stops arriving fails its read
within one read timeout, not retried (s3fs's loop was the one that retried
bodies, and it cannot be kept for bodies alone).
"""

from __future__ import annotations

import functools
import io
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, cast

import fsspec


class StorageError(RuntimeError):
    """A store that cannot be reached, or an object that is not there."""

    def __str__(self) -> str:
        # The message alone: webdataset's tar reader appends the stream and URL to `args`.
        return str(self.args[0]) if self.args else ""


def is_remote(url: str | Path) -> bool:
    return "://" in str(url)


def join(base: str | Path, *names: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_limits() -> tuple[int, float]:
    """(attempts per request, connect and read timeout in seconds) from the environment."""
    try:
        attempts = int(os.environ.get("CALMRL_S3_RETRIES", "3"))
        timeout = float(os.environ.get("CALMRL_S3_TIMEOUT_S", "5"))
    except ValueError as exc:
        raise StorageError(f"CALMRL_S3_RETRIES must be an integer and CALMRL_S3_TIMEOUT_S a number: {exc}") from exc
    if attempts < 1 or timeout <= 0:
        raise StorageError(
            f"CALMRL_S3_RETRIES={attempts} must be at least 1 (attempts per request) "
            f"and CALMRL_S3_TIMEOUT_S={timeout} above 0"
        )
    return attempts, timeout


def s3_request_bound_s(attempts: int, timeout: float) -> float:
    """The longest an S3 request takes to give up on a store that does not answer:
    every attempt may wait a connect and a read timeout, and botocore's standard
    mode sleeps rand(0, 1) x min(2^(i-1), 20) s before retry i."""
    return attempts * 2 * timeout + sum(min(2.0 ** (i - 1), 20.0) for i in range(1, attempts))


@functools.cache
def _s3(endpoint: str | None, pid: int, attempts: int, timeout: float) -> Any:
    """One S3FileSystem per endpoint, limits and process (loader workers are new processes)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"total_max_attempts": attempts, "mode": "standard"},
        },
    )
    # s3fs retries (socket timeouts, HTTP client errors) around botocore's own
    # retries, and twice over for reads of an open file: one pass of its loop
    # leaves the retrying to botocore alone, so attempts are what they say.
    # (An instance attribute: s3fs's constructor takes no `retries`.)
    fs.retries = 1
    return fs


def filesystem(url: str | Path) -> Any:
    if str(url).startswith("s3://"):
        return _s3(s3_endpoint(), os.getpid(), *s3_limits())
    if is_remote(url):
        return fsspec.filesystem(str(url).split("://", 1)[0])
    return fsspec.filesystem("file")


def _describe(url: str) -> str:
    if str(url).startswith("s3://"):
        return f"{url} (endpoint {s3_endpoint() or 'AWS default'})"
    return str(url)


def _fail(url: str, exc: BaseException, started: float | None = None, doing: str = "read") -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{_describe(url)} does not exist")
    after = f" after {time.monotonic() - started:.1f} s" if started is not None else ""
    hint = ""
    if str(url).startswith("s3://"):
        attempts, timeout = s3_limits()
        hint = (
            f"; each request makes CALMRL_S3_RETRIES={attempts} attempts with connect and read timeouts of "
            f"CALMRL_S3_TIMEOUT_S={timeout:g} s (gives up within {s3_request_bound_s(attempts, timeout):.0f} s); "
            "check AWS_ENDPOINT_URL(_S3), credentials and the network, or raise those two for a slow store"
        )
    return StorageError(f"cannot {doing} {_describe(url)}{after}: {_chain(exc)}{hint}")


def _chain(exc: BaseException) -> str:
    """An error with what caused it: the library's last word can hide the cause
    (s3fs answers a read timeout with `IndexError: tuple index out of range`)."""
    links: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(links) < 4:
        links.append(f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return ", from ".join(links)


class _NamedFailures(io.RawIOBase):
    """A remote object open for reading whose read failures (a store that stops
    answering mid-object) raise StorageError naming it, not a bare botocore or
    aiohttp error that tar reading would not recognise."""

    def __init__(self, url: str, f: Any):
        super().__init__()
        self.url, self._f = url, f

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        started = time.monotonic()
        try:
            return bytes(self._f.read(-1 if size is None else size))
        except Exception as exc:  # botocore and aiohttp raise many types
            raise _fail(self.url, exc, started) from exc

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_read(url: str) -> IO[bytes]:
    """A binary stream; missing objects and unreachable stores raise StorageError."""
    if not is_remote(url):
        try:
            return open(url, "rb", buffering=1 << 20)  # tar streaming reads 10 KiB at a time
        except OSError as exc:
            raise _fail(url, exc) from exc
    started = time.monotonic()
    try:
        f = filesystem(url).open(url, "rb")
    except Exception as exc:  # botocore and aiohttp raise many types
        raise _fail(url, exc, started) from exc
    return cast(IO[bytes], _NamedFailures(url, f))


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        try:
            return f.read()
        except StorageError:
            raise
        except Exception as exc:
            raise _fail(url, exc) from exc


def list_names(url: str) -> set[str]:
    """Names of the objects directly under a folder/prefix."""
    started = time.monotonic()
    try:
        fs = filesystem(url)
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(str(url), detail=False)}
    except Exception as exc:
        raise _fail(url, exc, started) from exc


def upload_tree(local: str | Path, url: str) -> None:
    """Copy a built shard folder to a store: shards first, `index.json` files
    last, so a split that shows an index is complete. Each object appears
    only once its upload has finished."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "index.json")
    fs = filesystem(url)
    for path in files:
        target = join(url, *path.relative_to(local).parts)
        started = time.monotonic()
        try:
            fs.put_file(str(path), target)
        except Exception as exc:
            raise _fail(target, exc, started, doing="write") from exc


def register_webdataset_scheme() -> None:
    """Let webdataset's gopen open s3:// URLs through s3fs (it has no S3 scheme)."""
    import webdataset  # noqa: F401  (makes sure the module is loaded)

    gopen_module = sys.modules["webdataset.gopen"]
    gopen_module.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: open_read(url)
