"""Why a completed query searches worse than the query itself: the calibrator's state.

    python benchmarks/query_completion_latent.py --model runs/demo/export \\
        --train data/tuxpaint/train --test data/tuxpaint/test

text -> image retrieval on the test items holding both, the query being the caption alone:
its own embedding (cross-modal cosine), the run's calibrator's imputation of the picture,
and the imputation by calibrators fitted exactly (EM to convergence) on the model's final
training-split embeddings at several latent sizes. Also the mean cosine between each query
vector and its own picture (closeness, which R@1 does not reward by itself).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--latents", default="16,32,64,128")
    args = parser.parse_args()
    from pretrain.runtime import configure_runtime

    configure_runtime()
    from data_pipeline.contract import MODALITIES
    from data_pipeline.reader import iterate_split
    from evals.retrieval import ranks_of_matches
    from pretrain.calibration import Calibrator
    from pretrain.encoder import Encoder

    enc = Encoder.load(args.model)

    def embed(split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
        present = []
        for batch in iterate_split(enc.cfg.data, split, 128):
            real = torch.tensor([k != "" for k in batch["key"]])
            out = enc.encode_batch(batch)
            for m in MODALITIES:
                parts[m].append(out.emb[m][real])
            present.append(batch["present"][real])
        return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(present)

    train, train_present = embed(args.train)
    test, test_present = embed(args.test)
    both = test_present[:, 0] & test_present[:, 1]
    image, text = test["image"][both], test["text"][both]
    n = int(both.sum())
    only_text = torch.zeros(n, len(MODALITIES), dtype=torch.bool)
    only_text[:, 1] = True

    def row(name: str, query: torch.Tensor) -> None:
        ranks = ranks_of_matches(query, image)
        r1 = float((ranks <= 1).float().mean())
        cos = float((query * image).sum(1).mean())
        print(f"| {name} | {n} | {1 / n:.3f} | {r1:.3f} | {float(ranks.float().median()):.0f} | {cos:.3f} |")

    print("| query vector | n | chance R@1 | R@1 | median rank | cosine to its own picture |")
    print("|---|---|---|---|---|---|")
    row("the caption's own embedding", text)
    z = {m: test[m][both] for m in MODALITIES}
    assert enc.completion.calibrator is not None, "the model has no calibrator"
    row(
        f"imputed by the run's calibrator (latent {enc.completion.calibrator.latent_dim})",
        enc.completion.calibrator.impute(z, only_text)["image"].float(),
    )
    for k in (int(x) for x in args.latents.split(",")):
        cal = Calibrator(list(MODALITIES), enc.dim, k, decay=1.0, seed=0)
        cal.fit_exact({m: train[m].double() for m in MODALITIES}, train_present, 300)
        row(
            f"imputed by an exact fit on the final training embeddings, latent {k}",
            cal.impute(z, only_text)["image"].float(),
        )


if __name__ == "__main__":
    main()
