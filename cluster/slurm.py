"""SLURM launch: `calmrl launch slurm CONFIG --nodes N --gpus-per-node G ...`.

The config (with its `--section.key=value` overrides) is validated first; a
config error stops before anything is written or submitted. Then an sbatch
script is rendered and written atomically to `<train.out_dir>/slurm/job.sbatch`:

- `#SBATCH --nodes N --ntasks-per-node 1 [--gpus-per-node G]`: one task per
  node, and that task is `torchrun`, which spawns the node's ranks
  (G per node on GPUs; `--nproc-per-node` CPU processes when G == 0, where
  `DS_ACCELERATOR=cpu` is set and no GPU is requested);
- `srun` starts torchrun on every node with a c10d rendezvous hosted on the
  first node of the allocation (`scontrol show hostnames "$SLURM_JOB_NODELIST"
  | head -n1`), rendezvous id = the job id, port derived from the job id
  (or `--master-port`);
- the ranks run `<this python> -m cluster.cli train <absolute CONFIG>
  <overrides> --metrics.port=<the config's port>` in the submit directory
  (`#SBATCH --chdir`), so relative paths in the config mean what they meant
  here and the job uses this virtual environment;
- the submitting environment is exported (`--export=ALL`, Slurm's default,
  stated explicitly): TORCH_EXTENSIONS_DIR (DeepSpeed's compiled CPU comm op),
  AWS_* for S3 shards and PATH reach the job.

`--dry-run` writes and prints the script (stdout is exactly the script) and
submits nothing; otherwise `sbatch --parsable` submits it and the job id, the
log path and how to follow it are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.atomic import atomic_write

SCRIPT_NAME = "job.sbatch"
MASTER_PORT_BASE = 15000  # rendezvous port = base + job id % span, unless --master-port
MASTER_PORT_SPAN = 10000  # stays below the usual ephemeral range (32768+) and away from metrics (9400+)
SBATCH_TIMEOUT_S = 120
_TIME_RE = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|INFINITE|UNLIMITED)$",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"^[A-Za-z0-9_.,:+@%=-]+$")  # safe on an #SBATCH line (no spaces, quotes, newlines)


class LaunchError(RuntimeError):
    """A launch problem with a message meant for the user."""


@dataclass
class SlurmJob:
    """Everything the sbatch script depends on (paths absolute)."""

    config: Path
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    job_name: str
    output: Path  # Slurm log path pattern (%x job name, %j job id)
    workdir: Path
    python: str
    metrics_port: int
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    master_port: int | None = None
    resume: str | None = "auto"  # a requeued job continues from its last checkpoint
    grace_s: int = 120  # train.preempt_grace_s: USR1 this long before the time limit; torchrun's shutdown wait
    out_dir: Path | None = None  # the run folder (its stopped.json asks for a requeue)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    def train_args(self) -> list[str]:
        """`cluster.cli` arguments each rank runs: train CONFIG OVERRIDES --metrics.port=P [--resume TAG]."""
        kept = [o for o in self.overrides if not o.startswith("--metrics.port=")]
        args = ["train", str(self.config), *kept, f"--metrics.port={self.metrics_port}"]
        if self.resume and self.resume != "none":
            args += ["--resume", self.resume]
        return args


def _q(value: object) -> str:
    return shlex.quote(str(value))


def render_sbatch(job: SlurmJob, command_line: str | None = None) -> str:
    """The sbatch script (bash) for `job`."""
    cpu = job.gpus_per_node == 0
    sb = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if not cpu:
        sb.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        sb.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.partition:
        sb.append(f"--partition={job.partition}")
    if job.time:
        sb.append(f"--time={job.time}")
    sb += [
        f"--output={job.output}",
        f"--chdir={job.workdir}",
        # Preemption and time limits: USR1 reaches every task (torchrun, which passes it to the
        # ranks) grace_s before the end; the ranks save after their step, and the script requeues.
        "--requeue",
        f"--signal=USR1@{job.grace_s}",
        # Slurm's default, stated: the job needs this environment (TORCH_EXTENSIONS_DIR, AWS_*, PATH).
        "--export=ALL",
    ]
    port = str(job.master_port) if job.master_port else f"$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % {MASTER_PORT_SPAN} ))"
    srun = [
        "srun",
        '--nodes="$SLURM_NNODES"',
        '--ntasks="$SLURM_NNODES"',
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
    ]
    if job.cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task.
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    torchrun = [
        '"$PYTHON"',
        "-m",
        "torch.distributed.run",
        '--nnodes "$SLURM_NNODES"',
        '--nproc-per-node "$NPROC_PER_NODE"',
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id "$SLURM_JOB_ID"',
        "--max-restarts 0",
        "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout {job.grace_s}",
    ]
    train = ["-m", "cluster.cli", *(_q(a) for a in job.train_args())]
    mode = f"{job.gpus_per_node} GPU(s) per node" if not cpu else f"CPU only, {job.nproc_per_node} process(es) per node"
    if command_line:
        command_line = command_line.replace("\r", "\\r").replace("\n", "\\n")  # stays one comment line
    lines = [
        "#!/bin/bash",
        "# Written by `calmrl launch slurm`" + (f": {command_line}" if command_line else ""),
        f"# {job.nodes} node(s), {mode}, world size {job.world_size}.",
        *(f"#SBATCH {s}" for s in sb),
        "",
        "set -eu  # no pipefail: `head -n1` below may close scontrol's pipe early",
        "",
        f"PYTHON={_q(job.python)}",
        f"NPROC_PER_NODE={job.nproc_per_node}",
        "",
        "# c10d rendezvous on the first node of the allocation.",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        '[ -n "$MASTER_ADDR" ] || { echo "calmrl: no first node in \'$SLURM_JOB_NODELIST\'" >&2; exit 1; }',
        f"MASTER_PORT={port}",
        "export MASTER_ADDR MASTER_PORT",
        "",
        "# NCCL: fail fast on a lost peer instead of hanging; warnings only.",
        "export NCCL_ASYNC_ERROR_HANDLING=1",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        "# Threads per rank: the task's CPUs shared by the node's ranks.",
        'CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"',
        "export OMP_NUM_THREADS=$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))",
        "export PYTHONUNBUFFERED=1",
    ]
    if cpu:
        lines.append("export DS_ACCELERATOR=cpu  # no GPU requested: DeepSpeed's CPU accelerator, gloo")
    else:  # a CPU setting exported from the submit host must not reach GPU ranks
        lines.append('if [ "${DS_ACCELERATOR:-}" = cpu ]; then unset DS_ACCELERATOR; fi')
    lines += [f"export {k}={_q(v)}" for k, v in sorted(job.extra_env.items())]
    lines += [
        "",
        'echo "calmrl: job $SLURM_JOB_ID on $SLURM_NNODES node(s) ($SLURM_JOB_NODELIST),'
        " $NPROC_PER_NODE rank(s) per node, rendezvous $MASTER_ADDR:$MASTER_PORT,"
        f' metrics on port {job.metrics_port} + local rank"',
        "",
        f"STOPPED={_q((job.out_dir or job.workdir) / 'stopped.json')}  # a signal stopped the run after a checkpoint",
        'rm -f "$STOPPED"',
        "code=0",
        " ".join(srun) + " \\",
        "    " + " ".join(torchrun[:3]) + " \\",
        "    " + " ".join(torchrun[3:5]) + " \\",
        "    " + " ".join(torchrun[5:9]) + " \\",
        "    " + " ".join(torchrun[9:]) + " \\",
        "    " + " ".join(train) + " || code=$?",
        'if [ -f "$STOPPED" ]; then',
        '    echo "calmrl: stopped with a checkpoint ($(cat "$STOPPED")); requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$code"',
        "",
    ]
    return "\n".join(lines)


def submit(script: Path, env: dict[str, str] | None = None) -> str:
    """`sbatch --parsable SCRIPT`; the job id, or a LaunchError with sbatch's own message."""
    sbatch = shutil.which("sbatch", path=(env or os.environ).get("PATH"))
    if sbatch is None:
        raise LaunchError(
            f"sbatch not found on PATH: run this on a Slurm submit host (or install the Slurm "
            f"client). The script is written: submit it by hand with `sbatch {script}`."
        )
    try:
        done = subprocess.run(
            [sbatch, "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=SBATCH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"sbatch did not answer within {SBATCH_TIMEOUT_S} s (is slurmctld reachable? "
            f"try `scontrol ping`); script: {script}"
        ) from None
    if done.returncode != 0:
        why = done.stderr.strip() or done.stdout.strip() or "(no output)"
        raise LaunchError(f"sbatch failed (exit {done.returncode}) for {script}:\n{why}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable: "jobid[;cluster]"
    if not job_id.isdigit():
        raise LaunchError(f"sbatch gave no job id (output {done.stdout!r}, stderr {done.stderr.strip()!r})")
    return job_id


def add_launch_parser(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `calmrl launch` with its `slurm` subcommand to the top-level `subparsers`.

    Returns the subparsers of `launch` (dest `launch_command`), so other launchers can add
    theirs beside it (`add_k8s_parser(launch)` for `calmrl launch k8s`)."""
    launch = subparsers.add_parser("launch", help="launch training on a cluster (slurm, k8s)")
    which = launch.add_subparsers(dest="launch_command", required=True)
    add_slurm_parser(which)
    return which


def add_slurm_parser(launch_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`calmrl launch slurm ...` (extra `--section.key=value` arguments are config overrides)."""
    p = launch_subparsers.add_parser(
        "slurm",
        help="write an sbatch script (torchrun on every node, c10d rendezvous) and submit it",
        description="Validate CONFIG (with --section.key=value overrides), write "
        "<train.out_dir>/slurm/job.sbatch and submit it with sbatch. "
        "Extra --section.key=value arguments override the config.",
    )
    p.add_argument("config")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        required=True,
        help="GPUs (= ranks) per node; 0 runs on CPUs (see --nproc-per-node)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="ranks per node when --gpus-per-node is 0 (default 1); must equal G otherwise",
    )
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="wall-clock limit, e.g. 2-00:00:00 or 90")
    p.add_argument("--job-name", default=None, help="default calmrl-<name of train.out_dir>")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's torchrun task")
    p.add_argument("--output-dir", default=None, help="folder of the Slurm log (default <train.out_dir>/slurm)")
    p.add_argument(
        "--master-port",
        type=int,
        default=None,
        help=f"rendezvous port (default {MASTER_PORT_BASE} + job id %% {MASTER_PORT_SPAN})",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="passed to train: 'auto' (default: the run's last checkpoint if it has one, so a "
        "requeued job continues), 'latest', a checkpoint folder name, or 'none' to always start fresh",
    )
    p.add_argument("--dry-run", action="store_true", help="write and print the script, submit nothing")
    return p


def _check_word(name: str, value: str | None) -> None:
    if value is not None and not _WORD_RE.match(value):
        raise LaunchError(f"{name} {value!r}: use letters, digits and _.,:+@%=- only")


def build_job(args: argparse.Namespace, overrides: list[str], cfg) -> SlurmJob:
    """Check the launch options against each other and resolve paths (relative to the current folder)."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1 (got {args.nodes})")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0 (got {args.gpus_per_node})")
    if args.gpus_per_node > 0:
        if args.nproc_per_node not in (None, args.gpus_per_node):
            raise LaunchError(
                f"--nproc-per-node {args.nproc_per_node} != --gpus-per-node {args.gpus_per_node}: "
                f"on GPUs every rank has its own GPU (leave --nproc-per-node out)"
            )
        nproc = args.gpus_per_node
    else:
        nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
        if nproc < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1 (got {nproc})")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task must be >= 1 (got {args.cpus_per_task})")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise LaunchError(f"--master-port must be a TCP port (got {args.master_port})")
    if args.time is not None and not _TIME_RE.match(args.time):
        raise LaunchError(f"--time {args.time!r} is not a Slurm time (minutes, [D-]HH:MM:SS, MM:SS, D-HH, ...)")
    workdir = Path.cwd().resolve()
    out_dir = (workdir / cfg.train.out_dir).resolve()
    job_name = args.job_name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"calmrl-{out_dir.name}")
    _check_word("--job-name", job_name)
    _check_word("--partition", args.partition)
    log_dir = (workdir / args.output_dir).resolve() if args.output_dir else out_dir / "slurm"
    if re.search(r"\s", str(log_dir)) or re.search(r"\s", str(workdir)):
        raise LaunchError(f"paths with spaces cannot go on #SBATCH lines: {log_dir} / {workdir}")
    return SlurmJob(
        config=Path(args.config).resolve(),
        overrides=list(overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=nproc,
        job_name=job_name,
        output=log_dir / "%x-%j.out",
        workdir=workdir,
        python=sys.executable,
        metrics_port=cfg.metrics.port,
        partition=args.partition,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        master_port=args.master_port,
        resume=args.resume,
        grace_s=cfg.train.preempt_grace_s,
        out_dir=out_dir,
    )


def script_path(cfg) -> Path:
    return (Path.cwd() / cfg.train.out_dir).resolve() / "slurm" / SCRIPT_NAME


def cmd_launch_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    """Validate, render, write, then print (--dry-run) or submit. 0 on success, 2 on a config or usage error,
    1 when submission fails."""
    from pretrain.config import ConfigError, load_config

    bad = [a for a in overrides if not (a.startswith("--") and "=" in a)]
    if bad:
        print(
            f"calmrl launch slurm: unrecognised arguments: {' '.join(bad)} "
            f"(config overrides look like --section.key=value)",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config, overrides)  # before anything is written or submitted
    except ConfigError as exc:
        print(f"calmrl: config error: {exc}", file=sys.stderr)
        return 2
    try:
        job = build_job(args, overrides, cfg)
    except LaunchError as exc:
        print(f"calmrl launch slurm: {exc}", file=sys.stderr)
        return 2
    command_line = " ".join(_q(a) for a in ["calmrl", *sys.argv[1:]]) if sys.argv[1:3] == ["launch", "slurm"] else None
    text = render_sbatch(job, command_line)
    path = atomic_write(script_path(cfg), text, mode=0o755)
    if args.dry_run:
        sys.stdout.write(text)
        sys.stdout.flush()
        print(f"calmrl: wrote {path} (dry run: nothing submitted; submit with `sbatch {path}`)", file=sys.stderr)
        return 0
    job.output.parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's folder
    try:
        job_id = submit(path)
    except LaunchError as exc:
        print(f"calmrl launch slurm: {exc}", file=sys.stderr)
        return 1
    log = Path(str(job.output).replace("%x", job.job_name).replace("%j", job_id))
    print(
        f"submitted Slurm job {job_id}: {job.nodes} node(s) x {job.nproc_per_node} rank(s) "
        f"({'CPU' if job.gpus_per_node == 0 else 'GPU'}), world size {job.world_size}"
    )
    print(f"  script: {path}")
    print(f"  log:    {log}")
    print(f"  follow: tail -F {log}    (state: squeue -j {job_id}; cancel: scancel {job_id})")
    return 0
