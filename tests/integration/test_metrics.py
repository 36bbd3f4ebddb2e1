"""The Prometheus exporter (cluster/metrics.py) and the Grafana dashboard.

Unit: exporters on free loopback ports serve what they were fed, sparse
records (None, missing keys) keep the last values, a disabled exporter is a
no-op, and every metric the dashboard names is exported.
Integration: Debian's real Prometheus server scrapes the exporters of a real
2-rank DeepSpeed run (gloo), and every PromQL query of the dashboard returns
data through Prometheus' HTTP API. The server is required: without it the test
fails and says how to install it (scripts/install_system_deps.sh), never skips.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import MetricsExporter
from pretrain.config import MetricsConfig
from tests.helpers import REPO, free_port, run_distributed, tiny_config

DASHBOARD = REPO / "cluster" / "grafana_dashboard.json"
PROMETHEUS = Path("/usr/bin/prometheus")
LOOPBACK = MetricsConfig(enabled=True, port=0, addr="127.0.0.1")
MIN_STEPS = 10  # steps both ranks train before the dashboard is checked (calibrator warm-up: 3)

FULL_RECORD: dict[str, Any] = {
    "step": 7,
    "loss": 2.5,
    "loss/image-text": 1.25,
    "loss/text-audio": 0.75,
    "lr": 1e-3,
    "logit_scale": 14.25,
    "samples_per_s": 320.0,
    "step_time_s": 0.2,
    "data_wait_s": 0.05,
    "completion_time_s": 0.01,
    "present/image": 10,
    "present/text": 16,
    "present/audio": 8,
    "imputed/image": 6,
    "imputed/text": 0,
    "imputed/audio": 8,
    "bad_samples": 3,
    "calibrator/log_likelihood": -12.5,
    "calibrator/sigma2/image": 0.125,
    "anchor_shift/observed_only": 0.4,
    "anchor_shift/calibrated": 0.1,
    "time": 1.7e9,
}
# What a step may look like where most values were not measured.
SPARSE_RECORD: dict[str, Any] = {
    "step": 8,
    "loss": None,
    "lr": None,
    "samples_per_s": None,
    "step_time_s": 0.4,
    "data_wait_s": None,
    "completion_time_s": None,
    "present/image": None,
    "imputed/audio": 2,
    "bad_samples": 2,
    "calibrator/log_likelihood": None,
}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """One scrape of an exporter: {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_exporters_serve_full_and_sparse_records():
    with MetricsExporter(LOOPBACK, rank=0, local_rank=0) as first, MetricsExporter(LOOPBACK, 1, 1) as second:
        assert first.port and second.port and first.port != second.port
        before = scrape(first.port)  # counters and the histogram exist at zero before any step
        assert value(before, "calmrl_bad_samples_total", rank="0") == 0
        assert value(before, "calmrl_step_time_seconds_count", rank="0") == 0
        assert value(before, "calmrl_imputed_samples_total", rank="0", modality="audio") == 0
        assert value(before, "calmrl_memory_bytes", rank="0", kind="resident") > 10 * 2**20

        first.observe_step(FULL_RECORD)
        s = scrape(first.port)
        assert value(s, "calmrl_step", rank="0") == 7
        assert value(s, "calmrl_samples_per_second", rank="0") == 320
        assert value(s, "calmrl_learning_rate", rank="0") == pytest.approx(1e-3)
        assert value(s, "calmrl_logit_scale", rank="0") == 14.25
        assert value(s, "calmrl_loss", rank="0", term="total") == 2.5
        assert value(s, "calmrl_loss", rank="0", term="image-text") == 1.25
        assert value(s, "calmrl_loss", rank="0", term="text-audio") == 0.75
        assert value(s, "calmrl_step_time_seconds_count", rank="0") == 1
        assert value(s, "calmrl_step_time_seconds_sum", rank="0") == pytest.approx(0.2)
        assert value(s, "calmrl_step_time_seconds_bucket", rank="0", le="0.25") == 1
        assert value(s, "calmrl_step_time_seconds_bucket", rank="0", le="0.1") == 0
        assert value(s, "calmrl_data_wait_seconds_total", rank="0") == pytest.approx(0.05)
        assert value(s, "calmrl_data_wait_ratio", rank="0") == pytest.approx(0.25)
        assert value(s, "calmrl_completion_seconds_total", rank="0") == pytest.approx(0.01)
        assert value(s, "calmrl_present_samples_total", rank="0", modality="text") == 16
        assert value(s, "calmrl_imputed_samples_total", rank="0", modality="image") == 6
        assert value(s, "calmrl_imputed_samples_total", rank="0", modality="text") == 0
        assert value(s, "calmrl_bad_samples_total", rank="0") == 3
        assert value(s, "calmrl_calibrator_log_likelihood", rank="0") == -12.5
        assert value(s, "calmrl_calibrator_sigma2", rank="0", modality="image") == 0.125
        assert value(s, "calmrl_anchor_shift", rank="0", kind="observed_only") == pytest.approx(0.4)
        assert value(s, "calmrl_anchor_shift", rank="0", kind="calibrated") == pytest.approx(0.1)
        assert value(s, "calmrl_last_step_timestamp_seconds", rank="0") == 1.7e9

        first.observe_step(SPARSE_RECORD)
        s = scrape(first.port)
        assert value(s, "calmrl_step", rank="0") == 8
        assert value(s, "calmrl_samples_per_second", rank="0") == 320  # None keeps the last value
        assert value(s, "calmrl_loss", rank="0", term="total") == 2.5
        assert value(s, "calmrl_calibrator_log_likelihood", rank="0") == -12.5
        assert value(s, "calmrl_step_time_seconds_count", rank="0") == 2
        assert value(s, "calmrl_step_time_seconds_sum", rank="0") == pytest.approx(0.6)
        assert value(s, "calmrl_data_wait_seconds_total", rank="0") == pytest.approx(0.05)
        assert value(s, "calmrl_present_samples_total", rank="0", modality="image") == 10
        assert value(s, "calmrl_imputed_samples_total", rank="0", modality="audio") == 10
        assert value(s, "calmrl_bad_samples_total", rank="0") == 3  # a counter never goes down
        assert abs(value(s, "calmrl_last_step_timestamp_seconds", rank="0") - time.time()) < 60  # no "time": now

        # Each exporter has its own registry: the second one saw nothing and says rank 1.
        other = scrape(second.port)
        assert ("calmrl_step", frozenset({("rank", "1")})) not in other
        assert value(other, "calmrl_bad_samples_total", rank="1") == 0
        assert not any(("rank", "0") in labels for _, labels in other)
        port = first.port
    with pytest.raises(OSError):  # close() shut the server down
        scrape(port)


def test_disabled_exporter_is_a_no_op():
    exporter = MetricsExporter(MetricsConfig(), rank=0, local_rank=0)
    assert exporter.port is None
    exporter.observe_step(FULL_RECORD)
    exporter.close()


def test_port_is_base_plus_local_rank_and_a_taken_port_is_explained():
    port = free_port()
    with MetricsExporter(MetricsConfig(enabled=True, port=port - 1, addr="127.0.0.1"), 3, local_rank=1) as e:
        assert e.port == port
        with pytest.raises(OSError, match="metrics.port"):
            MetricsExporter(MetricsConfig(enabled=True, port=port, addr="127.0.0.1"), 0, local_rank=0)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard, Grafana variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    variables = [v["name"] for v in board["templating"]["list"] if v["type"] != "datasource"]

    def panels(items: list[dict]) -> list[dict]:
        return [q for p in items for q in [p, *panels(p.get("panels", []))]]  # rows nest panels

    queries = []
    for panel in panels(board["panels"]):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$__(rate_interval|interval|range)\b", "10s", target["expr"])
            for name in variables:
                expr = re.sub(r"\$\{" + name + r"(:\w+)?\}|\$" + name + r"\b", ".*", expr)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_is_valid_and_names_only_exported_metrics():
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 39 and board["uid"]
    assert any(
        v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" and v["query"] == "prometheus"
        for v in board["templating"]["list"]
    )
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    with MetricsExporter(LOOPBACK, 0, 0) as exporter:
        exporter.observe_step(FULL_RECORD)
        assert exporter.port is not None
        exported = {name for name, _ in scrape(exporter.port)}
    queries = dashboard_queries()
    assert len(queries) >= 12
    for title, expr in queries:
        for name in re.findall(r"\bcalmrl_\w+", expr):
            assert name in exported, f"panel {title!r} queries {name}, which the exporter does not export"


# -- integration: a real 2-rank training run scraped by a real Prometheus -----------------


def _train_and_export(rank: int, world: int, shards: str, out_dir: str, ipc: str, max_seconds: float) -> int:
    """Train until the parent drops `ipc/stop` (or max_seconds); the trainer's exporter serves the metrics.

    The loop is `Trainer.fit`'s, less checkpoints and the run log, and with a stop that the ranks agree on."""
    import torch
    import torch.distributed as dist

    from cluster.metrics import MetricsExporter
    from data_pipeline.reader import BatchLoader
    from pretrain.trainer import build_trainer

    cfg = tiny_config(
        shards, out_dir, train={"steps": 100_000}, metrics={"enabled": True, "port": 0, "addr": "127.0.0.1"}
    )
    exporter = MetricsExporter(cfg.metrics, rank, rank)  # this rank's endpoint, a trainer sink
    trainer = build_trainer(cfg, sinks=[exporter])
    try:
        port_file = Path(ipc) / f"port_{rank}"
        port_file.with_suffix(".tmp").write_text(str(exporter.port))
        port_file.with_suffix(".tmp").rename(port_file)  # the parent never reads half a number
        trainer.batches = BatchLoader(cfg.data, trainer.rank, trainer.world, trainer.loader_state)
        trainer.engine.train()
        deadline = time.monotonic() + max_seconds
        while True:
            exporter.on_step(trainer.train_step())  # every step is a log step (log_every 1)
            # Ranks must leave at the same step (the next step holds collectives): agree on stopping.
            stop = torch.tensor([float((Path(ipc) / "stop").exists() or time.monotonic() > deadline)])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                return trainer.step
    finally:
        exporter.close()


def _wait_for_ports(ipc: Path, world: int, ranks: threading.Thread, outcome: dict, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    files = [ipc / f"port_{r}" for r in range(world)]
    while not all(f.exists() for f in files):
        if not ranks.is_alive():
            raise AssertionError(f"the ranks ended before serving metrics: {outcome.get('error', outcome)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the ranks did not report their metrics ports within {timeout:.0f}s")
        time.sleep(0.2)
    return [int(f.read_text()) for f in files]


def _require_prometheus() -> None:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(
            f"{PROMETHEUS} is missing: this test needs Debian's prometheus server; "
            "install it with `sudo scripts/install_system_deps.sh` (apt-get install prometheus)"
        )


def _start_prometheus(work: Path, targets: list[int]) -> tuple[subprocess.Popen, str]:
    config = work / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "calmrl", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}]}
                ],
            }
        )
    )
    port = free_port()
    log = work / "prometheus.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    api = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{api}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return proc, api
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prometheus did not become ready (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def promql(api: str, query: str) -> list[dict]:
    """Evaluate an instant query; raises AssertionError with Prometheus' error when it is invalid."""
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def _finite_values(result: list[dict]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prometheus_scrapes_a_two_rank_run_and_every_dashboard_query_has_data(synthetic_dir, tmp_path):
    _require_prometheus()  # before spending a training start-up on it
    ipc = tmp_path / "ipc"
    ipc.mkdir()
    outcome: dict[str, Any] = {}

    def ranks() -> None:
        try:
            outcome["steps"] = run_distributed(
                _train_and_export,
                2,
                ipc,
                str(synthetic_dir / "train"),
                str(tmp_path / "run"),
                str(ipc),
                150.0,
                timeout=240,
            )
        except BaseException as e:  # reported by the main thread
            outcome["error"] = e

    runner = threading.Thread(target=ranks, daemon=True)
    runner.start()
    prometheus = None
    try:
        ports = _wait_for_ports(ipc, 2, runner, outcome, timeout=180)
        prometheus, api = _start_prometheus(tmp_path, ports)

        # Both ranks are scraped and report a positive throughput.
        deadline = time.monotonic() + 60
        while True:
            rates = {r: _finite_values(promql(api, f'calmrl_samples_per_second{{rank="{r}"}}')) for r in "01"}
            if all(v and v[0] > 0 for v in rates.values()):
                break
            assert time.monotonic() < deadline, f"no positive samples/s of both ranks in Prometheus: {rates}"
            time.sleep(1)
        with urllib.request.urlopen(f"{api}/api/v1/label/rank/values?match[]=calmrl_step", timeout=10) as r:
            assert sorted(json.load(r)["data"]) == ["0", "1"]  # what the dashboard's $rank offers

        # Past the slow first steps and the calibrator's warm-up (3 steps), so rates see steady
        # training and the imputed counters move.
        deadline = time.monotonic() + 90
        while (_finite_values(promql(api, "min(calmrl_step)")) or [0])[0] < MIN_STEPS:
            assert time.monotonic() < deadline, f"the ranks did not reach step {MIN_STEPS} within 90s"
            time.sleep(1)
        assert _finite_values(promql(api, "sum(calmrl_imputed_samples_total)"))[0] > 0
        assert _finite_values(promql(api, "sum(calmrl_present_samples_total)"))[0] > 0

        # Every dashboard query is valid PromQL (checked at once: that does not heal) and returns
        # a series with a number (rates need a few scrapes of steps: poll until all do).
        queries = dashboard_queries()
        invalid = {}
        for title, expr in queries:
            try:
                promql(api, expr)
            except AssertionError as e:
                invalid[(title, expr)] = str(e)
        assert not invalid, "invalid dashboard queries:\n" + "\n".join(
            f"  [{title}] {expr}\n    -> {why}" for (title, expr), why in invalid.items()
        )
        deadline = time.monotonic() + 60
        while True:
            failures = {}
            for title, expr in queries:
                result = promql(api, expr)
                if not _finite_values(result):
                    failures[(title, expr)] = f"no series with a finite value: {result}"
            if not failures:
                break
            assert time.monotonic() < deadline, "dashboard queries without data:\n" + "\n".join(
                f"  [{title}] {expr}\n    -> {why}" for (title, expr), why in failures.items()
            )
            time.sleep(1)
    finally:
        (ipc / "stop").touch()
        if prometheus is not None:
            prometheus.kill()
            prometheus.wait()
        runner.join(timeout=120)
    if "error" in outcome:
        raise outcome["error"]
    steps = outcome["steps"]
    assert steps[0] == steps[1] >= MIN_STEPS, steps  # both ranks stopped together
