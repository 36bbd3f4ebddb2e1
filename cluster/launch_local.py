"""Local multi-process launch: re-run the `calmrl train` command under torchrun, and watch it.

- Signals: SIGTERM, SIGINT, SIGHUP and SIGUSR1 to the launcher are forwarded
  to torchrun, which passes them to every rank (`--signals-to-handle`) and
  gives them `train.preempt_grace_s` to finish the step and save before it
  kills them (`--shutdown-timeout`). The launcher always waits for torchrun,
  so nothing outlives it. A signal to the whole process group (as `scancel`
  sends) reaches every process at once and ends the same way.
- Output: every rank's stdout and stderr go to `RUN/logs/<start time>/`
  (torchrun's `--redirects`); rank 0's lines are echoed here without their
  traceback; torchrun's own lines go to `torchrun.log` there.
- Progress: rank 0 prints machine-readable progress lines (`ProgressLines`)
  that the launcher draws as one progress bar.
- Failure: one short summary naming the rank that failed first, its exit
  code and its last error line, and the folder with the full logs.
- Exit code: the job's, with `EXIT_PREEMPTED` (75) when a signal stopped it
  after a checkpoint (rerun with `--resume auto` to continue).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from pretrain.guard import EXIT_PREEMPTED
from pretrain.run_dir import RunDir
from pretrain.runtime import free_port, threads_per_process
from pretrain.sinks import PROGRESS_PREFIX

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
RANK0_PREFIX = "[default0]:"  # torchrun's prefix of local rank 0's teed lines


def torchrun_command(
    nproc: int, train_args: list[str], port: int | None = None, log_dir: Path | None = None, grace_s: int = 120
) -> list[str]:
    """torchrun on loopback (static rendezvous on 127.0.0.1) running `calmrl train ARGS`."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}"]
    rendezvous = ["--master-addr=127.0.0.1", f"--master-port={port or free_port()}"]
    faults = ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", f"--shutdown-timeout={grace_s}"]
    logs = [f"--log-dir={log_dir}", "--redirects=3", "--tee=3", "--local-ranks-filter=0"] if log_dir else []
    return [*torchrun, *rendezvous, *faults, *logs, "-m", "cluster.cli", "train", *train_args]


@dataclass
class Failure:
    rank: int
    exit_code: str
    error: str


def _last_error(stderr_log: Path) -> str:
    """The last exception line of a rank's stderr (`Type: message`), else its last line."""
    if not stderr_log.is_file():
        return ""
    text = stderr_log.read_text(errors="replace")
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line).strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^(calmrl: |[\w.]+(Error|Exception|Diverged|Interrupt)\b)", line):
            return line
    return lines[-1] if lines else ""


def first_failure(torchrun_log: str, log_dir: Path) -> Failure | None:
    """The 'Root Cause' torchrun reports, with the rank's own last error line."""
    block = torchrun_log.split("Root Cause (first observed failure):", 1)
    if len(block) < 2:
        return None
    rank_m = re.search(r"rank\s*:\s*(\d+)", block[1])
    code_m = re.search(r"exitcode\s*:\s*(-?\d+)[^\n]*?(\((SIG\w+)\))?\s*$", block[1], re.M)
    if rank_m is None:
        return None
    rank = int(rank_m.group(1))
    code = code_m.group(1) if code_m else "?"
    if code_m and code_m.group(3):
        code += f" ({code_m.group(3)})"
    logs = sorted(log_dir.glob(f"*/attempt_*/{rank}/stderr.log"))
    error = _last_error(logs[-1]) if logs else ""
    return Failure(rank, code, error)


