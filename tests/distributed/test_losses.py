"""The all-gathered pairwise InfoNCE equals the single-process loss on the
concatenated global batch, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from pretrain.losses import pairwise_infonce
from tests.helpers import assert_matches_reference, run_distributed

WORLD, B, D = 2, 6, 8


def global_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = {m: F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1) for m in MODALITIES}
    present = torch.rand(WORLD * B, len(MODALITIES), generator=g) > 0.3
    present[present.sum(1) == 0, 0] = True
    present[B:, 2] = False  # rank 1 holds no audio at all
    return emb, present


def naive_loss(emb, present, scale):
    """Direct per-row computation, no masking tricks."""
    terms = []
    for i in range(len(MODALITIES)):
        for j in range(i + 1, len(MODALITIES)):
            rows = (present[:, i] & present[:, j]).nonzero().flatten().tolist()
            if not rows:
                continue
            total = torch.zeros(())
            for qi, ki in ((i, j), (j, i)):
                q, k = emb[MODALITIES[qi]], emb[MODALITIES[ki]]
                cols = present[:, ki].nonzero().flatten().tolist()
                for r in rows:
                    logits = torch.stack([scale * q[r] @ k[c] for c in cols])
                    total = total - torch.log_softmax(logits, 0)[cols.index(r)]
            terms.append(0.5 * total / len(rows))
    return sum(terms) / len(terms)


def test_single_process_matches_naive():
    emb, present = global_batch()
    emb = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
    scale = torch.tensor([10.0], requires_grad=True)
    out = pairwise_infonce(emb, present, scale, MODALITIES)
    ref = naive_loss(emb, present, scale[0])
    assert_matches_reference(out, ref, [*emb.values(), scale], grad_atol=1e-5)


def test_absent_rows_do_not_enter_the_loss():
    emb, present = global_batch()
    scale = torch.tensor([10.0])
    base = pairwise_infonce(emb, present, scale, MODALITIES)["loss"]
    emb["audio"][~present[:, 2]] = 123.0  # garbage where audio is absent
    assert torch.allclose(pairwise_infonce(emb, present, scale, MODALITIES)["loss"], base)


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_pair_held_only_by_imputed_rows_is_their_mean_loss(chunk):
    """A pair's term is the weighted mean of its rows' losses: with every row of the
    pair imputed on one side, `imputed_pair_weight` cancels out, however small the
    total weight (0.3 x 2 rows = 0.6 here)."""
    emb, _ = global_batch()
    n = WORLD * B
    observed = torch.zeros(n, len(MODALITIES), dtype=torch.bool)
    observed[:2, 0] = True  # two rows observe the image only...
    observed[2:, 2] = True  # ...the rest the audio only
    available = observed.clone()
    available[:2, 1] = True  # the two image rows get an imputed text
    scale = torch.tensor([10.0])
    terms = [
        pairwise_infonce(
            emb, observed, scale, MODALITIES, available=available, imputed_pair_weight=w, column_chunk=chunk
        )["loss/image-text"]
        for w in (0.3, 1.0)
    ]
    assert torch.allclose(terms[0], terms[1], atol=1e-6), terms


def _rank_loss(rank: int, world: int):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    emb, present = global_batch()
    local = {m: e[rank * B : (rank + 1) * B].clone().requires_grad_(True) for m, e in emb.items()}
    scale = torch.tensor([10.0], requires_grad=True)
    out = pairwise_infonce(local, present[rank * B : (rank + 1) * B], scale, MODALITIES)
    out["loss"].backward()
    result = {
        "loss": out["loss"].detach(),
        "loss_value": out["loss_value"],
        "grads": {m: e.grad for m, e in local.items()},
        "scale_grad": scale.grad,
    }
    dist.destroy_process_group()
    return result


@pytest.mark.timeout(180)
def test_gathered_loss_equals_single_process(tmp_path):
    results = run_distributed(_rank_loss, WORLD, tmp_path, timeout=150)
    emb, present = global_batch()
    emb = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
    scale = torch.tensor([10.0], requires_grad=True)
    ref = pairwise_infonce(emb, present, scale, MODALITIES)
    ref["loss"].backward()
    # The mean of the per-rank losses is the global loss; so is each rank's logged value.
    mean_loss = sum(r["loss"] for r in results) / WORLD
    assert torch.allclose(mean_loss, ref["loss"].detach(), atol=1e-5)
    for r in results:
        assert torch.allclose(r["loss_value"], ref["loss_value"], atol=1e-5)
    # Rank-averaged gradients (what DeepSpeed applies) equal the global gradients:
    # each rank's rows get the full gradient of the global loss, scaled by world.
    for m in MODALITIES:
        stacked = torch.cat([r["grads"][m] for r in results]) / WORLD
        grad = emb[m].grad
        assert grad is not None and torch.allclose(stacked, grad, atol=1e-5), m
    mean_scale_grad = sum(r["scale_grad"] for r in results) / WORLD
    assert scale.grad is not None and torch.allclose(mean_scale_grad, scale.grad, atol=1e-5)
