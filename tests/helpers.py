"""Shared test utilities: tiny configs, the CLI in a subprocess, and a real multi-process (gloo) runner."""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from pretrain.config import Config, config_from_dict
from pretrain.runtime import REPO_ROOT, configure_runtime, free_port

REPO = REPO_ROOT
CALMRL = str(Path(sys.executable).parent / "calmrl")  # the installed console script


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: str | Path = REPO
) -> subprocess.CompletedProcess:
    """`calmrl ARGS` through the installed console script, in its own process group.

    One OpenMP thread per process unless `env` says otherwise (tests share two
    cores). Past `timeout` the whole group (torchrun, ranks, Ray) is killed and
    the test fails with the output so far: a hang never blocks the suite."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [CALMRL, *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"calmrl {' '.join(args)} did not finish in {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tiny_config(shards: str | Path, out_dir: str | Path, **sections: dict[str, Any]) -> Config:
    """A very small model and batch for tests; `sections` override per section."""
    tree: dict[str, Any] = {
        "data": {"shards": str(shards), "batch_size": 16, "num_workers": 0, "shuffle_buffer": 32},
        "model": {
            "embed_dim": 32,
            "image": {"name": "cnn", "width": 32, "depth": 2},
            "text": {"name": "transformer", "width": 32, "depth": 1, "heads": 2},
            "audio": {"name": "conv1d", "width": 32, "depth": 2},
        },
        "calibration": {"method": "calmrl", "warmup_steps": 3, "latent_dim": 8},
        "train": {
            "out_dir": str(out_dir),
            "steps": 30,
            "lr": 3e-3,
            "warmup_steps": 3,
            "zero_stage": 1,
            "log_every": 1,
            "ckpt_every": 0,
        },
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return config_from_dict(tree, "<test>")


def assert_matches_reference(out: dict[str, Any], ref: Any, inputs: list[Any], grad_atol: float) -> None:
    """An objective's output (`loss`, `loss_value`) equals a naive reference loss, and so do
    their gradients with respect to `inputs`."""
    import torch

    assert math.isclose(float(out["loss"].detach()), float(ref.detach()), abs_tol=1e-5)
    assert math.isclose(float(out["loss_value"]), float(ref.detach()), abs_tol=1e-5)
    ours = torch.autograd.grad(out["loss"], inputs, allow_unused=True)
    theirs = torch.autograd.grad(ref, inputs, allow_unused=True)  # e.g. a fixed temperature: no scale gradient
    for x, a, b in zip(inputs, ours, theirs):
        zero = torch.zeros_like(x)
        assert torch.allclose(zero if a is None else a, zero if b is None else b, atol=grad_atol)


def _child(fn: Callable, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    configure_runtime(threads=1)
    path = Path(out_dir) / f"result_{rank}.pkl"
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report any failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    path.write_bytes(pickle.dumps(result))


def run_distributed(fn: Callable, world: int, tmp_dir: str | Path, *args: Any, timeout: float = 300) -> list[Any]:
    """Run fn(rank, world, *args) in `world` spawned processes on gloo; return each rank's result.

    A rank that fails raises here with its traceback; a hang past `timeout` kills all ranks
    and fails (it never blocks the suite)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, str(tmp_dir), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (a collective hang?)")
    results, failures = [], []
    for r in range(world):
        path = Path(tmp_dir) / f"result_{r}.pkl"
        if not path.exists():
            code = procs[r].exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            failures.append(f"rank {r} died without a result ({how})")
            continue
        status, value = pickle.loads(path.read_bytes())
        path.unlink()
        if status != "ok":
            failures.append(f"rank {r} failed:\n{value}")
        results.append(value)
    if failures:  # every rank's story: the one that died first explains the others' "connection reset"
        raise RuntimeError("\n".join(failures))
    return results


def require_root(why: str) -> None:
    """Fail (not skip) when not root: CI runs as root (.ci/run installs with apt-get), so a
    test that needs it must not pass silently elsewhere."""
    if os.geteuid() != 0:
        pytest.fail(f"this test needs root: {why}")


@contextmanager
def mounted_tmpfs(path: str | Path, size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """A real small file system at `path` (tmpfs of `size`; mounted read-only if asked), unmounted
    on exit. A full disk and a read-only one as a job meets them; needs root (chmod does not stop root)."""
    require_root("it mounts a tmpfs to get a full or read-only file system")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: str | Path, read_only: bool) -> None:
    """Switch a mount made by `mounted_tmpfs` between read-only and read-write."""
    subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(path)], check=True)
