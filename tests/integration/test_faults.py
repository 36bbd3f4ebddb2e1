"""The fault suite: what a cluster does to a job, done for real to `calmrl train --nproc 2`.

Real processes and real signals: SIGTERM to the launcher and to the whole process
group (a pod deletion, `scancel`), a learning rate that diverges, `kill -9` and
SIGSTOP of one rank, and resuming on another number of ranks. Each case asserts
what happens and what is lost at most (docs/faults.md). The hung-store, damaged-
checkpoint and full-disk cases are in test_storage_hang.py and test_checkpoint*.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pretrain.guard import EXIT_DIVERGED, EXIT_PREEMPTED
from pretrain.run_dir import RunDir
from tests.helpers import CALMRL, REPO, run_cli

pytestmark = pytest.mark.slow

SMALL = [
    "--data.batch_size=16",
    "--model.text.depth=1",
    "--train.log_every=1",
    "--train.steps=400",  # far: the runs below are stopped, or stop at a `stop_at`
    "--train.warmup_steps=2",
]


def _args(split: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "configs/tiny_cpu.yaml", f"--data.shards={split}", f"--train.out_dir={run}", *SMALL, *extra]


def start(split: Path, run: Path, *extra: str, nproc: int = 2) -> subprocess.Popen:
    """The launcher in a session (process group) of its own; output to files in `run`'s parent."""
    run.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(run.parent / f"{run.name}.out", "w")  # noqa: SIM115 (the process owns it)
    err = open(run.parent / f"{run.name}.err", "w")  # noqa: SIM115
    cmd = [CALMRL, *_args(split, run, *extra), "--nproc", str(nproc)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)


def output(run: Path) -> tuple[str, str]:
    return (run.parent / f"{run.name}.out").read_text(), (run.parent / f"{run.name}.err").read_text()


def logged_steps(run: Path) -> list[dict]:
    return RunDir(run).log_records()


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in logged_steps(run)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}:\n{output(run)[1][-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no step {step} within {timeout} s:\n{output(run)[1][-3000:]}")


def finish(proc: subprocess.Popen, run: Path, timeout: float) -> tuple[int, float]:
    """Wait for the launcher; (exit code, seconds waited). Kills the group and fails past `timeout`."""
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job did not end within {timeout} s:\n{output(run)[1][-3000:]}")
    return code, time.monotonic() - t0


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every live process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(entry.name)] = (int(fields[1]), fields[0])
    return out


def tree(root: int) -> list[int]:
    """`root` and its live descendants: launcher, torchrun, the ranks (torchrun starts each in a
    session of its own, so a process group does not reach them) and their loader workers."""
    procs = _processes()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in procs and procs[pid][1] != "Z":
            found.append(pid)
        todo += [child for child, (parent, _) in procs.items() if parent == pid]
    return found


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    alive = pids
    while time.monotonic() < deadline:
        procs = _processes()
        alive = [p for p in pids if p in procs and procs[p][1] != "Z"]
        if not alive:
            return
        time.sleep(0.2)
    names = {p: (Path("/proc") / str(p) / "cmdline").read_bytes()[:100] for p in alive}
    raise AssertionError(f"processes outlived the job: {names}")


def rank_pid(root: int, rank: int) -> int:
    """The pid of training rank `rank`: a child of torchrun (not one of its loader workers)."""
    procs = _processes()
    pids = tree(root)
    cmd = {p: (Path("/proc") / str(p) / "cmdline").read_bytes() for p in pids}
    torchrun = [p for p in pids if b"torch.distributed.run" in cmd[p]]
    assert torchrun, "no torchrun under the launcher"
    for pid in pids:
        if procs[pid][0] == torchrun[0]:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
    raise AssertionError(f"no rank {rank} under torchrun {torchrun[0]}")


def job_processes(root: int, ranks: int = 2) -> list[int]:
    """The job's processes once every rank runs with its loader worker."""
    deadline = time.monotonic() + 30
    pids = tree(root)
    while len(pids) < 2 + 2 * ranks and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = tree(root)
    assert len(pids) >= 2 + 2 * ranks, f"expected launcher, torchrun, {ranks} ranks and their workers: {pids}"
    return pids


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in logged_steps(run)}


