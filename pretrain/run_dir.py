"""The run folder: the one place that knows how a run is laid out on disk.

    RUN/config.yaml                  the resolved config the run trained with
    RUN/log.jsonl                    rank 0's log, one JSON record per logged step
    RUN/checkpoints/step_XXXXXXXX/   DeepSpeed files + trainer_state_rank{R}.pt
    RUN/checkpoints/latest           names the newest complete checkpoint
    RUN/eval/                        `calmrl eval` results

Readers of a run (evaluation, the sweep, continued training) go through
`RunDir`; nothing else opens these paths by name.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from data_pipeline.atomic import atomic_write
from data_pipeline.contract import MODALITIES
from data_pipeline.split import vocab_size
from pretrain.checkpoint import LATEST, Checkpointer, CheckpointError
from pretrain.completion import Completion
from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.model import MultiModalModel


class RunDir:
    CONFIG = "config.yaml"
    LOG = "log.jsonl"
    CHECKPOINTS = "checkpoints"
    EVAL = "eval"
    STOPPED = "stopped.json"  # written when a signal stopped the run after a checkpoint

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / self.CONFIG
        self.log_path = self.path / self.LOG
        self.checkpoints = self.path / self.CHECKPOINTS
        self.eval_dir = self.path / self.EVAL
        self.stopped_path = self.path / self.STOPPED

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def checkpointer(self, keep: int = 2) -> Checkpointer:
        return Checkpointer(self.checkpoints, keep)

    # -- the config ----------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def config(self) -> Config:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a calmrl run folder: it has no {self.CONFIG}")
        return config_from_dict(yaml.safe_load(self.config_path.read_text()), str(self.config_path))

    # -- checkpoints -----------------------------------------------------------
    def has_checkpoint(self) -> bool:
        """Whether there is something to resume: a `latest` file, or a step folder (`latest` lost)."""
        return (self.checkpoints / LATEST).is_file() or bool(self.checkpointer().step_tags())

    def resolve(self, tag: str = LATEST) -> str:
        """A checkpoint tag ('latest' or 'step_XXXXXXXX') as the intact folder it stands for: a damaged
        `latest` falls back to the newest intact checkpoint with a warning (`Checkpointer.resolve`)."""
        return self.checkpointer().resolve(tag)

    def rank_state(self, tag: str = LATEST, rank: int = 0) -> dict[str, Any]:
        """A rank's trainer state (loader position, RNG, completion state) at a checkpoint."""
        tag = self.resolve(tag)
        path = self.checkpoints / tag / Checkpointer.rank_state_name(rank)
        return torch.load(path, map_location="cpu", weights_only=False)

    def model_state(self, tag: str = LATEST) -> tuple[str, dict[str, torch.Tensor]]:
        """Full fp32 model weights of a checkpoint of any ZeRO stage, and its resolved tag.

        ZeRO 1-3 keep fp32 master weights in per-rank optimizer shards, which
        DeepSpeed's zero_to_fp32 joins; ZeRO 0 (plain data parallel) writes no
        shards, and its module file holds the whole model."""
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = self.resolve(tag)
        folder = self.checkpoints / tag
        if any(folder.glob("*optim_states.pt")):
            return tag, get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoints), tag=tag)
        module_file = folder / "mp_rank_00_model_states.pt"
        if not module_file.is_file():
            raise CheckpointError(
                f"{folder} holds neither ZeRO shards nor {module_file.name}: an incomplete checkpoint; use another tag"
            )
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        return tag, {k: v.float() for k, v in module.items()}

    def load_model(self, tag: str = LATEST) -> tuple[Config, MultiModalModel, str]:
        """The run's model with the checkpoint's full fp32 weights, in eval mode."""
        cfg = self.config()
        tag, state = self.model_state(tag)
        model = MultiModalModel(cfg.model, cfg.data, vocab_size(cfg.data))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {self.checkpoints / tag} does not match the model: "
                f"missing {missing}, unexpected {unexpected}"
            )
        return cfg, model.eval(), tag

    def load_completion(self, tag: str = LATEST) -> Completion:
        """The run's completion state (calibrator or mean filler) at a checkpoint;
        it is the same on every rank, so rank 0's copy is read."""
        cfg = self.config()
        completion = Completion(cfg.calibration, MODALITIES, cfg.model.embed_dim, seed=cfg.train.seed)
        completion.load_state_dict(self.rank_state(tag)["completion"])
        return completion

    # -- the log ---------------------------------------------------------------
    def log_records(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def last_logged_loss(self) -> float:
        records = self.log_records()
        return float(records[-1]["loss"]) if records else math.nan

    # -- a stop on a signal ----------------------------------------------------
    def write_stopped(self, step: int, signal: str, checkpoint: str) -> None:
        """Rank 0, after the checkpoint of a run a signal stopped: the launcher reads it."""
        record = {"step": step, "signal": signal, "checkpoint": checkpoint}
        atomic_write(self.stopped_path, json.dumps(record))

    def clear_stopped(self) -> None:
        self.stopped_path.unlink(missing_ok=True)
