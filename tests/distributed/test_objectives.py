"""GRAM and PMRL objectives: the all-gathered loss equals the single-process
loss on the concatenated batch (value and gradients), the vectorised code
matches a naive per-sample reference, garbage in unavailable rows does not
leak, gradients stay finite on degenerate tuples, and alignment lowers the loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.contract import MODALITIES
from pretrain.config import LossConfig
from pretrain.losses import _SymmetricEig, create_objective, gram_volume, pairwise_infonce, pmrl
from tests.helpers import assert_matches_reference, run_distributed

OBJECTIVES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "pairwise": pairwise_infonce,
    "gram": gram_volume,
    "pmrl": pmrl,
}

WORLD, B, D = 2, 6, 8
SCALE = 10.0
# (objective, scenario, column_chunk): chunked cases must equal the unchunked single process too
CASES = [(obj, scenario, 0) for obj in ("gram", "pmrl") for scenario in ("no_audio_on_rank1", "no_text_on_rank1")]
CASES += [(obj, "no_audio_on_rank1", 5) for obj in ("pairwise", "gram", "pmrl")]


def global_batch(seed: int = 0, scenario: str = "no_audio_on_rank1"):
    """Embeddings [WORLD*B, D] per modality, `available` and a smaller `observed`."""
    g = torch.Generator().manual_seed(seed)
    emb = {m: F.normalize(torch.randn(WORLD * B, D, generator=g), dim=-1) for m in MODALITIES}
    available = torch.rand(WORLD * B, len(MODALITIES), generator=g) > 0.3
    if scenario == "no_audio_on_rank1":
        available[B:, 2] = False  # rank 1 holds no audio at all
    elif scenario == "no_text_on_rank1":
        available[B:, 1] = False  # rank 1 holds no anchor: no GRAM rows there
    available[available.sum(1) == 0, 0] = True
    # Some available vectors count as imputed: `observed` is a non-empty subset.
    first = available.float().argmax(1)
    observed = available & (torch.rand(available.shape, generator=g) > 0.4)
    observed[torch.arange(WORLD * B), first] = True
    return emb, observed, available


def _torch_threads():
    torch.set_num_threads(1)


# -- naive per-sample references ---------------------------------------------


def naive_gram(emb, available, scale, anchor="text", eps=1e-6, label_smoothing=0.0):
    mods = list(MODALITIES)
    a = mods.index(anchor)
    others = [m for m in range(len(mods)) if m != a]
    n = available.shape[0]

    def vol(anchor_vec, j):
        vecs = [anchor_vec] + [emb[mods[m]][j] for m in others if available[j, m]]
        z = torch.stack(vecs)
        return torch.det(z @ z.T).clamp_min(eps).sqrt()

    rows = [i for i in range(n) if available[i, a] and any(available[i, m] for m in others)]
    data_cols = [j for j in range(n) if any(available[j, m] for m in others)]
    anchor_cols = [j for j in range(n) if available[j, a]]

    def ce(logits, target):  # torch's label smoothing, over the candidates
        return F.cross_entropy(logits[None], torch.tensor([target]), label_smoothing=label_smoothing)

    ad = da = torch.zeros(())
    for i in rows:
        logits = torch.stack([-scale * vol(emb[anchor][i], j) for j in data_cols])
        ad = ad + ce(logits, data_cols.index(i))
        logits = torch.stack([-scale * vol(emb[anchor][j], i) for j in anchor_cols])
        da = da + ce(logits, anchor_cols.index(i))
    return 0.5 * (ad + da) / len(rows)


def naive_pmrl(emb, available, scale, tau1=0.1, tau2=0.0):
    mods = list(MODALITIES)
    n = available.shape[0]
    us, sv_terms = {}, []
    for i in range(n):
        cols = [emb[mods[m]][i] for m in range(len(mods)) if available[i, m]]
        if not cols:
            continue
        z = torch.stack(cols, 1)  # [D, k]
        u_mat, s, _ = torch.linalg.svd(z, full_matrices=False)
        u = u_mat[:, 0]
        along = u @ z.mean(1) if abs(u @ z.mean(1)) > 1e-3 else u @ z[:, 0]  # tie -> first column
        us[i] = -u if along < 0 else u
        if len(cols) >= 2:
            sv_terms.append(-torch.log_softmax(s / tau1, 0)[0])
    rows = sorted(us)
    inverse_tau2 = scale if tau2 <= 0 else 1.0 / tau2
    sim = torch.stack([torch.stack([inverse_tau2 * us[i] @ us[j] for j in rows]) for i in rows])
    targets = torch.arange(len(rows))
    instance = 0.5 * (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets))
    sv = torch.stack(sv_terms).mean() if sv_terms else 0.0
    return sv + instance


NAIVE: dict[str, Callable[..., torch.Tensor]] = {"gram": naive_gram, "pmrl": naive_pmrl}


# -- distributed == single process ------------------------------------------


def _rank_losses(rank: int, world: int, cases):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for obj, scenario, chunk in cases:
        emb, observed, available = global_batch(scenario=scenario)
        rows = slice(rank * B, (rank + 1) * B)
        local = {m: e[rows].clone().requires_grad_(True) for m, e in emb.items()}
        scale = torch.tensor([SCALE], requires_grad=True)
        out = OBJECTIVES[obj](local, observed[rows], scale, MODALITIES, available=available[rows], column_chunk=chunk)
        out["loss"].backward()
        results.append(
            {
                "loss": out["loss"].detach(),
                "values": {k: v for k, v in out.items() if k != "loss"},
                "grads": {m: e.grad for m, e in local.items()},
                "scale_grad": scale.grad,
            }
        )
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """All cases in one 2-rank gloo run (spawning is the slow part)."""
    results = run_distributed(_rank_losses, WORLD, tmp_path_factory.mktemp("dist"), CASES, timeout=150)
    return {case: [r[k] for r in results] for k, case in enumerate(CASES)}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CASES, ids=[f"{o}-{s}-chunk{c}" for o, s, c in CASES])
def test_gathered_loss_equals_single_process(distributed_results, case):
    obj, scenario, _ = case
    results = distributed_results[case]
    emb, observed, available = global_batch(scenario=scenario)
    emb = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
    scale = torch.tensor([SCALE], requires_grad=True)
    ref = OBJECTIVES[obj](emb, observed, scale, MODALITIES, available=available)
    ref["loss"].backward()
    if scenario == "no_text_on_rank1" and obj == "gram":
        # The case is meant to hold a rank without rows; it still must agree.
        assert not available[B:, 1].any()
    mean_loss = sum(r["loss"] for r in results) / WORLD
    assert torch.allclose(mean_loss, ref["loss"].detach(), atol=1e-5)
    for r in results:
        assert r["values"].keys() == {k for k in ref if k != "loss"}
        for k, v in r["values"].items():  # global values, identical on every rank
            assert torch.allclose(v, ref[k], atol=1e-5), k
    for m in MODALITIES:
        # Every rank gives every embedding a gradient (ZeRO), rows included it holds no data for.
        assert all(r["grads"][m] is not None for r in results), m
        stacked = torch.cat([r["grads"][m] for r in results]) / WORLD
        assert torch.allclose(stacked, _grad(emb[m]), atol=1e-5), m
    mean_scale_grad = sum(r["scale_grad"] for r in results) / WORLD
    assert torch.allclose(mean_scale_grad, _grad(scale), atol=1e-5)


# -- single process against the naive reference -----------------------------


@pytest.mark.parametrize(
    "obj,kwargs",
    [
        ("gram", {}),
        ("gram", {"anchor": "image"}),
        ("gram", {"label_smoothing": 0.1}),
        ("pmrl", {}),
        ("pmrl", {"tau1": 0.5}),
        ("pmrl", {"tau2": 0.1}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_reference(obj, kwargs, seed):
    _torch_threads()
    emb, observed, available = global_batch(seed)
    emb = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
    scale = torch.tensor([SCALE], requires_grad=True)
    out = OBJECTIVES[obj](emb, observed, scale, MODALITIES, available=available, **kwargs)
    ref = NAIVE[obj](emb, available, scale[0], **kwargs)
    # Random data has no degenerate tuples, so the gradients agree as well.
    assert_matches_reference(out, ref, [*emb.values(), scale], grad_atol=1e-4)


def test_only_availability_matters():
    """Observed and imputed vectors enter alike; `available` defaults to `observed`."""
    emb, observed, available = global_batch(2)
    scale = torch.tensor([SCALE])
    for fn in (gram_volume, pmrl):
        a = fn(emb, observed, scale, MODALITIES, available=available)["loss"]
        b = fn(emb, available, scale, MODALITIES)["loss"]
        c = fn(emb, observed, scale, MODALITIES)["loss"]
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_unknown_anchor_is_rejected():
    emb, observed, _ = global_batch()
    with pytest.raises(ValueError, match="anchor"):
        gram_volume(emb, observed, torch.tensor([SCALE]), MODALITIES, anchor="video")


def test_create_objective_binds_exactly_its_options():
    emb, observed, available = global_batch(3)
    scale = torch.tensor([SCALE])
    cases: list[tuple[LossConfig, Callable[..., dict[str, torch.Tensor]], dict[str, Any]]] = [
        (LossConfig(objective="gram", gram_anchor="image"), gram_volume, {"anchor": "image"}),
        (LossConfig(objective="pmrl", pmrl_tau1=0.5), pmrl, {"tau1": 0.5}),
        (LossConfig(objective="pairwise", imputed_pair_weight=0.3), pairwise_infonce, {"imputed_pair_weight": 0.3}),
    ]
    for cfg, fn, kwargs in cases:
        built = create_objective(cfg)
        got = built(emb, observed, scale, MODALITIES, available=available)["loss"]
        assert torch.equal(got, fn(emb, observed, scale, MODALITIES, available=available, **kwargs)["loss"])
    with pytest.raises(TypeError):  # an option of another objective is not swallowed
        gram_volume(emb, observed, scale, MODALITIES, tau1=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="objective"):
        create_objective(LossConfig(objective="clip"))


# -- garbage in unavailable rows ----------------------------------------------


@pytest.mark.parametrize("fill", [123.0, float("nan")])
@pytest.mark.parametrize("obj", ["gram", "pmrl"])
def test_unavailable_rows_do_not_leak(obj, fill):
    emb, observed, available = global_batch(3)
    scale = torch.tensor([SCALE], requires_grad=True)

    def run(values):
        values = {m: e.clone().requires_grad_(True) for m, e in values.items()}
        out = OBJECTIVES[obj](values, observed, scale, MODALITIES, available=available)
        grads = torch.autograd.grad(out["loss"], [*values.values(), scale])
        return out, grads

    base, base_grads = run(emb)
    dirty = {m: e.clone() for m, e in emb.items()}
    for k, m in enumerate(MODALITIES):
        dirty[m][~available[:, k]] = fill
    out, grads = run(dirty)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_value"])
    assert torch.allclose(out["loss"], base["loss"], atol=1e-6)
    assert torch.allclose(out["loss_value"], base["loss_value"], atol=1e-6)
    for g, g0 in zip(grads, base_grads):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, g0, atol=1e-6)
    for k, m in enumerate(MODALITIES):
        assert (grads[k][~available[:, k]] == 0).all(), m


# -- degenerate tuples ----------------------------------------------------------


def degenerate_batch():
    """Identical, exactly orthogonal and repeated vectors inside instances."""
    emb, observed, available = global_batch(4)
    emb = {m: e.clone() for m, e in emb.items()}
    image, text, audio = (emb[m] for m in MODALITIES)
    available[:4] = True
    image[0] = text[0]  # two identical vectors (+ a random third)
    image[1] = text[1]  # three identical vectors: l = (sqrt 3, 0, 0), a tied pair of zeros
    audio[1] = text[1]
    image[2] = torch.eye(D)[0]  # exactly orthogonal pair: l_1 = l_2 (a tie of the leading pair)
    text[2] = torch.eye(D)[1]
    available[2, 2] = False
    image[3] = audio[3]  # identical pair with the anchor missing
    available[3, 1] = False
    image[4] = text[4]  # identical pair, nothing else
    available[4] = torch.tensor([True, True, False])
    observed = observed & available
    observed[available.float().argmax(1).unsqueeze(1) == torch.arange(3)] = True
    return emb, observed & available, available


@pytest.mark.parametrize("obj", ["gram", "pmrl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_on_degenerate_tuples(obj, dtype):
    emb, observed, available = degenerate_batch()
    emb = {m: e.to(dtype).requires_grad_(True) for m, e in emb.items()}
    scale = torch.tensor([SCALE], dtype=dtype, requires_grad=True)
    out = OBJECTIVES[obj](emb, observed, scale, MODALITIES, available=available)
    assert torch.isfinite(out["loss"])
    grads = torch.autograd.grad(out["loss"], [*emb.values(), scale])
    for g in grads:
        assert torch.isfinite(g).all()
    # The value is still the naive one where the reference is well defined
    # (a tie of the two leading singular values leaves u undefined: skip row 2 there).
    if obj == "gram":
        ref = naive_gram(emb, available, scale[0]).detach()
        assert math.isclose(float(out["loss"].detach()), float(ref), abs_tol=1e-4)


def test_symmetric_eig_backward_is_finite_on_exact_ties():
    """Why `_SymmetricEig` exists: PyTorch's eigh backward divides by eigenvalue
    gaps (0/0 = NaN for a tie, even between eigenvectors the loss ignores)."""
    a = torch.diag(torch.tensor([1.0, 1.0, 3.0])).requires_grad_(True)
    lam, vec = _SymmetricEig.apply(a, 1e-8)
    (vec[:, -1].sum() + lam.sum()).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    # Away from the tie the broadening changes nothing: d lam / dA = I here, and the
    # leading-vector part couples e3 with e1, e2 by 1/(3 - 1).
    v3 = vec[:, -1].detach()
    off = ~torch.eye(3, dtype=torch.bool)
    coupling = torch.zeros(3, 3)
    coupling[:2, 2] = coupling[2, :2] = 0.5 * v3[2] / 2.0  # the tied pair (e1, e2) is not coupled
    assert torch.allclose(a.grad[off], coupling[off], atol=1e-6)
    assert torch.allclose(a.grad.diagonal(), torch.ones(3), atol=1e-6)


def test_pmrl_sign_rule():
    """u . mean(columns) > 0; when that is 0 (two unit vectors with a negative
    cosine), u . first available column >= 0."""
    g = torch.Generator().manual_seed(8)
    z1, z2 = F.normalize(torch.randn(2, D, generator=g), dim=-1)
    z2 = F.normalize(z2 - 2 * (z1 @ z2).abs() * z1 - 0.5 * z1, dim=0)  # negative cosine
    assert z1 @ z2 < 0
    from pretrain.losses import _leading_directions

    for first, second in ((z1, z2), (z2, z1)):
        x = torch.stack([first, second, torch.zeros(D)]).unsqueeze(0)
        u, _ = _leading_directions(x, torch.tensor([[True, True, False]]), 0.1, 1e-8, 1e-6, 1e-3)
        assert u[0] @ first > 0.1
    x = torch.stack([z1, -z2, z1 + z2]).unsqueeze(0)
    u, _ = _leading_directions(x, torch.tensor([[True, True, True]]), 0.1, 1e-8, 1e-6, 1e-3)
    assert u[0] @ x[0].mean(0) > 1e-3


@pytest.mark.parametrize("obj", ["gram", "pmrl"])
def test_bf16_embeddings(obj):
    """bf16 embeddings (train.precision=bf16) are upcast for det / eigh."""
    emb, observed, available = global_batch(9)
    scale = torch.tensor([SCALE])
    full = OBJECTIVES[obj](emb, observed, scale, MODALITIES, available=available)["loss"]
    half = {m: e.bfloat16().requires_grad_(True) for m, e in emb.items()}
    out = OBJECTIVES[obj](half, observed, scale, MODALITIES, available=available)["loss"]
    out.backward()
    assert abs(float(out.detach()) - float(full)) < 0.05
    assert all(e.grad is not None and torch.isfinite(e.grad.float()).all() for e in half.values())


def test_symmetric_eig_gradient_matches_exact():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 3, D, dtype=torch.float64, generator=g)
    a = (z @ z.mT).requires_grad_(True)
    w = torch.randn(4, 3, dtype=torch.float64, generator=g)

    def f(eig):
        lam, vec = eig(a)
        lead = vec[..., -1]
        return (lam * w).sum() + (torch.einsum("bi,bj->bij", lead, lead) * a.detach()).sum()

    ours = torch.autograd.grad(f(lambda m: _SymmetricEig.apply(m, 1e-12)), a)[0]
    exact = torch.autograd.grad(f(torch.linalg.eigh), a)[0]
    assert torch.allclose(ours, exact, atol=1e-8)


# -- sanity -----------------------------------------------------------------


@pytest.mark.parametrize("obj", ["gram", "pmrl"])
def test_aligned_embeddings_have_lower_loss(obj):
    emb, observed, available = global_batch(6)
    scale = torch.tensor([SCALE])
    shared = F.normalize(torch.randn(WORLD * B, D, generator=torch.Generator().manual_seed(7)), dim=-1)
    aligned = {m: shared.clone() for m in MODALITIES}
    random_loss = OBJECTIVES[obj](emb, observed, scale, MODALITIES, available=available)["loss"]
    aligned_loss = OBJECTIVES[obj](aligned, observed, scale, MODALITIES, available=available)["loss"]
    assert torch.isfinite(aligned_loss)
    assert aligned_loss < random_loss - 0.1


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None, "no gradient reached this tensor"
    return t.grad


def test_gram_without_negative_gradients_trains_only_each_direction_s_queries():
    """GRAM's reference gathers columns without gradient: the value is the same,
    and the anchor-to-data direction moves only the anchors, data-to-anchor only the data."""
    emb, observed, _ = global_batch(4)
    complete = torch.ones_like(observed)
    scale = torch.tensor([SCALE])
    leaves = {m: e.clone().requires_grad_(True) for m, e in emb.items()}
    with_grad = gram_volume(leaves, complete, scale, MODALITIES)
    without = gram_volume(leaves, complete, scale, MODALITIES, negatives_grad=False)
    assert torch.allclose(with_grad["loss_value"], without["loss_value"])
    g_with = torch.autograd.grad(with_grad["loss"], list(leaves.values()))
    g_without = torch.autograd.grad(without["loss"], list(leaves.values()))
    assert all(torch.isfinite(g).all() for g in g_without)
    assert not any(torch.allclose(a, b) for a, b in zip(g_with, g_without))  # the columns' share is gone
    t2d = gram_volume(leaves, complete, scale, MODALITIES, negatives_grad=False)["loss/text->data"]
    d2t = gram_volume(leaves, complete, scale, MODALITIES, negatives_grad=False)["loss/data->text"]
    assert torch.isfinite(t2d) and torch.isfinite(d2t)


def test_pmrl_sign_fix_off_keeps_the_solver_sign():
    """Without the sign rule the value can differ only through the instance term's signs."""
    emb, observed, available = global_batch(5)
    scale = torch.tensor([SCALE])
    fixed = pmrl(emb, observed, scale, MODALITIES, available=available, sign_fix=True)
    free = pmrl(emb, observed, scale, MODALITIES, available=available, sign_fix=False)
    assert torch.allclose(fixed["loss/singular_values"], free["loss/singular_values"])
    assert torch.isfinite(free["loss/instance"])


def test_joint_with_pairwise_adds_the_observed_pairwise_term():
    emb, observed, available = global_batch(6)
    scale = torch.tensor([SCALE])
    cfg = LossConfig(objective="gram", pairwise_weight=0.5, joint_weight=2.0)
    out = create_objective(cfg)(emb, observed, scale, MODALITIES, available=available)
    joint = gram_volume(emb, observed, scale, MODALITIES, available=available)
    pair = pairwise_infonce(emb, observed, scale, MODALITIES)  # imputed vectors do not enter it
    assert torch.allclose(out["loss"], 2.0 * joint["loss"] + 0.5 * pair["loss"])
    assert torch.allclose(out["loss_value"], 2.0 * joint["loss_value"] + 0.5 * pair["loss_value"])
    assert torch.equal(out["loss/joint/text->data"], joint["loss/text->data"])
    assert torch.equal(out["loss/pairwise/image-text"], pair["loss/image-text"])
