"""`calmrl benchmark`: the missing-modality benchmark.

Five methods with the same encoders, steps and seeds:
  oracle           observed-only alignment on the complete training tuples,
                   with no extra missing entries (the upper reference);
  drop_incomplete  only complete tuples align;
  observed_only    align what is present (local anchors);
  mean_fill        missing vectors = the running mean of their modality;
  calmrl           missing vectors imputed by the calibrator (docs/method.md).
Each non-oracle method trains at every extra missing rate, imposed on the
training split by `data_pipeline.missing` (the same entries hidden for every
method at a given seed), and every run is evaluated on the complete test
instances: retrieval R@1 for all six ordered modality pairs, anchor shift
per missing pattern (without and, for CalMRL, with calibration) and
imputation error (CalMRL against mean- and random-fill).

How a run is made: each data set's train and test splits are read once,
through the real shard reader, into memory. Towers marked `freeze: true` in
the data set's config (the pretrained image and text towers of the Tux Paint
preset) are run once over those splits and their outputs cached on disk
(`~/.cache/calmrl/benchmark`, named by content); the runs then train
`features` towers (LayerNorm + `depth` GELU layers of `width`, taken from the
frozen tower's config) on the cached outputs: what training beside a frozen
tower computes, at a fraction of the cost. Every run is a real DeepSpeed
`Trainer` fed in-memory batches. Finished runs keep their `result.json`;
running the same command again skips them (resume).

Parts: data sets and presets (`presets.py`), splits in memory and the
feature cache (`memory.py`), planning, training and evaluating runs
(`runs.py`), aggregation over seeds (`aggregate.py`) and the report
(`report.py`); `calmrl benchmark` is in `cluster/cli.py`.

Outputs in OUT: benchmark.json (every run and the summary), benchmark.csv
(one row per run), benchmark.md (the tables) and benchmark.png (R@1 against
the missing rate, one panel per data set).
"""
