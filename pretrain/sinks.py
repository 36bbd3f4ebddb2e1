"""Where step results go: the sink protocol, the run log and the progress bar.

A sink receives every step's `StepResult` (`on_step`) and is closed when
training ends (`close`). The trainer always keeps the run log (rank 0); the
caller adds what it needs: a progress bar (the CLI), the Prometheus exporter
(`cluster.metrics`), a Ray Tune reporter (`cluster.sweep.worker`). Sinks run on
every rank; one that must speak for the run only checks the rank itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from pretrain.step import StepResult


class StepSink(Protocol):
    def on_step(self, result: StepResult) -> None: ...

    def close(self) -> None: ...


class JsonlLog:
    """The run log: one JSON line per logged step, appended (a resumed run continues it)."""

    def __init__(self, path: Path):
        self.path = path

    def on_step(self, result: StepResult) -> None:
        if result.logged:
            with open(self.path, "a") as f:
                f.write(json.dumps(result.record()) + "\n")

    def close(self) -> None:
        pass  # every line is written whole and closed at once


PROGRESS_PREFIX = "@calmrl-progress "  # a progress line, drawn by the local launcher (cluster/launch_local.py)


class ProgressBar:
    """A tqdm bar over the run's steps, with the last loss and samples/s.

    Under the local launcher (`CALMRL_PROGRESS=lines`) rank 0's output goes to
    a log file that the launcher tails line by line, so the bar is drawn there:
    each step prints one `PROGRESS_PREFIX` line of JSON instead."""

    def __init__(self, total: int, desc: str = "train"):
        self.total, self.desc = total, desc
        self.bar: tqdm | None = None
        self.lines = os.environ.get("CALMRL_PROGRESS") == "lines"

    def on_step(self, result: StepResult) -> None:
        if self.lines:
            loss = result.loss if result.logged else None
            payload = {"step": result.step, "total": self.total, "loss": loss, "sps": result.samples_per_s}
            print(PROGRESS_PREFIX + json.dumps(payload), file=sys.stdout, flush=True)
            return
        if self.bar is None:  # starts where the run stands (a resumed run is not at 0)
            self.bar = tqdm(total=self.total, initial=result.step - 1, desc=self.desc, unit="step", dynamic_ncols=True)
        if result.logged:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", sps=f"{result.samples_per_s:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
