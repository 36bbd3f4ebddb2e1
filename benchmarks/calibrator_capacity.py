"""How the calibrator's latent size decides what it can impute, on a finished benchmark run.

Takes one stage-2 run of `calmrl benchmark` (its model, its stage-1 features
and the entries its seed hid), fits a fresh calibrator exactly (EM to
convergence) on the run's final training features for each latent size, and
prints on the complete instances of a split (validation by default, never
used for scoring):
- the mean log-likelihood of the exact fit on that split (held out);
- per single-observed pattern, the cosine of each imputed modality to the true one,
  beside a least-squares regression from the observed modality fitted on the
  complete training rows (what a linear predictor reaches);
- the anchor shift per missing pattern, local / calibrated (docs/method.md).

    python benchmarks/calibrator_capacity.py RUN_DIR [--split val] [--latent 8,16,32,48] [--stage1 DIR]

docs/benchmark.md ("Why the latent size is fixed") shows its output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from data_pipeline.missing import impose_missing
from evals.benchmark.memory import MemorySplit, embed_memory
from pretrain.anchor_shift import anchor_shift
from pretrain.calibration import Calibrator
from pretrain.run_dir import RunDir


def _single_pattern(n: int, observed: int) -> torch.Tensor:
    present = torch.zeros(n, len(MODALITIES), dtype=torch.bool)
    present[:, observed] = True
    return present


def imputation_cosines(cal: Calibrator, emb: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{observed: {hidden: mean cosine of the imputation to the truth}} for single-observed patterns."""
    n = len(emb[MODALITIES[0]])
    out: dict[str, dict[str, float]] = {}
    for j, observed in enumerate(MODALITIES):
        filled = cal.impute(emb, _single_pattern(n, j))
        out[observed] = {
            m: float(F.cosine_similarity(filled[m].float(), emb[m]).mean()) for m in MODALITIES if m != observed
        }
    return out


def regression_cosines(
    train: dict[str, torch.Tensor], evaluation: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """The same cosines for a least-squares linear map (with bias) from the observed modality."""
    out: dict[str, dict[str, float]] = {}
    for observed in MODALITIES:
        x = F.pad(train[observed].double(), (0, 1), value=1.0)
        x_eval = F.pad(evaluation[observed].double(), (0, 1), value=1.0)
        out[observed] = {}
        for m in MODALITIES:
            if m != observed:
                weights = torch.linalg.lstsq(x, train[m].double()).solution
                out[observed][m] = float(F.cosine_similarity((x_eval @ weights).float(), evaluation[m]).mean())
    return out


def _fmt(cosines: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{o}->" + ",".join(f"{m} {v:.3f}" for m, v in row.items()) for o, row in cosines.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a stage-2 run of calmrl benchmark (OUT/runs/DATASET/OBJ-METHOD-rR-sS)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--latent", default="8,16,32,48", help="comma-separated latent sizes")
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--stage1", default=None, help="the stage-1 run (default: the run's train.init_from)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    run = RunDir(args.run_dir)
    cfg, model, _ = run.load_model("latest")
    model.eval()
    stage1 = Path(args.stage1 or cfg.train.init_from.split(":")[0])
    if not (stage1 / "features.pt").is_file():
        raise SystemExit(f"{args.run_dir}: its stage-1 run {stage1} has no features.pt; is this a benchmark run?")
    saved = torch.load(stage1 / "features.pt", weights_only=False)
    splits = {name: MemorySplit(**value) for name, value in saved.items()}
    train, evaluation = splits["train"], splits[args.split]
    present = impose_missing(
        train.keys, train.present, cfg.data.extra_missing, cfg.data.extra_missing_seed, cfg.data.extra_missing_mode
    )
    device = torch.device("cpu")
    train_emb = embed_memory(model, train, device)
    eval_emb = embed_memory(model, evaluation, device)
    complete = evaluation.present.all(1)
    eval_complete = {m: eval_emb[m][complete].float() for m in MODALITIES}
    train_complete = {m: train_emb[m][present.all(1)].float() for m in MODALITIES}
    dim = eval_complete[MODALITIES[0]].shape[1]
    print(
        f"{args.run_dir}: exact calibrator fits on {len(train)} training rows "
        f"(missing {cfg.data.extra_missing:g}, {cfg.data.extra_missing_mode}), "
        f"scored on {int(complete.sum())} complete {args.split} instances"
    )
    print(f"linear regression from one modality: {_fmt(regression_cosines(train_complete, eval_complete))}")
    best: tuple[float, int] | None = None
    for k in (int(v) for v in args.latent.split(",")):
        cal = Calibrator(list(MODALITIES), dim, k)
        history = cal.fit_exact({m: train_emb[m].double() for m in MODALITIES}, present, max_iters=args.max_iters)
        held_out = cal.log_likelihood(eval_complete, torch.ones(len(eval_complete["text"]), 3, dtype=torch.bool))
        shift = anchor_shift(eval_complete, cal, MODALITIES)
        worse = [p for p, v in shift.items() if v["calibrated"] >= v["observed_only"]]
        print(
            f"latent {k:3d}: {len(history)} EM iterations, held-out log-likelihood {held_out:.2f}\n"
            f"  imputation cosine  {_fmt(imputation_cosines(cal, eval_complete))}\n"
            "  anchor shift local/calibrated  "
            + "  ".join(f"{p} {v['observed_only']:.3f}/{v['calibrated']:.3f}" for p, v in shift.items())
        )
        if best is None or held_out > best[0]:
            best = (held_out, k)
        print(f"  patterns where calibration does not lower the shift: {', '.join(worse) or 'none'}")
    assert best is not None
    print(f"calibrator capacity: best held-out log-likelihood at latent {best[1]} ({best[0]:.2f})")


if __name__ == "__main__":
    main()
