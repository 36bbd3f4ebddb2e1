"""`calmrl launch slurm`: the rendered sbatch script (dry run, fake sbatch) and a real
2-process CPU training submitted to a single-node Slurm on localhost (tests/integration/slurm_cluster.py)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.slurm import add_launch_parser, cmd_launch_slurm
from tests.helpers import REPO, run_cli
from tests.integration.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

TINY = REPO / "configs" / "tiny_cpu.yaml"


def launch(argv: list[str]) -> int:
    """`calmrl launch slurm ARGV` in process, through the launcher's own parser."""
    parser = argparse.ArgumentParser(prog="calmrl")
    add_launch_parser(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["launch", "slurm", *argv])
    return cmd_launch_slurm(args, extra)


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` first on PATH that records its arguments; behaviour set by FAKE_SBATCH_MODE."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    (bindir / "sbatch").write_text(f"""#!/bin/bash
echo "$*" >> {calls}
if [ "${{FAKE_SBATCH_MODE:-ok}}" = fail ]; then
    echo "sbatch: error: invalid partition specified: nope" >&2; exit 1
fi
echo "4242;calmrltest"
""")
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return calls


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_renders_cpu_script(tmp_path, capsys, fake_sbatch, monkeypatch):
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "run"
    flags = "--nodes 2 --gpus-per-node 0 --nproc-per-node 2 --partition debug --time 00:30:00 --job-name tiny"
    rc = launch(
        [
            str(TINY.relative_to(REPO)),
            *flags.split(),
            "--dry-run",
            f"--train.out_dir={out_dir}",
            "--data.batch_size=16",
            "--metrics.port=9555",
            "--data.shards=my data/train",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    script = captured.out
    path = out_dir / "slurm" / "job.sbatch"
    assert path.read_text() == script  # stdout is exactly the written script
    assert os.access(path, os.X_OK)
    assert not fake_sbatch.exists(), "a dry run must not call sbatch"
    assert "nothing submitted" in captured.err

    assert script.startswith("#!/bin/bash\n")
    assert sbatch_lines(script) == [
        "--job-name=tiny",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--partition=debug",
        "--time=00:30:00",
        f"--output={out_dir}/slurm/%x-%j.out",
        f"--chdir={REPO}",
        "--requeue",
        "--signal=USR1@120",
        "--export=ALL",
    ]
    assert not any("gpus" in s or "gres" in s for s in sbatch_lines(script))  # CPU mode asks for no GPU
    assert "export DS_ACCELERATOR=cpu" in script
    assert "NPROC_PER_NODE=2" in script
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in script
    for env in ("NCCL_ASYNC_ERROR_HANDLING=1", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_DEBUG=", "OMP_NUM_THREADS="):
        assert f"export {env}" in script, env
    assert f"PYTHON={sys.executable}" in script

    command = script[script.index("\nsrun ") :].replace("\\\n", " ")
    words = command.split()
    assert words[0] == "srun" and "--ntasks-per-node=1" in words
    assert '"$PYTHON" -m torch.distributed.run' in " ".join(words)
    joined = " ".join(words)
    for arg in (
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id "$SLURM_JOB_ID"',
        '--nnodes "$SLURM_NNODES"',
        '--nproc-per-node "$NPROC_PER_NODE"',
    ):
        assert arg in joined, arg
    for arg in ("--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout 120"):
        assert arg in joined, arg  # preemption: torchrun passes USR1 on and waits for the save
    train = joined[joined.index("-m cluster.cli") : joined.index(" || code=$?")]
    assert train == (
        f"-m cluster.cli train {TINY} --train.out_dir={out_dir} --data.batch_size=16 "
        f"'--data.shards=my data/train' --metrics.port=9555 --resume auto"
    )
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script  # after a stop with a checkpoint

    subprocess.run(["bash", "-n", str(path)], check=True)  # valid bash
    # The rendered command line, evaluated by bash, gives back the exact arguments.
    echoed = subprocess.run(
        ["bash", "-c", 'printf "%s\\n" ' + train.split(" ", 3)[3]], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert echoed == [
        str(TINY),
        f"--train.out_dir={out_dir}",
        "--data.batch_size=16",
        "--data.shards=my data/train",
        "--metrics.port=9555",
        "--resume",
        "auto",
    ]


def test_gpu_script_and_option_checks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = "--nodes 4 --gpus-per-node 8 --cpus-per-task 32 --dry-run --train.out_dir=run --master-port 29400"
    rc = launch([str(TINY), *flags.split(), "--resume", "latest"])
    script = capsys.readouterr().out
    assert rc == 0
    assert "--gpus-per-node=8" in sbatch_lines(script) and "--cpus-per-task=32" in sbatch_lines(script)
    assert f"--output={tmp_path}/run/slurm/calmrl-run-%j.out" not in script  # %x stays for Slurm
    assert f"--output={tmp_path}/run/slurm/%x-%j.out" in sbatch_lines(script)
    assert "--job-name=calmrl-run" in sbatch_lines(script)
    assert "NPROC_PER_NODE=8" in script and "MASTER_PORT=29400" in script
    assert "export DS_ACCELERATOR=cpu" not in script
    assert "--cpus-per-task=32 \\" in script  # srun does not inherit it from sbatch (Slurm >= 22.05)
    assert "--metrics.port=9400 --resume latest || code=$?" in script  # the config's port
    assert (tmp_path / "run" / "slurm" / "job.sbatch").is_file()

    for bad, why in (
        (["--nproc-per-node", "2"], "--nproc-per-node 2 != --gpus-per-node 8"),
        (["--time", "tomorrow"], "not a Slurm time"),
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--bogus", "3"], "unrecognised arguments: --bogus 3"),
    ):
        argv = [str(TINY), "--nodes", "1", "--gpus-per-node", "8", "--dry-run", "--train.out_dir=run2", *bad]
        assert launch(argv) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_config_typo_fails_before_rendering(tmp_path, capsys, fake_sbatch):
    out_dir = tmp_path / "run"
    rc = launch([str(TINY), "--nodes", "1", "--gpus-per-node", "0", f"--train.out_dir={out_dir}", "--train.stepz=5"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "config error" in captured.err and "train.stepz" in captured.err
    assert captured.out == ""

    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY.read_text().replace("warmup_steps: 5", "warmup_stpes: 5"))
    rc = launch([str(typo), "--nodes", "1", "--gpus-per-node", "0", f"--train.out_dir={out_dir}"])
    captured = capsys.readouterr()
    assert rc == 2 and "train.warmup_stpes" in captured.err and str(typo) in captured.err
    assert not out_dir.exists(), "nothing may be written for a bad config"
    assert not fake_sbatch.exists(), "nothing may be submitted for a bad config"


def test_submit_reports_job_id_and_sbatch_errors(tmp_path, capsys, fake_sbatch, monkeypatch):
    out_dir = tmp_path / "run"
    argv = [str(TINY), "--nodes", "1", "--gpus-per-node", "0", f"--train.out_dir={out_dir}"]
    assert launch(argv) == 0
    out = capsys.readouterr().out
    script = out_dir / "slurm" / "job.sbatch"
    assert "submitted Slurm job 4242" in out
    assert f"tail -F {out_dir}/slurm/calmrl-run-4242.out" in out
    assert fake_sbatch.read_text().split() == ["--parsable", str(script)]
    assert (out_dir / "slurm").is_dir()  # the log's folder exists before the job starts

    monkeypatch.setenv("FAKE_SBATCH_MODE", "fail")
    assert launch(argv) == 1
    err = capsys.readouterr().err
    assert "sbatch failed (exit 1)" in err and "invalid partition specified: nope" in err

    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert launch(argv) == 1
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and f"sbatch {script}" in err


def test_cli_has_launch_slurm(tmp_path, capsys):
    """`calmrl launch slurm` is wired into cluster/cli.py (add_launch_parser + cmd_launch_slurm)."""
    from cluster.cli import main

    rc = main(
        [
            "launch",
            "slurm",
            str(TINY),
            *["--nodes", "1", "--gpus-per-node", "0", "--dry-run"],
            f"--train.out_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 0 and "srun " in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["launch", "slurm", "--help"])
    assert done.value.code == 0 and "--gpus-per-node" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slurm_job_trains_two_cpu_processes(tmp_path, slurm_cluster):  # noqa: F811
    cluster = slurm_cluster
    env = dict(cluster.env)
    # DeepSpeed's CPU comm op is compiled once into this folder (conftest); the job must find it.
    assert env.get("TORCH_EXTENSIONS_DIR"), "conftest sets TORCH_EXTENSIONS_DIR"
    data, out_dir = tmp_path / "data", tmp_path / "run"
    built = run_cli(
        *["data", "build", "--source", "synthetic", "--num-samples", "400", "--shard-size", "50"],
        "--out",
        str(data),
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert built.returncode == 0, built.stderr[-3000:]

    overrides = "--train.steps=6 --train.log_every=1 --data.batch_size=16 --data.num_workers=0 --model.text.depth=1"
    launched = run_cli(
        "launch",
        "slurm",
        str(TINY),
        *["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2"],
        f"--data.shards={data / 'train'}",
        f"--train.out_dir={out_dir}",
        *overrides.split(),
        env=env,
        timeout=60,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    match = re.search(r"submitted Slurm job (\d+)", launched.stdout)
    assert match, launched.stdout
    job_id = match.group(1)

    info = cluster.wait_job(job_id, timeout=300)
    if info.get("JobState") == "TIMEOUT_WAIT":
        cluster.run("scancel", job_id)
    log = Path(info.get("StdOut") or out_dir / "slurm" / f"calmrl-run-{job_id}.out")
    log_text = log.read_text(errors="replace") if log.is_file() else f"(no job log at {log})"
    report = (
        f"job {job_id}: {info.get('JobState')} exit {info.get('ExitCode')} "
        f"reason {info.get('Reason')}\n--- job log (tail):\n{log_text[-6000:]}\n{cluster.logs_tail(15)}"
    )
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", report
    assert log == out_dir / "slurm" / f"calmrl-run-{job_id}.out"
    assert "2 rank(s) per node, rendezvous localhost:" in log_text, report
    assert "trained to step 6/6" in log_text, report

    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006", report
    ranks = sorted(p.name for p in (out_dir / "checkpoints" / "step_00000006").glob("trainer_state_rank*.pt"))
    assert ranks == ["trainer_state_rank0.pt", "trainer_state_rank1.pt"], ranks  # world size 2
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 6, report
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