@pytest.mark.timeout(900)
def test_sigterm_saves_the_step_leaves_no_process_and_resume_continues_exactly(synthetic_dir, tmp_path):
    split = synthetic_dir / "train"
    # 1. SIGTERM to the launcher (what a pod deletion or a job manager sends it)
    a = tmp_path / "a"
    proc = start(split, a)
    wait_for_step(proc, a, 3)
    pids = job_processes(proc.pid)
    proc.send_signal(signal.SIGTERM)
    code, waited = finish(proc, a, timeout=120)
    out, err = output(a)
    assert code == EXIT_PREEMPTED, err[-3000:]
    stopped = json.loads((a / "stopped.json").read_text())
    n = stopped["step"]
    assert stopped["signal"] == "SIGTERM" and n >= 3
    assert (a / "checkpoints" / "latest").read_text() == f"step_{n:08d}"  # the step it was on: nothing lost
    assert max(losses(a)) == n
    assert f"stopped by SIGTERM after step {n}" in err and "--resume auto" in err
    assert_gone(pids)

    # 2. SIGTERM to every process of the job at once (what `scancel` does), past step n + 2
    b = tmp_path / "b"
    proc = start(split, b)
    wait_for_step(proc, b, n + 2)
    pids = job_processes(proc.pid)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    code, _ = finish(proc, b, timeout=120)
    assert code == EXIT_PREEMPTED, output(b)[1][-3000:]
    m = json.loads((b / "stopped.json").read_text())["step"]
    assert m >= n + 2 and (b / "checkpoints" / f"step_{m:08d}").is_dir()
    assert_gone(pids)

    # 3. The first run, resumed, continues exactly where the uninterrupted second one went
    resumed = run_cli(*_args(split, a, "--resume", "auto", f"--train.stop_at={n + 2}", "--nproc", "2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (a / "stopped.json").exists()
    got, want = losses(a), losses(b)
    assert sorted(got) == list(range(1, n + 3))
    for step in (n + 1, n + 2):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


@pytest.mark.timeout(600)
def test_a_diverging_run_stops_and_never_saves_a_non_finite_model(synthetic_dir, tmp_path):
    run = tmp_path / "lr"
    proc = start(
        synthetic_dir / "train",
        run,
        "--train.lr=1e6",
        "--train.warmup_steps=0",
        "--train.ckpt_every=2",
        "--train.max_bad_steps=3",
        "--calibration.warmup_steps=2",
    )
    code, _ = finish(proc, run, timeout=300)
    out, err = output(run)
    assert code == EXIT_DIVERGED, err[-3000:]
    assert "training diverged" in err and "3 steps in a row skipped" in err
    latest = (run / "checkpoints" / "latest").read_text()
    assert f"last good checkpoint was saved: {run / 'checkpoints' / latest}" in err
    skipped = [r for r in logged_steps(run) if "skipped" in r]
    assert len(skipped) >= 3 and all(not math.isfinite(r["loss"]) for r in skipped[-3:])
    _, state = RunDir(run).model_state()
    assert all(torch.isfinite(t).all() for t in state.values()), "a non-finite model was saved"


@pytest.mark.timeout(600)
def test_kill_9_of_a_rank_ends_the_job_and_its_loader_workers(synthetic_dir, tmp_path):
    run = tmp_path / "k9"
    proc = start(synthetic_dir / "train", run, "--train.collective_timeout_s=20", "--train.preempt_grace_s=10")
    wait_for_step(proc, run, 3)
    pids = job_processes(proc.pid)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    code, waited = finish(proc, run, timeout=20 + 10 + 30)
    _, err = output(run)
    assert code != 0
    assert "training failed: rank 1 first (exit code -9 (SIGKILL))" in err, err[-3000:]
    said = [line for line in err.splitlines() if line.strip() and not line.startswith("train:")]  # not the bar
    assert "full logs in" in err and len(said) < 15, said  # a summary, not every rank's traceback
    assert_gone(pids)  # the loader workers of both ranks included


@pytest.mark.timeout(600)
def test_a_stopped_rank_ends_the_job_within_the_collective_timeout_and_is_named(synthetic_dir, tmp_path):
    run = tmp_path / "stop"
    proc = start(synthetic_dir / "train", run, "--train.collective_timeout_s=10", "--train.preempt_grace_s=10")
    wait_for_step(proc, run, 3)
    pids = job_processes(proc.pid)
    stopped = rank_pid(proc.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    try:
        # the collective timeout, then torchrun's grace for the stopped rank before SIGKILL
        code, waited = finish(proc, run, timeout=10 + 10 + 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    _, err = output(run)
    assert code != 0
    assert "a collective waited past train.collective_timeout_s" in err, err[-3000:]
    assert "rank 1 silent for" in err and "dead or stalled" in err
    assert_gone(pids)


@pytest.mark.timeout(900)
def test_resume_on_another_number_of_ranks_continues(synthetic_dir, tmp_path):
    split, run = synthetic_dir / "train", tmp_path / "elastic"
    two = run_cli(*_args(split, run, "--train.stop_at=3", "--nproc", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*_args(split, run, "--resume", "auto", "--train.stop_at=5", "--nproc", "1"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "written by 2 ranks: resharded to 1" in one.stdout
    two_again = run_cli(*_args(split, run, "--resume", "auto", "--train.stop_at=7", "--nproc", "2"))
    assert two_again.returncode == 0, two_again.stderr[-3000:]
    assert "written by 1 ranks: resharded to 2" in two_again.stdout
    records = logged_steps(run)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000007"
