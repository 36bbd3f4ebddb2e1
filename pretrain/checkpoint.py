"""Atomic checkpoints of a DeepSpeed engine plus per-rank trainer state.

Layout under `DIR/checkpoints/`:
    step_00000010/            one complete checkpoint (DeepSpeed files +
                              trainer_state_rank{R}.pt for every rank)
    latest                    text file naming the newest complete step folder
A checkpoint is written as `.tmp-step_...` and renamed into place by rank 0
only after every rank has finished writing; `latest` is replaced atomically
after that. A crash at any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write
from pretrain.distributed import is_distributed, rank, world_size

LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def rank_state_name(rank: int) -> str:
        return f"trainer_state_rank{rank}.pt"

    def save(self, engine: Any, step: int, rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own `rank_state`."""
        tag = step_tag(step)
        tmp_tag = f".tmp-{tag}"
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # Every rank is inside this save, so any other partial folder was left by a crash.
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        state = {**rank_state, "world_size": world_size(), "step": step}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(tmp_dir / self.rank_state_name(rank()), buf.getvalue())
        _barrier()
        if rank() == 0:
            if final_dir.exists():
                shutil.rmtree(final_dir)
            tmp_dir.rename(final_dir)
            atomic_write(self.root / LATEST, tag.encode())
            self._prune(keep_tag=tag)
        _barrier()
        return final_dir

    def _prune(self, keep_tag: str) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir())
        for old in tags[: -self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def resolve(self, tag: str) -> str:
        if tag == LATEST:
            pointer = self.root / LATEST
            if not pointer.is_file():
                raise CheckpointError(f"no checkpoint to resume: {pointer} does not exist")
            tag = pointer.read_text().strip()
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"checkpoint {self.root / tag} does not exist")
        return tag

    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Collective: load engine state (module, optimizer, scheduler) and this rank's state."""
        tag = self.resolve(tag)
        state_path = self.root / tag / self.rank_state_name(rank())
        if not state_path.is_file():
            raise CheckpointError(f"{state_path} missing: the checkpoint was written by fewer ranks")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["world_size"] != world_size():
            raise CheckpointError(
                f"{self.root / tag} was written by {state['world_size']} ranks; resuming it exactly "
                f"needs the same number (got {world_size()})"
            )
        path, _ = engine.load_checkpoint(
            str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.root / tag}")
        return state
