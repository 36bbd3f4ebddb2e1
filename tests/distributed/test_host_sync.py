"""No host synchronisation in the training step outside the steps that read.

On a GPU every `.item()`, `float(t)`, `bool(t)`, `.cpu()` or `.tolist()` of a
device tensor stalls the step until the device catches up. On CPU there is no
device to wait on, so the test counts the calls themselves: Python's reads of
tensor values are patched to count (with where they were called from) while
the trainer runs steps that do not log. The loss, terms and logit scale must
stay on the device until a log step reads them in one transfer. With CUDA,
`torch.cuda.set_sync_debug_mode` counts real synchronisations instead.
"""

from __future__ import annotations

import inspect
import itertools
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.helpers import run_distributed, tiny_config

# Reads of a tensor's value from Python (numpy() is left out: it refuses device tensors).
READS = ("item", "__float__", "__int__", "__bool__", "cpu", "tolist")


REPO = Path(__file__).resolve().parents[2]


def _origin(filename: str) -> str:
    """Whose code made the call: calmrl's own packages, DeepSpeed, or something else."""
    if "/deepspeed/" in filename:
        return "deepspeed"
    path = Path(filename).resolve()
    if path.is_relative_to(REPO) and not path.is_relative_to(REPO / ".venv") and "site-packages" not in filename:
        return "calmrl"
    return "other"


@contextmanager
def count_reads() -> Iterator[Counter]:
    """Count every read of a tensor's value, by origin and call site (the first frame
    outside torch); the methods are restored on leaving."""
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            origin = _origin(frames[-1].filename) if frames else "other"
            calls[origin, f"{name} at {site}"] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _trainer(shards: str, out_dir: str, objective: str, method: str, zero_stage: int, dense: bool):
    from data_pipeline.reader import BatchLoader
    from pretrain.trainer import build_trainer

    cfg = tiny_config(
        shards,
        out_dir,
        train={"steps": 12, "log_every": 6, "zero_stage": zero_stage},
        loss={"objective": objective, "pairwise_weight": 1.0 if objective != "pairwise" else 0.0},
        calibration={"method": method, "warmup_steps": 2},
        model={"dense_encode": dense},  # present rows only would pick them with nonzero: a sync on a GPU
    )
    batches = list(itertools.islice(BatchLoader(cfg.data, 0, 1), 12))  # in memory: count the step, not the reader
    trainer = build_trainer(cfg, batches=iter(batches))
    trainer.batches = trainer._external_batches
    return trainer


def _count_in_steps(rank: int, world: int, shards: str, out_dir: str, case: tuple) -> dict:
    """In a spawned process (the trainer joins a process group and sets its environment):
    one reading step, four counted steps that do not log, then a log step."""
    trainer = _trainer(shards, out_dir, *case)
    first = trainer.train_step()  # the first step of a fit reads (the summary's first loss)
    with count_reads() as calls:
        # steps 2-5: the calibrator's warm-up ends after step 2, so steps 3-5 impute and run the M-step
        quiet = [trainer.train_step() for _ in range(4)]
    logged = trainer.train_step()  # step 6 logs: one transfer, every value there
    return {"first": first, "quiet": quiet, "logged": logged, "calls": dict(calls)}


CASES = [
    ("pairwise", "calmrl", 1, False),
    ("gram", "calmrl", 2, True),
    ("pmrl", "calmrl", 3, True),
    ("gram", "mean_fill", 1, False),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[f"{o}-{m}-zero{z}-{'dense' if d else 'present'}" for o, m, z, d in CASES])
def test_steps_between_logs_never_read_the_device(synthetic_dir, tmp_path, case):
    out = run_distributed(
        _count_in_steps, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(tmp_path / "run"), case
    )
    first, quiet, logged, calls = out[0]["first"], out[0]["quiet"], out[0]["logged"], out[0]["calls"]
    assert first.read and first.loss is not None
    assert not any(r.read or r.logged for r in quiet)
    assert all(r.loss is None and r.terms == {} for r in quiet)
    own = {site: n for (origin, site), n in calls.items() if origin == "calmrl"}
    # One read per step, by design: the step guard's all-reduced flags (skip, stop, bad counts),
    # decided before the update on every rank alike (pretrain/guard.py). Nothing else of calmrl's.
    guard = {site: n for site, n in own.items() if site.startswith("tolist at guard.py:")}
    assert list(guard.values()) == [4], f"the guard reads once a step: {own}"
    # torch's Adam reads its CPU step counter below SkippableAdamW.step (its last non-torch frame)
    from pretrain.guard import SkippableAdamW

    adam_line = inspect.getsourcelines(SkippableAdamW.step)[1] + 3
    adam = {site: n for site, n in own.items() if site == f"item at guard.py:{adam_line}"}
    assert own == {**guard, **adam}, f"calmrl reads tensors on the host during steps that do not log: {own}"
    # DeepSpeed's ZeRO optimizers (stages 1-3) check the gradient norm on the host every step
    # (deepspeed/runtime/utils.py, is_invalid_grad_norm: a real sync on a GPU, not ours to
    # remove; docs/scaling.md) and torch's Adam reads its CPU step counter. Nothing else may.
    others = {site: n for (origin, site), n in calls.items() if origin == "other"}
    assert others == {}, f"unexpected host reads: {others}"
    assert logged.logged and logged.read and logged.loss is not None and logged.terms
    assert sum(logged.imputed) > 0


def _cuda_syncs(rank: int, world: int, shards: str, out_dir: str) -> list[tuple[str, str]]:
    trainer = _trainer(shards, out_dir, "gram", "calmrl", 2, True)
    trainer.train_step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [(w.filename, str(w.message)) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts real synchronisations")
def test_no_cuda_synchronisation_between_logs(synthetic_dir, tmp_path):
    syncs = run_distributed(_cuda_syncs, 1, tmp_path / "ipc", str(synthetic_dir / "train"), str(tmp_path / "run"))
    own = [(f, m) for f, m in syncs[0] if _origin(f) == "calmrl"]
    assert [f for f, _ in own if not f.endswith("pretrain/guard.py")] == [], own
    assert len(own) == 4, own  # the step guard's one read per step
