"""Prometheus endpoint of one training rank (docs/design.md, "Observability").

Every rank serves its own `/metrics` at `metrics.port + local_rank` (or a free
port when `metrics.port` is 0); every series carries a `rank` label, so one
scrape job over all ranks' endpoints sees the whole run. The trainer calls
`MetricsExporter.observe_step(record)` after every optimizer step with the
record it logs (keys may be missing or None; such values are skipped).
It is a trainer sink (`pretrain.sinks`): `on_step(result)` reads `result.record()`.

Exported names (a contract: `cluster/grafana_dashboard.json` queries exactly
these, and tests/integration/test_metrics.py checks that every query returns data):

- `calmrl_samples_per_second{rank}`            gauge: global samples/s of the last step
                                               (every rank reports the whole run's rate:
                                               average over ranks, do not sum)
- `calmrl_step_time_seconds{rank}`             histogram of optimizer-step wall time
                                               (`_bucket{le}`, `_sum`, `_count`; 10 ms to 60 s)
- `calmrl_data_wait_seconds_total{rank}`       counter: time spent waiting for batches
- `calmrl_data_wait_ratio{rank}`               gauge: data wait / step time of the last step
- `calmrl_completion_seconds_total{rank}`      counter: time in the calibrator (E-step,
                                               statistics, M-step, imputation) or a baseline's fill
- `calmrl_loss{rank,term}`                     gauge: `term="total"` and one per objective term
                                               (`image-text`, `text->data`, ...)
- `calmrl_present_samples_total{rank,modality}` counter: samples of this rank's batches that had
                                               the modality
- `calmrl_imputed_samples_total{rank,modality}` counter: samples whose missing modality was
                                               filled in (imputed) for alignment
- `calmrl_bad_samples_total{rank}`             counter: bad samples skipped by all ranks' readers,
                                               lost ones of broken shards included (the trainer's
                                               all-reduced cumulative count; exported by rank 0 only)
- `calmrl_bad_shards_total{rank}`              counter: shards that broke off, all ranks (rank 0 only)
- `calmrl_skipped_steps_total{rank}`           counter: steps the guard skipped (non-finite or spike)
- `calmrl_calibrator_log_likelihood{rank}`     gauge: calibrator log-likelihood of the last batch
- `calmrl_calibrator_sigma2{rank,modality}`    gauge: the calibrator's noise variance per modality
- `calmrl_anchor_shift{rank,kind}`             gauge: `kind="observed_only"` | `"calibrated"`
- `calmrl_memory_bytes{rank,kind}`             gauge: `kind="resident"` (RSS now, read at scrape),
                                               `"peak_resident"`, and on GPUs `"cuda_allocated"`,
                                               `"cuda_reserved"`, `"cuda_peak_allocated"`
- `calmrl_last_step_timestamp_seconds{rank}`   gauge: unix time at the end of the last step
                                               (stall alert: `time() - ...`)
- `calmrl_step{rank}`                          gauge: optimizer steps done
- `calmrl_learning_rate{rank}`                 gauge
- `calmrl_logit_scale{rank}`                   gauge: the contrastive temperature's inverse

Counters and the histogram are created at zero when the exporter starts, so
they exist (and rates are defined) before the first step.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from data_pipeline.contract import MODALITIES

# 10 ms (tiny CPU steps) to 60 s (a large GPU step with gradient accumulation).
from pretrain.config import MetricsConfig
from pretrain.step import StepResult

# 10 ms (tiny CPU steps) to 60 s (a large GPU step with gradient accumulation).
STEP_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


def _number(value: Any) -> float | None:
    """`value` as a finite-or-not float, or None when absent or not a number."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)  # also 0-dim tensors and numpy scalars
    except (TypeError, ValueError):
        return None


