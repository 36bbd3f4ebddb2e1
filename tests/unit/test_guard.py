"""The step guard on one process: what it counts as a bad step, the skip, the stop
request, and naming a silent rank (pretrain/guard.py). The all-reduce across ranks and
the real signals are in tests/integration/test_faults.py."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.distributed import HashStore

import pretrain.guard as guard_module
from pretrain.config import TrainConfig
from pretrain.guard import SkippableAdamW, StepGuard, StopRequest


def _guard(**train) -> tuple[StepGuard, torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    return StepGuard(TrainConfig(**train), [p], torch.device("cpu")), p


def test_a_finite_step_is_applied_and_its_loss_read():
    guard, p = _guard()
    loss = (p * 2).sum()
    guard.observe_loss(loss)
    loss.backward()
    decision = guard.decide(stop_requested=False, bad_samples=3, bad_shards=1)
    assert decision.apply and not decision.stop and decision.loss == pytest.approx(2.0)
    assert (decision.bad_samples, decision.bad_shards) == (3, 1)


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped():
    guard, p = _guard()
    loss = torch.sqrt(p).sum()  # sqrt'(0) = inf: the loss is 1, the gradient is not finite
    guard.observe_loss(loss)
    loss.backward()
    decision = guard.decide(False, 0)
    assert torch.isfinite(loss) and not decision.apply and "non-finite" in decision.reason
    # the flag is per step: the next, finite step is applied again
    p.grad = None
    loss = (p * 1).sum()
    guard.observe_loss(loss)
    loss.backward()
    assert guard.decide(False, 0).apply and guard.bad_in_a_row == 0 and guard.skipped_total == 1


def test_a_loss_spike_is_skipped_once_the_running_mean_is_warm_and_bad_steps_stop_the_run():
    guard, p = _guard(loss_spike_factor=2.0, loss_spike_warmup=3, max_bad_steps=2)

    def step(value: float):
        guard.observe_loss(torch.tensor(value))
        return guard.decide(False, 0)

    assert step(1.0).apply and step(1.0).apply and step(1.0).apply
    spiked = step(5.0)
    assert not spiked.apply and "over 2x its running mean" in spiked.reason
    assert not guard.exhausted
    assert not step(float("nan")).apply and guard.exhausted  # two in a row: max_bad_steps


def test_a_skipped_update_leaves_parameters_and_moments_unchanged():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = torch.full((3,), 100.0)
    opt.skip = True
    opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    opt.skip = False
    opt.step()
    assert not torch.equal(p, before[0])


def test_a_stop_signal_is_recorded_instead_of_ending_the_process():
    stop = StopRequest()
    assert stop.install() and stop.installed and not stop.requested
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert stop.requested and stop.signal == "SIGUSR1"
    finally:
        stop.restore()
    assert not stop.installed and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_the_silent_rank_is_named_from_the_heartbeats(monkeypatch):
    guard, _ = _guard()
    store = HashStore()
    guard.store = store
    monkeypatch.setattr(guard_module, "world_size", lambda: 2)
    now = time.time()
    store.set("calmrl/heartbeat/0", "7:2")
    store.set("calmrl/heartbeat/1", "7:1")
    store.set("calmrl/alive/0", repr(now))
    store.set("calmrl/alive/1", repr(now - 30))
    assert guard.laggards() == "rank 1 silent for 30 s at step 7 (forward and backward): dead or stalled"
    store.set("calmrl/alive/1", repr(now))  # alive, but behind: outside any collective
    assert guard.laggards().startswith("rank 1 is at step 7 (forward and backward) while others are further on")
    store.set("calmrl/heartbeat/1", "7:2")
    assert guard.laggards() == ""
