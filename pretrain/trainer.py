"""The trainer: one readable loop over parts built from one `Config`.

Parts: the batches (the shard loader, `data_pipeline.reader.BatchLoader`, or
any iterator of batches in the batch contract), the model inside its DeepSpeed
engine (`pretrain.engine`), the objective (`pretrain.losses.create_objective`),
the completion of missing modalities (`pretrain.completion`), the run folder
with its checkpoints (`pretrain.run_dir`), and sinks that receive each step's
`StepResult` (`pretrain.sinks`). `build_trainer` is the one way to put them
together: the CLI, the sweep workers, the benchmark and the tests all use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.reader import BatchLoader, LoaderState, reshard_loader_state
from data_pipeline.split import vocab_size
from pretrain.anchor_shift import anchor_shift
from pretrain.completion import Completion
from pretrain.config import Config
from pretrain.distributed import rank, world_size
from pretrain.engine import build_engine
from pretrain.feature_cache import FeatureCache, build_feature_cache
from pretrain.guard import STOP_REQUEST, Decision, Diverged, StepGuard, all_finite, find_skippable
from pretrain.init_from import load_initial_completion, load_initial_weights
from pretrain.losses import Objective, create_objective
from pretrain.model import build_model
from pretrain.rng import rng_state, seed_everything, set_rng_state
from pretrain.run_dir import RunDir
from pretrain.runtime import device_for_rank, init_distributed
from pretrain.sinks import JsonlLog, StepSink
from pretrain.step import StepResult


class Trainer:
    """The loop over already-built parts (see `build_trainer`)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: RunDir,
        engine: Any,
        objective: Objective,
        completion: Completion,
        device: torch.device,
        batches: Iterator[dict[str, Any]] | None = None,
        sinks: Iterable[StepSink] = (),
        read_every: int = 0,
        feature_cache: FeatureCache | None = None,
    ):
        """`batches` replaces the shard loader (benchmarks feed in-memory batches);
        `read_every` > 0 also reads the step's values every that many steps (a sink
        that reports between log steps); `feature_cache` holds frozen towers' outputs
        (model.cache_frozen): their modalities are not decoded, the heads read the cache."""
        self.feature_cache = feature_cache
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.engine, self.objective, self.completion = engine, objective, completion
        self.rank, self.world = rank(), world_size()
        self.checkpointer = run_dir.checkpointer(cfg.train.keep_checkpoints)
        self.sinks: list[StepSink] = ([JsonlLog(run_dir.log_path)] if self.rank == 0 else []) + list(sinks)
        self.step = 0
        self.loader_state = LoaderState()
        self._external_batches = batches
        self.batches: Iterator[dict[str, Any]] | None = None
        self.float_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.read_every = read_every
        self._read_next = True  # the first step of each fit reads (its loss starts the summary)
        # Faults (pretrain/guard.py): one agreed decision per step; signals become a stop after the step.
        self.guard = StepGuard(cfg.train, engine.module.parameters(), device)
        self.optimizer = find_skippable(engine.optimizer)
        self.stop_request = STOP_REQUEST
        self.stopped_by: str | None = None  # set when a stop request (a signal on any rank) ended `fit`
        self.last_decision: Decision | None = None

    @property
    def out_dir(self) -> Path:
        return self.run_dir.path

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    # -- checkpoints -------------------------------------------------------
    def last_good_checkpoint(self) -> str:
        """The checkpoint a diverged run would continue from, as a path (or why there is none)."""
        if not self.run_dir.has_checkpoint():
            return "none (the run has no checkpoint yet)"
        return str(self.run_dir.checkpoints / (self.run_dir.checkpoints / "latest").read_text().strip())

    def save(self) -> Path:
        """Collective: write a checkpoint of this step; refuses a model that is not finite."""
        if not all_finite(self.model):
            raise Diverged(
                f"the model is not finite at step {self.step}: not saved, `latest` left at "
                f"{self.last_good_checkpoint()}; resume from it with a lower train.lr"
            )
        state = {
            "loader": self._loader_position(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "completion": self.completion.state_dict(),
        }
        return self.checkpointer.save(self.engine, self.step, state)

    def resume(self, tag: str = "latest") -> None:
        """Collective: continue from a checkpoint (the engine's state, the loader position,
        the RNG, the completion state). A checkpoint of another number of ranks is loaded
        through DeepSpeed's universal checkpoint (pretrain/checkpoint.py) and its loader
        positions re-split over this job's readers (`reshard_loader_state`); the RNG then
        restarts from the seed and the step (the old per-rank streams do not map)."""
        state = self.checkpointer.load(self.engine, tag)
        self.step = int(state["step"])
        if state.get("resharded"):
            data = self.cfg.data
            old_roles = max(int(state["config"]["data"]["num_workers"]), 1)
            self.loader_state = reshard_loader_state(
                state["loaders"], old_roles, self.rank, self.world, max(data.num_workers, 1), data.resampled
            )
            seed_everything(self.cfg.train.seed + 1000 * self.rank + self.step)
        else:
            self.loader_state = LoaderState.from_dict(state["loader"])
            set_rng_state(state["rng"])
        self.completion.load_state_dict(state["completion"])

    def _loader_position(self) -> dict[str, Any]:
        if isinstance(self.batches, BatchLoader):
            return self.batches.state.to_dict()
        return self.loader_state.to_dict()

    # -- one step ----------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(self.float_dtype)
            out[k] = v
        return out

    def _diagnostics(self, emb: dict[str, torch.Tensor], present: torch.Tensor) -> dict[str, Any]:
        """Log-step diagnostics: the calibrator's log-likelihood of the batch, the
        mean anchor shift over missing patterns on the batch's complete rows, and
        the mean cosine of each pair's observed positives (a flipped sign shows)."""
        out: dict[str, Any] = {"log_likelihood": self.completion.log_likelihood(emb, present), "anchor_shift": {}}
        out["positive_cosine"] = {}
        for i, j in combinations(range(len(MODALITIES)), 2):
            both = present[:, i] & present[:, j]
            if bool(both.any()):
                a, b = emb[MODALITIES[i]].detach()[both], emb[MODALITIES[j]].detach()[both]
                out["positive_cosine"][f"cos/{MODALITIES[i]}-{MODALITIES[j]}"] = float((a * b).sum(1).mean())
        complete = present.all(1)
        if int(complete.sum()) >= 2:
            rows = {m: e.detach()[complete].float() for m, e in emb.items()}
            calibrator = self.completion.calibrator
            shift = anchor_shift(rows, calibrator, MODALITIES)
            out["anchor_shift"]["anchor_shift/observed_only"] = sum(r["observed_only"] for r in shift.values()) / len(
                shift
            )
            if calibrator is not None:
                out["anchor_shift"]["anchor_shift/calibrated"] = sum(r["calibrated"] for r in shift.values()) / len(
                    shift
                )
        return out

    def _logs(self, step: int) -> bool:
        """Whether step `step` (1-based) is a log step: every `log_every`-th, the last, a `stop_at`."""
        train = self.cfg.train
        return step % train.log_every == 0 or step == train.steps or step == train.stop_at

    def _reads(self, step: int) -> bool:
        """Whether step `step` (1-based) reads its values back from the device: log
        steps, the first step of each `fit`, and every `read_every`-th step (a sink's
        reporting interval). Other steps never wait on the device."""
        return self._logs(step) or self._read_next or bool(self.read_every and step % self.read_every == 0)

    def train_step(self) -> StepResult:
        """One optimizer step (train.grad_accum micro-steps).

        No host synchronisation outside the steps that read (see `_reads`): the
        loss, its terms and the logit scale are summed on the device and read
        in one transfer on those steps; the present and imputed counts come
        from the batch's mask on the host (`Completion.available`), before it
        is moved to the device. Exceptions, by design: an exact calibrator fit
        (`calibration.exact_fit`, on its refit steps) tests convergence on the host.
        """
        assert self.batches is not None, "fit() sets up the batches"
        cfg = self.cfg
        start = time.perf_counter()
        step = self.step + 1
        logged, read = self._logs(step), self._reads(step)
        self._read_next = False
        data_wait = completion_time = 0.0
        sums: dict[str, torch.Tensor] = {}  # on the device: "loss_value", "loss/<term>", "active/<term>"
        present_counts = np.zeros(len(MODALITIES), dtype=np.int64)
        imputed_counts = np.zeros(len(MODALITIES), dtype=np.int64)
        diagnostics: dict[str, Any] = {}
        logit_scale: torch.Tensor | None = None
        decision: Decision | None = None
        for micro in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            self.guard.beat(step, "waiting for data")
            batch = next(self.batches)
            if self.feature_cache is not None:
                batch = self.feature_cache.attach(batch)
            self.guard.beat(step, "forward and backward")
            data_wait += time.perf_counter() - t0
            # Host-side counts from the loader's CPU mask (numpy(): host memory only, never a
            # device read). Batches given on a device have their mask copied back: a sync.
            present = batch["present"].cpu() if batch["present"].device.type != "cpu" else batch["present"]
            available = self.completion.available(present, self.step)
            present_counts += present.numpy().sum(0)
            imputed_counts += (available & ~present).numpy().sum(0)
            batch = self._to_device(batch)
            out = self.engine(batch)
            t1 = time.perf_counter()
            done = self.completion.complete(out["emb"], batch["present"], self.step)
            completion_time += time.perf_counter() - t1
            losses = self.objective(done.emb, done.observed, out["logit_scale"], MODALITIES, available=done.available)
            self.guard.observe_loss(losses["loss"])
            self.engine.backward(losses["loss"])
            if micro == cfg.train.grad_accum - 1:  # before the update: every rank decides alike
                decision = self.guard.decide(self.stop_request.requested, *self._local_bad_counts(), step=step)
                self.optimizer.skip = not decision.apply
                if not decision.apply:  # a skipped step is always in the log
                    logged = read = True
            self.engine.step()
            self.optimizer.skip = False
            if logged and micro == cfg.train.grad_accum - 1 and decision is not None and decision.apply:
                diagnostics = self._diagnostics(out["emb"], batch["present"])
            for key, value in losses.items():
                if key != "loss":
                    value = value.detach().float()
                    sums[key] = sums[key] + value if key in sums else value
            logit_scale = out["logit_scale"].detach()
        self.step += 1
        t1 = time.perf_counter()
        self.completion.end_step(self.step)
        completion_time += time.perf_counter() - t1
        loss_value: float | None = None
        terms: dict[str, float] = {}
        scale_value: float | None = None
        if read:  # one device-to-host transfer for every value of the step
            assert logit_scale is not None
            names = sorted(sums)
            values = torch.stack([sums[k] for k in names] + [logit_scale.reshape(-1)[0].float()]).tolist()
            got = dict(zip(names, values[:-1]))
            scale_value = values[-1]
            loss_value = got["loss_value"] / cfg.train.grad_accum
            terms = {
                k: v / cfg.train.grad_accum
                for k, v in got.items()
                if k.startswith("loss/") and got.get("active/" + k[5:], 1.0) > 0
            }
        assert decision is not None
        self.last_decision = decision
        elapsed = time.perf_counter() - start
        samples = cfg.data.batch_size * cfg.train.grad_accum * self.world
        return StepResult(
            step=self.step,
            loss=loss_value,
            terms=terms,
            lr=float(self.engine.get_lr()[0]),
            logit_scale=scale_value,
            samples_per_s=samples / elapsed,
            step_time_s=elapsed,
            data_wait_s=data_wait,
            completion_time_s=completion_time,
            present=present_counts.tolist(),
            imputed=imputed_counts.tolist(),
            logged=logged,
            read=read,
            log_likelihood=diagnostics.get("log_likelihood"),
            calibrator=self.completion.extra_metrics() if read else {},
            anchor_shift=diagnostics.get("anchor_shift", {}),
            positive_cosine=diagnostics.get("positive_cosine", {}),
            bad_samples=decision.bad_samples if isinstance(self.batches, BatchLoader) else None,
            bad_shards=decision.bad_shards if isinstance(self.batches, BatchLoader) else None,
            skipped=not decision.apply,
            skip_reason=decision.reason,
            skipped_total=self.guard.skipped_total,
            time=time.time(),
        )

    def _local_bad_counts(self) -> tuple[int, int]:
        """This rank's bad samples and bad shards so far (the guard sums them over ranks)."""
        if isinstance(self.batches, BatchLoader):
            return self.batches.state.bad_samples, self.batches.state.bad_shard_count
        return 0, 0

    # -- the loop ----------------------------------------------------------
    def fit(self, resume: str | None = None) -> list[StepResult]:
        """Train to `train.steps` (or `train.stop_at`), checkpointing as configured; `resume`:
        'latest', a checkpoint tag, or 'auto' (latest if the run has a checkpoint)."""
        cfg = self.cfg
        if resume == "auto":  # restartable jobs: continue if this run has a checkpoint, else start
            resume = "latest" if self.run_dir.has_checkpoint() else None
        if resume:
            self.resume(resume)
        if self._external_batches is not None:
            self.batches = self._external_batches
        else:
            cached = frozenset(self.feature_cache.modalities if self.feature_cache is not None else ())
            self.batches = BatchLoader(cfg.data, self.rank, self.world, self.loader_state, undecoded=cached)
        history: list[StepResult] = []
        self._read_next = True
        self.engine.train()
        self.stopped_by = None
        installed_here = not self.stop_request.installed and self.stop_request.install()
        try:
            while self.step < cfg.train.steps:
                result = self.train_step()
                history.append(result)
                for sink in self.sinks:
                    sink.on_step(result)
                if self.guard.exhausted:
                    raise Diverged(
                        f"{self.guard.bad_in_a_row} steps in a row skipped, up to step {self.step} "
                        f"(train.max_bad_steps={cfg.train.max_bad_steps}): {result.skip_reason}. Nothing after the "
                        f"last good checkpoint was saved: {self.last_good_checkpoint()}; resume from it with a "
                        "lower train.lr (or a larger train.max_bad_steps)"
                    )
                if (
                    self.last_decision is not None and self.last_decision.stop
                ):  # a signal reached some rank: all ranks save this step and stop
                    self.stopped_by = self.stop_request.signal or "a signal to another rank"
                    break
                periodic = cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0
                # A checkpoint follows a good step only: in a run of skipped steps the last good one stays `latest`.
                if periodic and self.step < cfg.train.steps and not self.guard.bad_in_a_row:
                    self.save()
                if cfg.train.stop_at and self.step >= cfg.train.stop_at:
                    break
            self.save()
        finally:
            if isinstance(self.batches, BatchLoader):
                self.batches.close()  # its workers ignore stop signals: end them here
            if installed_here:
                self.stop_request.restore()
            for sink in self.sinks:
                sink.close()
        return history


def build_trainer(
    cfg: Config,
    run_dir: RunDir | str | Path | None = None,
    *,
    batches: Iterator[dict[str, Any]] | None = None,
    sinks: Iterable[StepSink] = (),
    read_every: int = 0,
) -> Trainer:
    """Join (or make) the process group and build every part of a run from `cfg`.

    `run_dir` defaults to `train.out_dir`; rank 0 writes the resolved config
    there. With `train.init_from` the model (and, asked, the completion state)
    starts from another run's checkpoint (pretrain/init_from.py). `batches` replaces the shard loader; `sinks` receive every step's
    result besides the run log; `read_every` makes every that-many-th step read its
    loss back (see `Trainer._reads`). Collective: every rank calls it."""
    init_distributed(cfg.train.collective_timeout_s)
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir or cfg.train.out_dir)
    device = device_for_rank()
    if rank() == 0:
        run_dir.write_config(cfg)
    model = build_model(cfg, vocab_size(cfg.data))
    completion = Completion(cfg.calibration, MODALITIES, cfg.model.embed_dim, seed=cfg.train.seed)
    if cfg.train.init_from:  # before DeepSpeed partitions the weights (ZeRO-3)
        load_initial_weights(model, cfg.train)
        if cfg.train.init_calibrator:
            load_initial_completion(completion, cfg.train)
    # Frozen towers' outputs over the training split, once (model.cache_frozen), before
    # DeepSpeed takes the model (under ZeRO-3 its weights are partitioned afterwards).
    feature_cache = build_feature_cache(model, cfg, device, rank(), world_size()) if batches is None else None
    engine = build_engine(model, cfg, world_size())
    objective = create_objective(cfg.loss)
    completion = completion.to(device)
    trainer = Trainer(
        cfg,
        run_dir,
        engine,
        objective,
        completion,
        device,
        batches=batches,
        sinks=sinks,
        read_every=read_every,
        feature_cache=feature_cache,
    )
    seed_everything(cfg.train.seed + 1000 * rank())  # per-rank draws from here on (dropout, fill-ins)
    return trainer
