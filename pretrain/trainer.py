"""The DeepSpeed trainer: one readable loop over separately built parts.

Parts (each built from the one `Config`): the batch loader
(`data_pipeline.reader.BatchLoader`), the model (`MultiModalModel`), the
objective (`pretrain.losses`), the DeepSpeed engine (optimizer, ZeRO stage,
precision, accumulation, clipping, warm-up + cosine schedule), the
checkpointer and the run log.
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from data_pipeline.reader import BatchLoader, LoaderState, open_split
from data_pipeline.tokenizer import load_tokenizer
from cluster.metrics import MetricsExporter
from evals.anchor_shift import anchor_shift
from pretrain.checkpoint import Checkpointer
from pretrain.completion import Completion
from pretrain.config import MODALITIES, Config
from pretrain.distributed import is_distributed, rank, world_size
from pretrain.losses import OBJECTIVES
from pretrain.model import MultiModalModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group torchrun describes, or make a group of one."""
    import deepspeed

    if is_distributed():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {**t.zero_options, "stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": max(t.warmup_steps, 1),
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def build_optimizer(model: MultiModalModel, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with one group per (tower or rest) x (decay or not).

    No weight decay on biases, norms, position tables and the logit scale; a
    tower's `lr_mult` scales its groups' learning rate (the schedule scales
    every group alike); a frozen tower's weights are left out entirely."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        mult = 1.0
        if name.startswith("towers."):
            tower = getattr(cfg.model, name.split(".")[1])
            if tower.freeze:
                p.requires_grad_(False)
                continue
            mult = tower.lr_mult
        decay = p.ndim >= 2 and "position" not in name
        groups.setdefault((mult, decay), []).append(p)
    param_groups = [{"params": params, "lr": cfg.train.lr * mult,
                     "weight_decay": cfg.train.weight_decay if decay else 0.0}
                    for (mult, decay), params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


def objective_options(cfg: Config) -> dict[str, Any]:
    """The keyword options of the configured objective."""
    return {
        "pairwise": {"imputed_pair_weight": cfg.loss.imputed_pair_weight},
        "gram": {"anchor": cfg.loss.gram_anchor},
        "pmrl": {"tau1": cfg.loss.pmrl_tau1},
    }[cfg.loss.objective]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def vocab_size_of(cfg: Config) -> int:
    split = open_split(cfg.data.shards, cfg.data.tokenizer)
    return load_tokenizer(split.tokenizer_json, cfg.data.max_text_len).get_vocab_size()


def build_model(cfg: Config, vocab_size: int) -> MultiModalModel:
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    return MultiModalModel(cfg.model, cfg.data, vocab_size)


class RunLog:
    """Rank 0's JSONL log and progress bar; other ranks keep quiet."""

    def __init__(self, out_dir: Path, total: int, start: int, enabled: bool, progress: bool = True):
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (enabled and progress),
                        dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.0f}")

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class StepStats:
    step: int
    loss: float
    samples_per_s: float
    data_wait_s: float
    step_time_s: float
    completion_time_s: float  # calibrator E-step, statistics, M-step, imputation (or a baseline's fill)


class Trainer:
    def __init__(self, cfg: Config, batches: Iterator[dict[str, Any]] | None = None, progress: bool = True):
        """`batches` replaces the shard loader (benchmarks feed in-memory batches);
        `progress` False hides the step bar (callers with a bar of their own)."""
        import deepspeed

        init_distributed()
        self.cfg = cfg
        self.rank, self.world = rank(), world_size()
        self.device = device_for_rank()
        self.out_dir = Path(cfg.train.out_dir)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.model = build_model(cfg, vocab_size_of(cfg))
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=build_optimizer(self.model, cfg),
            config=deepspeed_config(cfg, self.world),
        )
        self.objective = OBJECTIVES[cfg.loss.objective]
        self.objective_options = objective_options(cfg)
        self.completion = Completion(cfg.calibration, MODALITIES, cfg.model.embed_dim, seed=cfg.train.seed)
        self.completion.to(self.device)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.step = 0
        self.loader_state = LoaderState()
        self._external_batches = batches
        self.progress = progress
        self._last_complete_emb: dict[str, torch.Tensor] | None = None
        self.metrics = MetricsExporter(cfg.metrics, self.rank, int(os.environ.get("LOCAL_RANK", 0)))
        self.batches: Iterator[dict[str, Any]] | None = None
        self.float_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        seed_everything(cfg.train.seed + 1000 * self.rank)

    # -- checkpoints -------------------------------------------------------
    def save(self) -> Path:
        state = {"loader": self._loader_position(), "rng": rng_state(), "config": self.cfg.to_dict(),
                 "completion": self.completion.state_dict()}
        return self.checkpointer.save(self.engine, self.step, state)

    def resume(self, tag: str = "latest") -> None:
        state = self.checkpointer.load(self.engine, tag)
        self.step = int(state["step"])
        self.loader_state = LoaderState.from_dict(state["loader"])
        set_rng_state(state["rng"])
        self.completion.load_state_dict(state["completion"])

    def _loader_position(self) -> dict[str, Any]:
        if isinstance(self.batches, BatchLoader):
            return self.batches.state.to_dict()
        return self.loader_state.to_dict()

    # -- the loop ----------------------------------------------------------
    def _record(self, stats: StepStats, with_anchor_shift: bool) -> dict[str, Any]:
        """What one step reports: the JSONL log line and the Prometheus metrics."""
        record: dict[str, Any] = {
            "step": stats.step, "loss": stats.loss, **self._last_terms,
            "lr": self.engine.get_lr()[0], "logit_scale": self._last_logit_scale,
            "samples_per_s": stats.samples_per_s, "step_time_s": stats.step_time_s,
            "data_wait_s": stats.data_wait_s, "completion_time_s": stats.completion_time_s,
            **{f"present/{m}": int(c) for m, c in zip(MODALITIES, self._last_present)},
            **{f"imputed/{m}": int(c) for m, c in zip(MODALITIES, self._last_imputed)},
            "calibrator/log_likelihood": self._last_log_likelihood,
            **self.completion.extra_metrics(),
        }
        if isinstance(self.batches, BatchLoader):
            record["bad_samples"] = self.batches.state.bad_samples
        if with_anchor_shift and self._last_complete_emb is not None:
            record.update(self._batch_anchor_shift(self._last_complete_emb))
        record["time"] = time.time()
        return record

    def _batch_anchor_shift(self, emb: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean anchor shift over missing patterns on this batch's complete rows."""
        calibrator = self.completion.calibrator
        shift = anchor_shift(emb, calibrator, MODALITIES)
        out = {"anchor_shift/observed_only": sum(r["observed_only"] for r in shift.values()) / len(shift)}
        if calibrator is not None:
            out["anchor_shift/calibrated"] = sum(r["calibrated"] for r in shift.values()) / len(shift)
        return out

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(self.float_dtype)
            out[k] = v
        return out

    def train_step(self) -> StepStats:
        """One optimizer step (grad_accum micro-steps)."""
        start = time.perf_counter()
        data_wait = 0.0
        loss_value = 0.0
        terms: dict[str, float] = {}
        present_counts = torch.zeros(len(MODALITIES), dtype=torch.long)
        imputed_counts = torch.zeros(len(MODALITIES), dtype=torch.long)
        log_likelihood = None
        completion_time = 0.0
        for _ in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.batches)
            data_wait += time.perf_counter() - t0
            present_counts += batch["present"].sum(0)
            batch = self._to_device(batch)
            out = self.engine(batch)
            t1 = time.perf_counter()
            done = self.completion.complete(out["emb"], batch["present"], self.step)
            completion_time += time.perf_counter() - t1
            imputed_counts += (done.available & ~done.observed).sum(0).cpu()
            losses = self.objective(done.emb, done.observed, out["logit_scale"], MODALITIES,
                                    available=done.available, **self.objective_options)
            self.engine.backward(losses["loss"])
            self.engine.step()
            if (self.step + 1) % self.cfg.train.log_every == 0:
                log_likelihood = self.completion.log_likelihood(out["emb"], batch["present"])
                complete = batch["present"].all(1)
                self._last_complete_emb = ({m: e.detach()[complete].float() for m, e in out["emb"].items()}
                                           if int(complete.sum()) >= 2 else None)
            loss_value += float(losses["loss_value"]) / self.cfg.train.grad_accum
            self._last_logit_scale = float(out["logit_scale"].detach()[0])
            for k, v in losses.items():
                if k.startswith("loss/"):
                    terms[k] = terms.get(k, 0.0) + float(v) / self.cfg.train.grad_accum
        self.step += 1
        t1 = time.perf_counter()
        self.completion.end_step(self.step)
        completion_time += time.perf_counter() - t1
        elapsed = time.perf_counter() - start
        samples = self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world
        self._last_terms = terms
        self._last_present = present_counts
        self._last_imputed = imputed_counts
        self._last_log_likelihood = log_likelihood
        return StepStats(self.step, loss_value, samples / elapsed, data_wait, elapsed, completion_time)

    def fit(self, resume: str | None = None) -> list[StepStats]:
        cfg = self.cfg
        if resume == "auto":  # restartable jobs: continue if this run has a checkpoint, else start
            resume = "latest" if (self.checkpointer.root / "latest").is_file() else None
        if resume:
            self.resume(resume)
        if self._external_batches is not None:
            self.batches = self._external_batches
        else:
            self.batches = BatchLoader(cfg.data, self.rank, self.world, self.loader_state)
        stop_at = cfg.train.steps
        log = RunLog(self.out_dir, cfg.train.steps, self.step, enabled=self.rank == 0, progress=self.progress)
        history: list[StepStats] = []
        self.engine.train()
        try:
            while self.step < stop_at:
                stats = self.train_step()
                history.append(stats)
                log.advance()
                due = self.step % cfg.train.log_every == 0 or self.step == stop_at
                record = self._record(stats, with_anchor_shift=due)
                self.metrics.observe_step(record)
                if due:
                    log.write(record)
                if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0 and self.step < stop_at:
                    self.save()
                if cfg.train.stop_at and self.step >= cfg.train.stop_at:
                    break
            self.save()
        finally:
            log.close()
            self.metrics.close()
        return history
