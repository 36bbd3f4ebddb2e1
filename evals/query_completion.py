"""Does completing the query help search? Cross-modal retrieval with and without the calibrator.

    python -m evals.query_completion runs/demo/export --data data/tuxpaint/test

On a split, with a trained model (a run or an export):
- text -> image: every item with a caption and a picture; the query is the caption alone.
  Without completion it is the caption's embedding (cosine across modalities); with
  completion it is the calibrator's imputation of the picture from the caption.
- image -> text where the audio is missing: the query is the picture alone (its sound,
  and its caption, hidden from the query), against every item's caption; with completion
  the calibrator imputes the caption's embedding from the picture. Also the items whose
  audio really is missing in the data, and, for contrast, the picture with its sound.
Keys are the items' own embeddings. Each row gives n (queries = keys), R@1, R@5, the
median rank, chance, and the paired difference in R@1 (with - without) with a 95%
bootstrap interval over the queries.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.contract import MODALITIES
from data_pipeline.reader import iterate_split
from evals.retrieval import ranks_of_matches
from pretrain.encoder import Encoder

IMAGE, TEXT, AUDIO = (MODALITIES.index(m) for m in ("image", "text", "audio"))


def _paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float, float]:
    """Mean of a - b and its 95% bootstrap interval (queries resampled in pairs)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(draws, diff.size))].mean(1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _encode_split(encoder: Encoder, split: str | Path, batch_size: int = 128) -> list[dict[str, Any]]:
    return list(iterate_split(encoder.cfg.data, split, batch_size))


@torch.no_grad()
def _query_embeddings(encoder: Encoder, batches: list[dict[str, Any]], keep: tuple[int, ...], target: int) -> tuple:
    """(observed embedding of the query's first kept modality, completed target embedding,
    the items' own full embeddings, present mask) over all items."""
    own, completed, direct, present = [], [], [], []
    for batch in batches:
        real = torch.tensor([k != "" for k in batch["key"]])
        full = encoder.encode_batch(batch)
        hidden = batch["present"].clone()
        for j in range(len(MODALITIES)):
            if j not in keep:
                hidden[:, j] = False
        query = encoder.encode_batch({**batch, "present": hidden}, complete=True)
        own.append({m: full.emb[m][real] for m in MODALITIES})
        completed.append(query.emb[MODALITIES[target]][real])
        direct.append(query.emb[MODALITIES[keep[0]]][real])
        present.append(batch["present"][real])
    keys = {m: torch.cat([o[m] for o in own]) for m in MODALITIES}
    return torch.cat(direct), torch.cat(completed), keys, torch.cat(present)


def _row(name: str, rows: torch.Tensor, direct, completed, keys) -> dict[str, Any]:
    rows_idx = rows.nonzero().flatten()
    without = ranks_of_matches(direct[rows_idx], keys[rows_idx]).numpy()
    with_ = ranks_of_matches(completed[rows_idx], keys[rows_idx]).numpy()
    n = int(rows_idx.numel())
    diff = _paired_interval(with_ <= 1, without <= 1) if n > 1 else (float("nan"),) * 3
    stats = lambda r: {"R@1": float((r <= 1).mean()), "R@5": float((r <= 5).mean()), "median": float(np.median(r))}  # noqa: E731
    return {
        "name": name,
        "n": n,
        "chance": 1.0 / max(n, 1),
        "without": stats(without),
        "with": stats(with_),
        "diff": diff,
    }


def query_completion(encoder: Encoder, split: str | Path) -> list[dict[str, Any]]:
    if not encoder.has_calibrator:
        raise ValueError(f"{encoder.source} has no calibrator (calibration.method={encoder.cfg.calibration.method})")
    batches = _encode_split(encoder, split)
    out = []
    direct, completed, keys, present = _query_embeddings(encoder, batches, (TEXT,), IMAGE)
    both = present[:, TEXT] & present[:, IMAGE]
    out.append(_row("text -> image, caption alone", both, direct, completed, keys["image"]))
    direct, completed, keys, present = _query_embeddings(encoder, batches, (IMAGE,), TEXT)
    both = present[:, TEXT] & present[:, IMAGE]
    out.append(_row("image -> text, picture alone (sound hidden)", both, direct, completed, keys["text"]))
    really = both & ~present[:, AUDIO]
    if int(really.sum()) > 1:
        out.append(_row("image -> text, items whose sound is missing", really, direct, completed, keys["text"]))
    direct, completed, keys, present = _query_embeddings(encoder, batches, (IMAGE, AUDIO), TEXT)
    rows = present[:, TEXT] & present[:, IMAGE] & present[:, AUDIO]
    out.append(_row("image -> text, picture with its sound", rows, direct, completed, keys["text"]))
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| query | n | chance R@1 | R@1 without / with completion | R@5 without / with | median rank without / with "
        "| R@1 with - without [95% interval] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["without"], r["with"]
        d, lo, hi = r["diff"]
        lines.append(
            f"| {r['name']} | {r['n']} | {r['chance']:.3f} | {a['R@1']:.3f} / {b['R@1']:.3f} | "
            f"{a['R@5']:.3f} / {b['R@5']:.3f} | {a['median']:.0f} / {b['median']:.0f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run folder or an export")
    parser.add_argument("--data", required=True, help="a split folder (index.json)")
    args = parser.parse_args(argv)
    from pretrain.runtime import configure_runtime

    configure_runtime()
    rows = query_completion(Encoder.load(args.model), args.data)
    print(markdown(rows))
    first = rows[0]
    print(
        f"query completion on {args.data}: text -> image R@1 {first['without']['R@1']:.3f} without, "
        f"{first['with']['R@1']:.3f} with (n {first['n']}, chance {first['chance']:.3f})"
    )


if __name__ == "__main__":
    main()
