"""Where shards live: local folders or `s3://bucket/prefix` through s3fs.

The S3 endpoint and credentials come from the standard AWS environment and
config files (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`~/.aws/credentials`, ...). Retries are botocore's (`CALMRL_S3_RETRIES`,
default 3 attempts, with short connect/read timeouts), after which a
`StorageError` names the URL, the endpoint and what to check.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import IO, Any

import fsspec


class StorageError(RuntimeError):
    """A store that cannot be reached, or an object that is not there."""


def is_remote(url: str | Path) -> bool:
    return "://" in str(url)


def join(base: str | Path, *names: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.cache
def _s3(endpoint: str | None, pid: int) -> Any:
    """One S3FileSystem per endpoint and process (loader workers are new processes)."""
    import s3fs

    attempts = int(os.environ.get("CALMRL_S3_RETRIES", "3"))
    timeout = float(os.environ.get("CALMRL_S3_TIMEOUT_S", "5"))
    return s3fs.S3FileSystem(
        endpoint_url=endpoint,
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": timeout,
            "read_timeout": timeout * 6,
            "retries": {"max_attempts": attempts, "mode": "standard"},
        },
    )


def filesystem(url: str | Path) -> Any:
    if str(url).startswith("s3://"):
        return _s3(s3_endpoint(), os.getpid())
    if is_remote(url):
        return fsspec.filesystem(str(url).split("://", 1)[0])
    return fsspec.filesystem("file")


def _describe(url: str) -> str:
    if str(url).startswith("s3://"):
        return f"{url} (endpoint {s3_endpoint() or 'AWS default'})"
    return str(url)


def _fail(url: str, exc: BaseException) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{_describe(url)} does not exist")
    hint = ""
    if str(url).startswith("s3://"):
        hint = "; check AWS_ENDPOINT_URL(_S3), credentials and the network (retried per CALMRL_S3_RETRIES)"
    return StorageError(f"cannot read {_describe(url)}: {type(exc).__name__}: {exc}{hint}")


def open_read(url: str) -> IO[bytes]:
    """A binary stream; missing objects and unreachable stores raise StorageError."""
    if not is_remote(url):
        try:
            return open(url, "rb", buffering=1 << 20)  # tar streaming reads 10 KiB at a time
        except OSError as exc:
            raise _fail(url, exc) from exc
    try:
        return filesystem(url).open(url, "rb")
    except Exception as exc:  # botocore and aiohttp raise many types
        raise _fail(url, exc) from exc


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        try:
            return f.read()
        except Exception as exc:
            raise _fail(url, exc) from exc


def list_names(url: str) -> set[str]:
    """Names of the objects directly under a folder/prefix."""
    try:
        fs = filesystem(url)
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(str(url), detail=False)}
    except Exception as exc:
        raise _fail(url, exc) from exc


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
        try:
            fs.put_file(str(path), target)
        except Exception as exc:
            raise _fail(target, exc) from exc


def register_webdataset_scheme() -> None:
    """Let webdataset's gopen open s3:// URLs through s3fs (it has no S3 scheme)."""
    import webdataset  # noqa: F401  (makes sure the module is loaded)

    gopen_module = sys.modules["webdataset.gopen"]
    gopen_module.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: open_read(url)
