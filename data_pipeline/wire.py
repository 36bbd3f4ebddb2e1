"""How batches cross from a DataLoader worker to the training process, and
the worker's start-up (`init_loader_worker`): how it sends, that it dies
with its parent, and that it leaves stop signals to its rank.

A DataLoader worker hands a tensor to the main process through a shared-memory
file of its own (a few hundred microseconds each, whatever the size); a numpy
array is pickled inline through the worker's pipe, which is cheaper up to about
a megabyte. Small batch fields therefore travel as numpy, large ones as tensors.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Any

import numpy as np
import torch
import torch.multiprocessing

_INLINE_MAX_BYTES = 1 << 20


def to_wire(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.numpy() if isinstance(v, torch.Tensor) and v.nbytes <= _INLINE_MAX_BYTES else v for k, v in batch.items()
    }


def from_wire(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def keep_as_is(batch: Any) -> Any:
    """DataLoader `collate_fn` (batches arrive whole): keep the numpy fields numpy until `from_wire`."""
    return batch


def share_batches_by_file(worker_id: int) -> None:
    """DataLoader worker init: send batches through named shared memory files.

    The default (`file_descriptor`) passes each tensor's fd to the main process
    over a socket connection of its own: about 3 ms per batch of 7 tensors here,
    against 0.8 ms by name (`torch_shm_manager` removes files a dead process
    leaves). Only the workers change strategy; the main process receives
    either kind."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def ignore_stop_signals() -> None:
    """Stop signals (SIGTERM, SIGINT, SIGUSR1) are ignored in a loader worker: a
    job manager or torchrun signals the whole process group, and the rank must
    finish its step and save (pretrain/guard.py) while its workers keep serving;
    a worker that died of the signal would fail the rank's next batch. The
    worker still ends with its rank (`die_with_parent`)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel SIGKILL this loader worker when the process that started it dies.

    Torch's own guard, `ManagerWatchdog`, compares `os.getppid()` only between
    batches, when the worker waits for its next index. A worker whose parent was
    killed (`kill -9`, the OOM killer, a scheduler) is often elsewhere: its
    queue's feeder thread is blocked writing a prefetched batch into a full
    pipe that nobody will read (the worker holds the read end too, so the write
    never fails), and the exit the watchdog then starts waits for that thread
    forever; or it is blocked inside a read of a store. Such a worker was seen
    to live for 25 minutes holding 580 MB. PR_SET_PDEATHSIG makes the kernel
    kill it the moment the parent goes, wherever it is blocked.

    The signal is tied to the parent *thread* that forked the worker: a loader
    first iterated in a thread that ends before the process would lose its
    workers too (calmrl iterates loaders in the main thread).

    Off Linux (macOS, Windows) there is no PR_SET_PDEATHSIG; this does nothing
    and torch's watchdog is the only guard."""
    if not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()  # its pid was recorded before the fork
    if parent is None:
        return  # not a multiprocessing child: no loader parent to follow
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed in loader worker {os.getpid()}: {os.strerror(errno)}")
    if os.getppid() != parent.pid:
        # The parent died between the fork and the prctl: no signal will come.
        os.kill(os.getpid(), signal.SIGKILL)


def init_loader_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn` of every calmrl loader with workers."""
    die_with_parent()
    ignore_stop_signals()
    share_batches_by_file(worker_id)