class _Progress:
    """Draws rank 0's progress lines as a tqdm bar in the launcher."""

    def __init__(self) -> None:
        self.bar: Any = None

    def update(self, payload: str) -> None:
        from tqdm import tqdm

        p = json.loads(payload)
        if self.bar is None:
            self.bar = tqdm(total=p["total"], initial=p["step"] - 1, desc="train", unit="step", dynamic_ncols=True)
        if p.get("loss") is not None:
            self.bar.set_postfix(loss=f"{p['loss']:.4f}", sps=f"{p['sps']:.0f}")
        self.bar.update(p["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Echo:
    """Rank 0's lines to the console (progress drawn, tracebacks left to the log files);
    torchrun's own lines to `torchrun.log`."""

    def __init__(self, torchrun_log: IO[str], progress: _Progress):
        self.torchrun_log, self.progress = torchrun_log, progress
        self.lock = threading.Lock()
        self.in_traceback = False
        self.text: list[str] = []

    def pump(self, stream: IO[str], out: IO[str]) -> None:
        for line in stream:
            with self.lock:
                self._line(line, out)

    def _line(self, line: str, out: IO[str]) -> None:
        if not line.startswith(RANK0_PREFIX):
            self.torchrun_log.write(line)
            self.torchrun_log.flush()
            self.text.append(line)
            return
        line = line[len(RANK0_PREFIX) :]
        if line.startswith(PROGRESS_PREFIX):
            self.progress.update(line[len(PROGRESS_PREFIX) :])
            return
        # torch prefixes a rank's uncaught traceback with "[rank0]: "
        if re.sub(r"^\[rank\d+\]:\s?", "", line).startswith("Traceback (most recent call last)"):
            self.in_traceback = True
        if self.in_traceback:
            return  # the rank's stderr.log keeps it; the summary names the error
        self.progress.close()
        out.write(line)
        out.flush()


def launch_local(nproc: int, train_args: list[str], run_dir: Path | None = None, grace_s: int = 120) -> int:
    """Run torchrun with `nproc` ranks; forward signals; summarise a failure; return the exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    env["CALMRL_PROGRESS"] = "lines"
    env["PYTHONUNBUFFERED"] = "1"
    log_dir = None
    if run_dir is not None:
        RunDir(run_dir).clear_stopped()
        log_dir = run_dir / "logs" / time.strftime("%Y%m%d-%H%M%S")
        log_dir.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(nproc, train_args, log_dir=log_dir, grace_s=grace_s)
    if log_dir is None:  # no run folder to log into: plain pass-through
        return _run_passthrough(cmd, env)
    received: list[str] = []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    progress = _Progress()
    with open(log_dir / "torchrun.log", "w") as torchrun_log:
        echo = _Echo(torchrun_log, progress)
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            threading.Thread(target=echo.pump, args=(proc.stdout, sys.stdout), daemon=True),
            threading.Thread(target=echo.pump, args=(proc.stderr, sys.stderr), daemon=True),
        ]
        for t in pumps:
            t.start()
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:  # SIGINT arrives as an exception when no handler ran
                    forward(signal.SIGINT, None)
            for t in pumps:
                t.join(timeout=10)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()
    return _outcome(code, received, run_dir, log_dir, "".join(echo.text))


def _run_passthrough(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _outcome(code: int, received: list[str], run_dir: Path | None, log_dir: Path, torchrun_text: str) -> int:
    stopped = _read_stop(run_dir)
    if stopped is not None:
        print(
            f"calmrl: stopped by {stopped['signal']} after step {stopped['step']} with a checkpoint "
            f"({stopped['checkpoint']}); rerun the same command with --resume auto to continue",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    if code == 0:
        return 0
    failure = first_failure(torchrun_text, log_dir)
    if received:
        print(f"calmrl: {', '.join(sorted(set(received)))} received and no checkpoint was written", file=sys.stderr)
    if failure is not None:
        print(
            f"calmrl: training failed: rank {failure.rank} first (exit code {failure.exit_code})"
            + (f": {failure.error}" if failure.error else ""),
            file=sys.stderr,
        )
    else:
        print(f"calmrl: training failed (torchrun exit code {code})", file=sys.stderr)
    print(f"calmrl: full logs in {log_dir}/ (torchrun.log, */attempt_0/<rank>/stderr.log)", file=sys.stderr)
    if failure is not None and failure.exit_code.split()[0].isdigit():
        return int(failure.exit_code.split()[0])  # the failing rank's own code (e.g. 3: diverged)
    return code if code > 0 else 1


def _read_stop(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None:
        return None
    path = RunDir(run_dir).stopped_path
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
