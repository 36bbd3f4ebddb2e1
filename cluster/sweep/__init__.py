"""`calmrl sweep SWEEP.yaml`: ablations as a Ray Tune sweep of distributed runs.

Parts: the sweep file and its plan (`config.py`), what runs on the Ray
workers (`worker.py`), starting Ray and the Tune experiment (`tuner.py`), and
the results table and plot (`report.py`). `calmrl sweep` is in `cluster/cli.py`.

Every trial is a real distributed training run: a Tune function trainable
(`cluster.sweep.worker.run_trial`) starts a Ray Train `TorchTrainer` with `workers_per_trial`
workers; each worker runs the calmrl DeepSpeed `Trainer` on the process group
Ray Train created (the trainer's `init_distributed` returns early when
torch.distributed is initialised, and DeepSpeed reuses that group). Workers
report the training loss every `report_every` steps and, at the end, the
validation metrics of the final checkpoint on `eval_split` (retrieval between
every pair of modalities on its complete instances, `evals.evaluate`, computed
by rank 0) together with a `ray.train.Checkpoint` of the run folder (Ray Train
keeps a report's metrics as the run's result only when it carries one).

The sweep file (paths are relative to the current directory, like a config's
`data.shards`):

    base_config: configs/tiny_cpu.yaml   # a calmrl config (load_config)
    out_dir: runs/sweep                  # the sweep folder
    search: grid                         # grid | random
    num_samples: 1                       # random: trials; grid: repeats of the grid
    params:                              # dotted config keys
      calibration.method: [calmrl, observed_only]   # grid axis / random choice
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}      # also {uniform: [a, b]}, {randint: [a, b]}
    overrides: {train.steps: 60}         # fixed for every trial (optional)
    eval_split: data/synthetic/val       # split for validation ("" skips it)
    metric: val/mean_R@1                 # what the table's "best" and the plot use
    mode: max
    workers_per_trial: 2
    use_gpu: false
    cpus_per_worker: 0.5                 # Ray CPUs per worker (0.5 on a small CPU box)
    max_concurrent_trials: 1
    report_every: 1                      # steps between loss reports
    asha: {enabled: false, grace_period: 10, max_t: 0, metric: loss, mode: min, reduction_factor: 2}

ASHA (`asha.enabled`) stops weak trials early on the training loss; its time
is the optimizer step (`grace_period`, `max_t` in steps; `max_t: 0` means
`train.steps`). Validation metrics exist only at a trial's end, so ASHA cannot
use them.

The sweep folder holds `sweep.json` (the resolved plan), `tune/` (Ray Tune's
experiment state), `runs/TRIAL_ID/` (each trial's calmrl run: config, log,
DeepSpeed checkpoints, eval), `train/` (Ray Train's copies of the reported
checkpoints) and, at the end, `results.csv`, `results.md` and `results.png`.

Resuming: when the sweep folder already holds a Tune experiment, `calmrl
sweep` resumes it automatically (`Tuner.restore`: finished trials are kept,
unfinished and errored ones restart, and a restarted trial resumes its calmrl
run from that run's latest checkpoint). `--resume` insists on resuming (an
error if there is nothing to resume); `--no-resume` refuses to touch an
existing experiment. A folder made from a different plan (other params,
search or base config) is never resumed: use a new `out_dir`.

Ray runs on loopback (`127.0.0.1`) on a fresh local instance, or joins the
cluster named by `RAY_ADDRESS` (as under a KubeRay RayJob); then `out_dir`
and every path must be on storage that all nodes share.
"""
