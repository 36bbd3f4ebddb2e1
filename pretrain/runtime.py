"""The process's runtime: accelerator, compiled-extension folder, threads, process group.

One place for what every entry point (the CLI, the launchers, the sweep
workers, the benchmarks, the tests) must settle before DeepSpeed is imported
or a process group exists:

- `DS_ACCELERATOR=cpu` where there is no CUDA device (DeepSpeed then uses
  its CPU accelerator and gloo);
- `TORCH_EXTENSIONS_DIR`: DeepSpeed compiles its CPU comm op once (about
  45 s) into this folder; by default the checkout's `.cache/torch_extensions`,
  so that every run and test reuses one build;
- OpenMP/torch threads: the machine's cores shared by the processes on it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from pretrain.distributed import is_distributed

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_per_process(nproc: int, cpus: int | None = None) -> int:
    """OpenMP threads for each of `nproc` processes sharing `cpus` cores (default: this machine's)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, cpus // max(nproc, 1))


def configure_runtime(threads: int | None = None) -> None:
    """Settle the accelerator, the extension folder and (optionally) the thread count.

    Call before `import deepspeed`. Values already in the environment win:
    a user or launcher that set them knows better."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group torchrun (or Ray Train) describes, or make a group of one.

    `timeout_s` bounds every collective (gloo and NCCL): a peer that died or
    stalled ends the job with an error after that long instead of a silent wait
    (`train.collective_timeout_s`; torch's default is 10 min for gloo, 10 for NCCL)."""
    from datetime import timedelta

    import deepspeed

    if is_distributed():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
        # Groups made later (DeepSpeed's data-parallel clone of the world group, for one) take
        # torch's module default, not the world group's timeout: 30 min on gloo, whatever the
        # job asked. Point the default at the job's bound so every group honours it.
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = kwargs["timeout"]
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def device_for_rank() -> torch.device:
    """This rank's GPU (made current), or the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")
