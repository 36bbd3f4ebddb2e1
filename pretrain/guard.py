"""The step guard: every rank agrees, once per step, whether to apply the step and whether to stop.

One all-reduce of a 5-vector per optimizer step, before the optimizer update,
carries what each rank saw during the step:

- a non-finite loss or gradient (`~isfinite` flags kept on the device, gradients
  checked by a hook on every trainable parameter as autograd produces them);
- the step's loss (its global mean drives the optional spike test);
- a stop request (SIGTERM or SIGUSR1 arrived: a preemption);
- this rank's bad-sample and bad-shard counts (so the log carries the true
  totals of all ranks).

Its one host read per step is the only synchronisation the trainer adds; it
decides for every rank alike, so a skipped step is skipped everywhere and a
stop is taken after the same step everywhere.

A skipped step runs DeepSpeed's step as usual (its gradient bookkeeping and
zeroing stay intact, and the learning-rate schedule advances) but the optimizer
leaves every parameter and moment unchanged (`SkippableAdamW`). Too many
skipped steps in a row stop the run (`Diverged`).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import TrainConfig
from pretrain.distributed import is_distributed, rank, world_size

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on a signal after a checkpoint; rerun to continue
EXIT_DIVERGED = 3  # stopped after train.max_bad_steps skipped steps in a row
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A step's phases, in order, for heartbeats: waiting for its batch, forward/backward, the update.
PHASES = ("waiting for data", "forward and backward", "update")
ALIVE_EVERY_S = 2.0


class Diverged(RuntimeError):
    """Too many non-finite (or spiking) steps in a row; nothing was saved after the last good checkpoint."""


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose `step` does nothing while `skip` is set.

    DeepSpeed's ZeRO optimizers call the wrapped optimizer once per parameter
    group (or sub-group), each time with the host flag the guard set for the
    whole step, so every group of every rank skips alike."""

    skip: bool = False

    def step(self, closure: Any = None) -> Any:
        if self.skip:
            return None
        return super().step(closure)


def find_skippable(optimizer: Any) -> SkippableAdamW:
    """The `SkippableAdamW` inside DeepSpeed's optimizer wrappers."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, SkippableAdamW):
            return seen
        seen = getattr(seen, "optimizer", None)
    raise TypeError(f"no SkippableAdamW inside {type(optimizer).__name__}: build the engine with pretrain.engine")


class StopRequest:
    """Records SIGTERM / SIGUSR1 instead of dying; the trainer stops after the step.

    A second signal of the same kind does not kill either: the job manager's
    SIGKILL after its grace period is the hard stop."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name

    def install(self) -> bool:
        """Start recording (idempotent); False where signals cannot be handled (not the main thread)."""
        if self._previous:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False  # signals reach the main thread only (e.g. a trainer built inside a Ray worker thread)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


STOP_REQUEST = StopRequest()  # the process's one recorder: the CLI installs it at start-up, the trainer reads it


@dataclass
class Decision:
    apply: bool  # the update was applied (False: skipped on every rank)
    stop: bool  # a rank was asked to stop: every rank stops after this step
    loss: float  # the global mean loss of the step (NaN if it was not finite)
    bad_samples: int  # bad samples of all ranks' readers, cumulative
    bad_shards: int  # shards that broke off, all ranks, cumulative
    reason: str = ""  # why the step was skipped