def resident_memory_bytes() -> float | None:
    """Current RSS of this process (Linux /proc), None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def peak_resident_memory_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def cuda_memory_bytes() -> dict[str, float]:
    """Allocator statistics of the current CUDA device, {} without CUDA.

    torch is only looked up, never imported: a process that has not imported
    torch has no CUDA memory to report (and the exporter stays light)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "cuda_allocated": float(torch.cuda.memory_allocated()),
        "cuda_reserved": float(torch.cuda.memory_reserved()),
        "cuda_peak_allocated": float(torch.cuda.max_memory_allocated()),
    }


class _MemoryCollector(Collector):
    """`calmrl_memory_bytes`: RSS read at scrape time (fresh even when training
    stalls), CUDA statistics as of the last step (read on the training thread,
    whose current device is this rank's GPU)."""

    def __init__(self, rank: str):
        self.rank = rank
        self.cuda: dict[str, float] = {}

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily("calmrl_memory_bytes", "Process memory in bytes", labels=["rank", "kind"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("calmrl_memory_bytes", "Process memory in bytes", labels=["rank", "kind"])
        resident = resident_memory_bytes()
        if resident is not None:
            family.add_metric([self.rank, "resident"], resident)
        family.add_metric([self.rank, "peak_resident"], peak_resident_memory_bytes())
        for kind, value in dict(self.cuda).items():
            family.add_metric([self.rank, kind], value)
        yield family


class MetricsExporter:
    """One rank's metrics on its own registry and HTTP server; a no-op when disabled."""

    def __init__(self, cfg: MetricsConfig, rank: int, local_rank: int) -> None:
        self.enabled = cfg.enabled
        self.port: int | None = None
        self.rank = str(rank)
        self._server = None
        self._thread: threading.Thread | None = None
        self._cumulative_seen: dict[str, float] = {}
        if not self.enabled:
            return
        self.registry = CollectorRegistry(auto_describe=True)
        self._build_metrics()
        port = 0 if cfg.port == 0 else cfg.port + local_rank
        try:
            self._server, self._thread = start_http_server(port, addr=cfg.addr, registry=self.registry)
        except OSError as e:
            raise OSError(
                f"metrics: rank {rank} cannot serve on {cfg.addr}:{port} ({e}); set metrics.port to a "
                "free base port (rank i uses port + local rank i) or 0 for any free port"
            ) from e
        self.port = int(self._server.server_port)

    def _build_metrics(self) -> None:
        r, reg = ["rank"], self.registry
        self.samples_per_second = Gauge(
            "calmrl_samples_per_second", "Global samples per second of the last optimizer step", r, registry=reg
        )
        self.step_time = Histogram(
            "calmrl_step_time_seconds", "Wall time of an optimizer step", r, buckets=STEP_TIME_BUCKETS, registry=reg
        )
        self.data_wait = Counter("calmrl_data_wait_seconds", "Time spent waiting for batches", r, registry=reg)
        self.data_wait_ratio = Gauge(
            "calmrl_data_wait_ratio", "Share of the last step spent waiting for data", r, registry=reg
        )
        self.completion = Counter(
            "calmrl_completion_seconds",
            "Time spent completing missing modalities (calibrator or baseline fill)",
            r,
            registry=reg,
        )
        self.loss = Gauge("calmrl_loss", "Loss of the last step: total and each term", ["rank", "term"], registry=reg)
        self.present = Counter(
            "calmrl_present_samples", "Samples that had the modality", ["rank", "modality"], registry=reg
        )
        self.imputed = Counter(
            "calmrl_imputed_samples", "Samples whose missing modality was imputed", ["rank", "modality"], registry=reg
        )
        self.bad_samples = Counter("calmrl_bad_samples", "Bad samples skipped by all ranks' readers", r, registry=reg)
        self.bad_shards = Counter("calmrl_bad_shards", "Shards that broke off, all ranks", r, registry=reg)
        self.skipped_steps = Counter("calmrl_skipped_steps", "Steps the guard skipped", r, registry=reg)
        self.log_likelihood = Gauge(
            "calmrl_calibrator_log_likelihood", "Calibrator log-likelihood of the last batch", r, registry=reg
        )
        self.sigma2 = Gauge(
            "calmrl_calibrator_sigma2", "Calibrator noise variance per modality", ["rank", "modality"], registry=reg
        )
        self.anchor_shift = Gauge(
            "calmrl_anchor_shift", "Anchor shift (mean |u - u_O|)", ["rank", "kind"], registry=reg
        )
        self.last_step_time = Gauge(
            "calmrl_last_step_timestamp_seconds", "Unix time at the end of the last optimizer step", r, registry=reg
        )
        self.step = Gauge("calmrl_step", "Optimizer steps done", r, registry=reg)
        self.learning_rate = Gauge("calmrl_learning_rate", "Learning rate of the last step", r, registry=reg)
        self.logit_scale = Gauge("calmrl_logit_scale", "Logit scale (inverse temperature)", r, registry=reg)
        self.memory = _MemoryCollector(self.rank)
        reg.register(self.memory)
        # Zero-valued children so counters and the histogram exist before the first step.
        for metric in (
            self.step_time,
            self.data_wait,
            self.completion,
            self.bad_samples,
            self.bad_shards,
            self.skipped_steps,
        ):
            metric.labels(self.rank)
        for m in MODALITIES:
            self.present.labels(self.rank, m)
            self.imputed.labels(self.rank, m)

    def on_step(self, result: StepResult) -> None:
        """The trainer's sink hook: every step's result."""
        self.observe_step(result.record())

    def observe_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rank = self.rank

        def gauge(metric: Gauge, key: str, *labels: str) -> float | None:
            value = _number(record.get(key))
            if value is not None:
                metric.labels(rank, *labels).set(value)
            return value

        gauge(self.step, "step")
        gauge(self.learning_rate, "lr")
        gauge(self.logit_scale, "logit_scale")
        gauge(self.samples_per_second, "samples_per_s")
        gauge(self.log_likelihood, "calibrator/log_likelihood")

        step_time = _number(record.get("step_time_s"))
        if step_time is not None and math.isfinite(step_time) and step_time >= 0:
            self.step_time.labels(rank).observe(step_time)
        data_wait = _number(record.get("data_wait_s"))
        if data_wait is not None and math.isfinite(data_wait) and data_wait >= 0:
            self.data_wait.labels(rank).inc(data_wait)
            if step_time:
                self.data_wait_ratio.labels(rank).set(data_wait / step_time)
        completion = _number(record.get("completion_time_s"))
        if completion is not None and math.isfinite(completion) and completion >= 0:
            self.completion.labels(rank).inc(completion)

        # Cumulative in the record (all ranks, all-reduced): add the increase. Rank 0 speaks for
        # the job, so a sum over ranks in PromQL does not count a bad sample world-size times.
        for key, counter in (
            ("bad_samples", self.bad_samples),
            ("bad_shards", self.bad_shards),
            ("skipped_steps", self.skipped_steps),
        ):
            value = _number(record.get(key))
            seen = self._cumulative_seen.get(key, 0.0)
            if value is not None and value > seen and (rank == "0" or key == "skipped_steps"):
                counter.labels(rank).inc(value - seen)
                self._cumulative_seen[key] = value

        for key in record:
            if key == "loss":
                gauge(self.loss, key, "total")
            elif key.startswith("loss/"):
                gauge(self.loss, key, key[len("loss/") :])
            elif key.startswith("anchor_shift/"):
                gauge(self.anchor_shift, key, key[len("anchor_shift/") :])
            elif key.startswith("calibrator/sigma2/"):
                gauge(self.sigma2, key, key[len("calibrator/sigma2/") :])
            elif key.startswith(("present/", "imputed/")):
                count = _number(record[key])
                if count is not None and math.isfinite(count) and count > 0:
                    kind, modality = key.split("/", 1)
                    (self.present if kind == "present" else self.imputed).labels(rank, modality).inc(count)

        # A record without "time" still marks the step as done (the stall alert must not fire).
        finished = _number(record.get("time"))
        self.last_step_time.labels(rank).set(finished if finished is not None else time.time())
        self.memory.cuda = cuda_memory_bytes()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server, self._thread = None, None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
