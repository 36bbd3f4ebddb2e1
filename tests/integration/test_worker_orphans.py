"""A training process killed with SIGKILL takes its DataLoader workers with it.

A real process tree: a Python process builds a `BatchLoader` with one worker,
takes one batch and sleeps while the worker prefetches more than the pipe to
its parent holds. The test kills that process with SIGKILL. Torch's watchdog
then ends the worker's loop, but its exit waits forever for the queue's feeder
thread, which is blocked writing into the full pipe: only the worker init's
PR_SET_PDEATHSIG (data_pipeline/wire.py) ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import REPO

# Batches of 16 samples of 32x32 images travel inline through the worker's pipe
# (~260 KB each, see wire.py), so four prefetched ones fill it (64 KB).
TRAINER = """
import sys, time
from data_pipeline.contract import DataConfig
from data_pipeline.reader import BatchLoader

cfg = DataConfig(shards=sys.argv[1], batch_size=16, num_workers=1, shuffle_buffer=1)
loader = BatchLoader(cfg, rank=0, world_size=1)
next(loader)
print(*(w.pid for w in loader._iter._workers), flush=True)  # torch's worker processes
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.timeout(180)
def test_loader_worker_dies_with_its_killed_parent(synthetic_dir):
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(synthetic_dir / "train")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: list[int] = []
    try:
        assert trainer.stdout is not None and trainer.stderr is not None
        line = trainer.stdout.readline()
        if not line.strip():  # stdout closed: the trainer ended before its first batch
            trainer.wait(30)
            pytest.fail(f"the trainer printed no worker pids:\n{trainer.stderr.read()[-3000:]}")
        workers = [int(p) for p in line.split()]
        assert len(workers) == 1 and _alive(workers[0])
        time.sleep(2)  # let the worker fill the pipe with prefetched batches
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(30)
        # Torch's watchdog alone notices a dead parent within 5 s, and then the
        # worker hangs in its exit; 15 s separates the two outcomes.
        deadline = time.monotonic() + 15
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(workers[0]), (
            f"loader worker {workers[0]} outlived its parent, killed with SIGKILL, by 15 s "
            f"(state {psutil.Process(workers[0]).status()}, parent {psutil.Process(workers[0]).ppid()})"
        )
    finally:
        trainer.kill()
        trainer.wait()
        for pid in workers:  # a worker this test started and left behind on failure
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
