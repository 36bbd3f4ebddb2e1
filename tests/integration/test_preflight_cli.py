"""The real `calmrl train --nproc 2` stops in its launching process, before torchrun,
when the preflight finds problems: a few short lines naming them, exit code 2."""

from __future__ import annotations

import shutil
import socket
import time

from tests.helpers import run_cli


def test_launch_with_a_missing_shard_and_a_held_port_fails_short_before_torchrun(synthetic_dir, tmp_path):
    shutil.copy(synthetic_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    split = shutil.copytree(synthetic_dir / "train", tmp_path / "train")
    (split / "shard-000003.tar").unlink()
    with socket.socket() as held:  # another job's exporter on the port rank 1 would take
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = [
            "train",
            "configs/tiny_cpu.yaml",
            f"--data.shards={split}",
            f"--train.out_dir={tmp_path / 'run'}",
            "--metrics.enabled=true",
            f"--metrics.port={port - 1}",
            "--metrics.addr=127.0.0.1",
        ]
        start = time.monotonic()
        launched = run_cli(*args, "--nproc", "2", "--resume", "latest", timeout=60)
        elapsed = time.monotonic() - start
        # No --nproc: one process (local rank 0 only, whose port is free), the same checks.
        single = run_cli(*args, "--resume", "step_00000007", timeout=60)

    output = launched.stdout + launched.stderr
    assert launched.returncode == 2, output
    lines = output.strip().splitlines()
    assert lines[0] == "calmrl: preflight found 3 problems:" and len(lines) < 15, output
    assert f"1 of the 8 shards listed in {split / 'index.json'} is missing: shard-000003.tar" in output
    assert "--resume latest" in output and f"port {port} (Address already in use)" in output
    assert "Traceback" not in output and "torch.distributed" not in output and "rank" not in launched.stdout
    assert elapsed < 20, f"the preflight took {elapsed:.1f} s"
    assert not (tmp_path / "run").exists()

    assert single.returncode == 2 and "calmrl: preflight found 2 problems:" in single.stderr, single.stderr
    assert "--resume step_00000007" in single.stderr and "start fresh" in single.stderr
    assert "metrics" not in single.stderr and "Traceback" not in single.stderr
