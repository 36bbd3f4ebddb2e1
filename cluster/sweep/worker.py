"""What runs on the Ray workers: a trial's distributed training run, reporting to Tune.

`run_trial` is the Tune function trainable: it starts a Ray Train
`TorchTrainer` with `workers_per_trial` workers. Each worker builds the calmrl
trainer (`build_trainer`) on the process group Ray Train created (DeepSpeed
reuses it) with a `TuneReporter` sink, so the trainer's own loop, logs and
checkpoints run unchanged. At the end rank 0 evaluates the final checkpoint on
the validation split and reports it with a `ray.train.Checkpoint` of the run
folder (Ray Train keeps a report's metrics as the run's result only when it
carries one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pretrain.config import config_from_dict, deep_merge, nest_dotted
from pretrain.run_dir import RunDir
from pretrain.step import StepResult


class TuneReporter:
    """A trainer sink reporting the training loss to Ray every `every` steps.

    Every rank reports the same number of times: `ray.train.report` is a barrier."""

    def __init__(self, every: int, total_steps: int):
        self.every, self.total_steps = every, total_steps

    def on_step(self, result: StepResult) -> None:
        import ray.train

        if result.step % self.every == 0 and result.step < self.total_steps:
            ray.train.report({"step": result.step, "loss": result.loss, "samples_per_s": result.samples_per_s})

    def close(self) -> None:
        pass  # the final report, with the checkpoint, is the worker's (it needs the evaluation)


def _validation_metrics(results: dict[str, Any]) -> dict[str, float]:
    out = {"val/mean_R@1": results["mean_R@1"], "val/num_complete": results["num_complete"]}
    pairs = results["retrieval"]
    for k in ("R@5", "R@10"):
        values = [m[k] for m in pairs.values()]
        out[f"val/mean_{k}"] = sum(values) / len(values) if values else float("nan")
    for pair, m in pairs.items():
        out[f"val/R@1/{pair}"] = m["R@1"]
    return out


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the calmrl Trainer, reporting to Ray as it goes."""
    import ray.train

    from pretrain.trainer import build_trainer

    cfg = config_from_dict(loop_config["config"], "<sweep trial>")
    run = RunDir(cfg.train.out_dir)
    reporter = TuneReporter(int(loop_config["report_every"]), cfg.train.steps)
    # the reporter needs the loss every report_every steps: those steps read it back
    trainer = build_trainer(cfg, run, sinks=[reporter], read_every=reporter.every)  # joins Ray's process group
    # A restarted trial (resumed sweep, retried failure) continues its own run.
    history = trainer.fit(resume="auto")
    metrics: dict[str, Any] = {"step": trainer.step, "loss": history[-1].loss if history else run.last_logged_loss()}
    if history:
        metrics["samples_per_s"] = sum(h.samples_per_s for h in history) / len(history)
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        if loop_config["eval_split"]:
            from evals.evaluate import evaluate_run
            from evals.report import write_results

            results = evaluate_run(run.path, loop_config["eval_split"])
            write_results(results, run.eval_dir)
            metrics.update(_validation_metrics(results))
        # The run folder (config, log, DeepSpeed checkpoints, eval) is self-contained: `calmrl eval` reads it.
        checkpoint = ray.train.Checkpoint.from_directory(str(run.path))
    ray.train.report(metrics, checkpoint=checkpoint)


def run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """A Tune function trainable: one distributed run of the trial's config."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    tree = deep_merge(plan["base"], nest_dotted(params))
    tree["train"]["out_dir"] = str(Path(plan["runs_dir"]) / trial_id)
    cfg = config_from_dict(tree, f"<trial {trial_id}>")
    resources = {"CPU": plan["cpus_per_worker"]}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "eval_split": plan["eval_split"],
            "report_every": plan["report_every"],
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan["workers_per_trial"], use_gpu=plan["use_gpu"], resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=plan["train_storage"],
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # Ray's types lag its API: it forwards every worker report to this trial
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def run_benchmark_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """A Tune function trainable of a benchmark sweep: one stage-2 run scored on the
    validation split (evals.benchmark.tuning), in this worker process."""
    import ray.tune

    from evals.benchmark.tuning import BenchmarkTrial, run_trial
    from pretrain.runtime import configure_runtime

    configure_runtime(threads=1)  # one CPU per trial: concurrent trials must not fight over cores
    # Each trial is a process group of its own: forget the driver's (inherited through Ray),
    # or concurrent trials would all bind the driver's MASTER_PORT.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    trial_id = ray.tune.get_context().get_trial_id()
    ray.tune.report(run_trial(BenchmarkTrial(**plan["benchmark"]), params, Path(plan["runs_dir"]) / trial_id))
