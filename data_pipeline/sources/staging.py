"""A build never leaves half a data set under its output folder.

Every builder of the registry writes into a hidden staging folder beside the
output, `.OUT.building-HOST-PID` (same parent, so the same filesystem), and
the finished folder is renamed into place. On any failure, Ctrl-C included,
the staging folder is removed, so the output folder is left as it was: absent,
or the previous complete build. A build killed without a chance to clean up
(SIGKILL, a lost node) leaves its staging folder; the next build into the same
output removes it when it was this host's and its process is gone, and names
it otherwise (another host's build may still be running).

An existing output folder is replaced only by a successful build, and only
when it holds nothing but a build's own entries (train/, val/, test/,
tokenizer.json); a folder with anything else is refused before any work, so a
mistyped --out never deletes the user's files.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from data_pipeline.sources.options import SPLITS, BuildOptions, BuildReport, SourceError

BUILD_ENTRIES = frozenset({*SPLITS, "tokenizer.json"})
STAGING_MARK = ".building-"
REPLACED_MARK = ".replaced-"


def _host() -> str:
    return socket.gethostname().split(".")[0] or "host"


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_MARK}{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_staging(out: Path) -> list[Path]:
    """Remove what killed builds into `out` left on this host; return the leftovers of
    builds on other hosts or still running (named on stderr, not touched)."""
    kept = []
    for mark in (STAGING_MARK, REPLACED_MARK):
        for path in sorted(out.parent.glob(f".{out.name}{mark}*")):
            host, _, pid = path.name.removeprefix(f".{out.name}{mark}").rpartition("-")
            if host == _host() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                print(f"calmrl: removed {path}, left by a build (pid {pid}) that was killed", file=sys.stderr)
            else:
                kept.append(path)
                print(
                    f"calmrl: {path} was left by a build on host {host or '?'} (pid {pid or '?'}) that may "
                    "still be running; it is not a split (readers never look there): delete it once that "
                    "build is gone",
                    file=sys.stderr,
                )
    return kept


def check_out(out: Path) -> None:
    """Refuse an output that is not a folder, or one holding anything but a build's own entries."""
    if out.exists() and not out.is_dir():
        raise SourceError(f"--out {out}: exists and is not a folder; choose a folder path")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in BUILD_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise SourceError(
                f"--out {out}: holds {shown}, which no build writes; a build replaces the whole folder, "
                "so choose a new or empty folder (or move those files away)"
            )


def publish(staging: Path, out: Path) -> None:
    """Put the finished `staging` folder at `out`, replacing an earlier build there.

    A rename when `out` is absent or empty. Otherwise the old build is renamed
    aside first (two renames; a crash between them leaves it as
    `.OUT.replaced-HOST-PID`, cleaned or named by the next build) and removed."""
    check_out(out)  # again: something may have appeared while building
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}{REPLACED_MARK}{_host()}-{os.getpid()}"
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def staged_build(builder: Callable[[BuildOptions], BuildReport], opts: BuildOptions) -> BuildReport:
    """Run `builder` into a staging folder beside `opts.out`; publish it on success, remove it on failure."""
    given = Path(opts.out)
    out = Path(os.path.realpath(given))  # a symlinked --out: stage and publish beside its target
    check_out(out)  # before any work: a refused --out should not cost a build
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_staging(out)
    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)  # ours by name: an earlier process with this pid, gone
    staging.mkdir()
    try:
        report = builder(replace(opts, out=staging))
        publish(staging, out)
    except BaseException:  # KeyboardInterrupt and SystemExit too: nothing half-built stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.summary = report.summary.replace(str(staging), str(given))
    return report
