"""Local multi-process launch: re-run the `calmrl train` command under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

from pretrain.runtime import free_port, threads_per_process


def torchrun_command(nproc: int, train_args: list[str], port: int | None = None) -> list[str]:
    """torchrun on loopback (static rendezvous on 127.0.0.1) running `calmrl train ARGS`."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}"]
    rendezvous = ["--master-addr=127.0.0.1", f"--master-port={port or free_port()}"]
    return [*torchrun, *rendezvous, "-m", "cluster.cli", "train", *train_args]


def launch_local(nproc: int, train_args: list[str]) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    return subprocess.call(torchrun_command(nproc, train_args), env=env)