class StepGuard:
    """Collects the step's flags on the device and decides for all ranks (see module doc)."""

    def __init__(self, cfg: TrainConfig, params: Iterable[torch.nn.Parameter], device: torch.device):
        self.cfg = cfg
        self.device = device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # The sum of every gradient element this step: NaN or inf exactly when some element is
        # (or when finite ones overflow float32 together: a diverging step all the same). One
        # reduction and one add per parameter, checked once in `decide`.
        self.grad_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.micro_steps = 0
        self.ema: float | None = None
        self.good_steps = 0
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self._hooks = [p.register_hook(self._check_grad) for p in params if p.requires_grad]
        self.store = _default_store() if is_distributed() and world_size() > 1 else None
        self._alive = threading.Event()
        if self.store is not None:  # "I am alive" every ALIVE_EVERY_S, also while blocked in a collective
            threading.Thread(target=self._post_alive, name="calmrl-alive", daemon=True).start()

    def _post_alive(self) -> None:
        while not self._alive.wait(ALIVE_EVERY_S):
            try:
                assert self.store is not None
                self.store.set(f"calmrl/alive/{rank()}", repr(time.time()))
            except Exception:  # the store went away (the job is ending)
                return

    def _check_grad(self, grad: torch.Tensor) -> None:
        self.grad_sum += grad.sum()

    def observe_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss_sum += loss
        self.micro_steps += 1

    def beat(self, step: int, phase: str) -> None:
        """This rank's heartbeat: the step and the phase of it it reached (`PHASES`), in the
        job's key-value store (host only, no device sync), so that a rank left waiting in a
        collective can name the peer that never arrived (`laggards`)."""
        if self.store is not None:
            self.store.set(f"calmrl/heartbeat/{rank()}", f"{step}:{PHASES.index(phase)}")

    def decide(self, stop_requested: bool, bad_samples: int, bad_shards: int = 0, step: int = 0) -> Decision:
        """Collective: the all-reduce and the step's one host read."""
        self.beat(step, "update")
        self.nonfinite |= ~torch.isfinite(self.grad_sum)
        local = torch.stack(
            [
                self.nonfinite.float(),
                torch.where(self.nonfinite, 0.0, self.loss_sum / max(self.micro_steps, 1)),
                torch.tensor(float(stop_requested), device=self.device),
                torch.tensor(float(bad_samples), device=self.device),
                torch.tensor(float(bad_shards), device=self.device),
            ]
        )
        if is_distributed() and world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        nonfinite, loss_sum, stop, bad, shards = local.tolist()
        self.nonfinite.zero_()
        self.grad_sum.zero_()
        self.loss_sum.zero_()
        self.micro_steps = 0
        loss = math.nan if nonfinite else loss_sum / world_size()
        reason = f"non-finite loss or gradient on {int(nonfinite)} rank(s)" if nonfinite else ""
        factor = self.cfg.loss_spike_factor
        warm = self.ema is not None and self.good_steps >= self.cfg.loss_spike_warmup
        if not reason and factor and warm and self.ema is not None and loss > factor * self.ema:
            reason = f"loss {loss:.4g} is over {factor:g}x its running mean {self.ema:.4g}"
        if reason:
            self.bad_in_a_row += 1
            self.skipped_total += 1
        else:
            self.bad_in_a_row = 0
            self.good_steps += 1
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        return Decision(
            apply=not reason, stop=stop > 0, loss=loss, bad_samples=int(bad), bad_shards=int(shards), reason=reason
        )

    def laggards(self) -> str:
        """After a collective failed: which ranks went silent (dead or stopped processes post
        no "alive"; one blocked in a collective still does), else which are behind the
        furthest heartbeat, as a sentence ('' when it cannot tell). Reads without waiting."""
        if self.store is None:
            return ""
        beats: dict[int, tuple[int, int]] = {}
        alive: dict[int, float] = {}
        try:
            for r in range(world_size()):
                if self.store.check([f"calmrl/heartbeat/{r}"]):
                    step, phase = bytes(self.store.get(f"calmrl/heartbeat/{r}")).decode().split(":")
                    beats[r] = (int(step), int(phase))
                if self.store.check([f"calmrl/alive/{r}"]):
                    alive[r] = float(bytes(self.store.get(f"calmrl/alive/{r}")).decode())
        except Exception:  # the store is gone too (the launcher ended): nothing to name
            return ""

        def where(r: int) -> str:
            return f"step {beats[r][0]} ({PHASES[beats[r][1]]})" if r in beats else "no step yet"

        now = time.time()
        silent = [r for r in range(world_size()) if now - alive.get(r, 0.0) > 3 * ALIVE_EVERY_S]
        if silent and len(silent) < world_size():
            said = ", ".join(
                f"rank {r} silent for {now - alive[r]:.0f} s at {where(r)}"
                if r in alive
                else f"rank {r} never reported"
                for r in silent
            )
            return f"{said}: dead or stalled"
        if not beats:
            return ""
        ahead = max(beats.values())
        behind = [r for r in range(world_size()) if beats.get(r, (-1, 0)) < ahead]
        if not behind:
            return ""
        said = ", ".join(f"rank {r} is at {where(r)}" for r in behind)
        return f"{said} while others are further on: slow, or stuck outside a collective"

    @property
    def exhausted(self) -> bool:
        return bool(self.cfg.max_bad_steps) and self.bad_in_a_row >= self.cfg.max_bad_steps

    def close(self) -> None:
        self._alive.set()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _default_store() -> Any:
    """The process group's key-value store (torchrun's TCPStore), or None."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # a group made without a store (e.g. an external launcher's): no heartbeats
        return None


def all_finite(module: torch.nn.Module) -> bool:
    """Collective: whether every rank's parameters (its ZeRO-3 partition, or the whole
    tensors) are finite. Read before a save: a non-finite model is never written."""
    bad = torch.zeros((), dtype=torch.float32, device=next(module.parameters()).device)
    for p in module.parameters():
        data = getattr(p, "ds_tensor", None)
        data = data if data is not None else p.data
        if data.numel():
            bad += (~torch.isfinite(data)).any().float()
    if is_distributed() and world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return bool(bad.item() == 0)
