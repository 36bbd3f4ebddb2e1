"""What one optimizer step reports: a typed result, and its flat record.

The trainer returns a `StepResult` from every step and hands it to its sinks
(the run log, a progress bar, the Prometheus exporter, a Ray Tune reporter).
`record()` is the flat form the JSONL log and the metrics use; its keys are a
contract (docs/training.md, cluster/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipeline.contract import MODALITIES


@dataclass
class StepResult:
    step: int  # optimizer steps done (1-based)
    # The device's values (loss, terms, logit scale, calibrator) are read back only on
    # steps with `read` set (log steps, the first and last of a fit, a sink's interval):
    # elsewhere they are None / empty, and the step never waits on the device.
    loss: float | None  # the objective on the global batch, mean over micro-steps
    terms: dict[str, float]  # "loss/<term>": the objective's named terms (the active ones)
    lr: float
    logit_scale: float | None
    samples_per_s: float  # global samples per second of this step
    step_time_s: float
    data_wait_s: float  # time spent waiting for batches
    completion_time_s: float  # calibrator E-step, statistics, M-step, imputation (or a baseline's fill)
    present: list[int]  # per modality (MODALITIES order): this rank's samples that had it
    imputed: list[int]  # per modality: samples whose missing modality was filled in
    logged: bool = False  # a log step: the run log writes it, and the diagnostics below are fresh
    read: bool = False  # the device's values above were read (every logged step is read)
    log_likelihood: float | None = None  # calibrator log-likelihood of the batch (log steps)
    calibrator: dict[str, float] = field(default_factory=dict)  # "calibrator/sigma2/<m>"
    anchor_shift: dict[str, float] = field(default_factory=dict)  # "anchor_shift/<kind>" (log steps)
    # "cos/<a>-<b>": mean cosine of the batch's observed positive pairs (log steps); a negative one is a sign flip
    positive_cosine: dict[str, float] = field(default_factory=dict)
    bad_samples: int | None = None  # cumulative bad samples of all ranks' readers (shard loader only)
    bad_shards: int | None = None  # cumulative shards that broke off, all ranks (shard loader only)
    skipped: bool = False  # the update was left out on every rank (pretrain/guard.py)
    skip_reason: str = ""
    skipped_total: int = 0  # skipped steps of this fit so far
    time: float = 0.0  # unix time at the end of the step

    def record(self) -> dict[str, Any]:
        """The flat record: the JSONL log line and what the metrics exporter reads."""
        out: dict[str, Any] = {
            "step": self.step,
            "loss": self.loss,
            **self.terms,
            "lr": self.lr,
            "logit_scale": self.logit_scale,
            "samples_per_s": self.samples_per_s,
            "step_time_s": self.step_time_s,
            "data_wait_s": self.data_wait_s,
            "completion_time_s": self.completion_time_s,
            **{f"present/{m}": int(c) for m, c in zip(MODALITIES, self.present)},
            **{f"imputed/{m}": int(c) for m, c in zip(MODALITIES, self.imputed)},
            "calibrator/log_likelihood": self.log_likelihood,
            **self.calibrator,
        }
        if self.bad_samples is not None:
            out["bad_samples"] = self.bad_samples
        if self.bad_shards is not None:
            out["bad_shards"] = self.bad_shards
        out["skipped_steps"] = self.skipped_total
        if self.skipped:
            out["skipped"] = self.skip_reason
        out.update(self.anchor_shift)
        out.update(self.positive_cosine)
        out["time"] = self.time
        return out
