"""Alignment objectives over embeddings with negatives gathered from all ranks.

Convention shared by every objective here: each rank returns a partial
`loss` such that the mean of `loss` over ranks equals the objective on the
concatenated global batch, and so does the rank-averaged gradient (the
average DeepSpeed and DDP apply). Each rank scores only its own rows against
all gathered columns. Logged `terms` are already global values.
"""

from __future__ import annotations

from functools import partial
from itertools import combinations, permutations
from typing import Protocol

import torch
import torch.nn.functional as F

from pretrain.chunked_ce import masked_ce
from pretrain.config import LossConfig
from pretrain.distributed import PROCESS_GROUP, GlobalBatch


def _dot_logits(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, columns: slice) -> torch.Tensor:
    """InfoNCE logits: scale * q . k for every (row, column) pair, [P, C]."""
    return scale * queries @ keys.T


def _term_outputs(
    names: list[str], global_terms: torch.Tensor, active: torch.Tensor, loss: torch.Tensor, loss_value: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The objectives' return value: "loss", "loss_value", then per term "loss/<name>"
    (0 where inactive) and "active/<name>" (whether any sample of the global batch
    had it). Every term is always returned, as device tensors: which are active is
    read on the host only when the trainer logs (no host sync in the step)."""
    out: dict[str, torch.Tensor] = {"loss": loss, "loss_value": loss_value.float()}
    for k, name in enumerate(names):
        out[f"loss/{name}"] = global_terms[k].float()
        out[f"active/{name}"] = active[k]
    return out


def pairwise_infonce(
    emb: dict[str, torch.Tensor],
    observed: torch.Tensor,
    logit_scale: torch.Tensor,
    modalities: tuple[str, ...] | list[str],
    *,
    available: torch.Tensor | None = None,
    imputed_pair_weight: float = 1.0,
    column_chunk: int = 0,
    global_batch: GlobalBatch = PROCESS_GROUP,
) -> dict[str, torch.Tensor]:
    """Mean over modality pairs of symmetric InfoNCE on (possibly completed) tuples.

    `observed` [B, M] marks encoded modalities; `available` [B, M] (default:
    `observed`) also marks imputed ones. For a pair (a, b) a sample is a
    positive row when both sides are available and at least one is observed
    (a pair of two imputed vectors is skipped); a row with one imputed side
    has weight `imputed_pair_weight`. Every sample with b available, on any
    rank, is a candidate column for an a-query, and vice versa. A pair no
    sample of the global batch holds is left out of the mean (every rank
    agrees: the counts are all-reduced; the choice is made on the device, by
    masks, with no host sync). A pair's term is the weighted mean of its rows'
    losses. `column_chunk` > 0 computes the logits that many columns at a time
    (pretrain/chunked_ce.py).

    Returns {"loss": partial loss for backward, "loss_value": the global loss,
    "loss/a-b": global term values, "active/a-b": whether the pair was present}.
    """
    available = observed if available is None else available
    world, batch = global_batch.world(), observed.shape[0]
    offset = global_batch.rank() * batch
    gathered = {m: global_batch.gather(emb[m]) for m in modalities}
    gathered_available = global_batch.gather_nograd(available.to(torch.uint8)).bool()
    pairs = list(combinations(range(len(modalities)), 2))
    row_weights = []
    for i, j in pairs:
        both = available[:, i] & available[:, j] & (observed[:, i] | observed[:, j])
        full = observed[:, i] & observed[:, j]
        w = torch.where(full, 1.0, imputed_pair_weight) * both
        row_weights.append(w.to(torch.float64))
    totals = global_batch.sum(torch.stack([w.sum() for w in row_weights]))
    active = totals > 0
    n_active = active.sum().clamp_min(1)

    # Zero-weight use of every embedding keeps every tower in the backward
    # graph on every rank (ZeRO stages 2 and 3 reduce gradients per parameter).
    loss = _zero_in_graph(emb, logit_scale)
    partial_terms = []
    for k, (i, j) in enumerate(pairs):
        a, b = modalities[i], modalities[j]
        weights = row_weights[k].to(emb[a].dtype)
        ab = masked_ce(
            _dot_logits, emb[a], gathered[b], logit_scale, gathered_available[:, j], offset, chunk=column_chunk
        )
        ba = masked_ce(
            _dot_logits, emb[b], gathered[a], logit_scale, gathered_available[:, i], offset, chunk=column_chunk
        )
        # rows that are no positive hold inf/nan: selected away, never multiplied
        weighted = torch.where(weights > 0, (ab + ba) * weights, 0.0)
        # totals are sums of weights (imputed pairs weigh < 1): guard only the 0/0 of an absent pair
        term = 0.5 * weighted.sum() / torch.where(totals[k] > 0, totals[k], 1.0).to(ab.dtype)
        partial_terms.append(term.detach().double())
        loss = loss + term * (world / n_active.to(term.dtype))
    global_terms = global_batch.sum(torch.stack(partial_terms))
    names = [f"{modalities[i]}-{modalities[j]}" for i, j in pairs]
    return _term_outputs(names, global_terms, active, loss, global_terms.sum() / n_active)


# --------------------------------------------------------------------------
# Shared helpers of the joint (all-modality) objectives: GRAM and PMRL.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Determinants and eigendecompositions run in fp32 at least (bf16/fp16 are too coarse)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _stack_available(
    emb: dict[str, torch.Tensor], available: torch.Tensor, modalities: tuple[str, ...] | list[str]
) -> torch.Tensor:
    """[B, M, D] embeddings with unavailable slots set to exact zeros.

    `torch.where` (not a product with the mask) so that garbage, inf or NaN in
    unavailable rows can neither leak into the values nor into the gradients.
    """
    dtype = _compute_dtype(emb[modalities[0]].dtype)
    x = torch.stack([emb[m].to(dtype) for m in modalities], 1)
    return torch.where(available.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))


def _zero_in_graph(emb: dict[str, torch.Tensor], logit_scale: torch.Tensor) -> torch.Tensor:
    """An exact 0 that depends on every embedding and on the logit scale.

    ZeRO reduces gradients per parameter, so every tower must be in the
    backward graph on every rank. Unlike `e.sum() * 0.0`, this stays 0 (and
    its gradient stays 0) when unavailable rows hold inf/NaN garbage.
    """
    zero = logit_scale.sum() * 0.0
    for e in emb.values():
        zero = zero + e.mul(0.0).nan_to_num(0.0, 0.0, 0.0).sum().to(zero.dtype)
    return zero


def _det(g: torch.Tensor) -> torch.Tensor:
    """Determinant of [..., n, n].

    For n <= 4 the Leibniz expansion: a polynomial, so its gradient (the
    adjugate) is finite even for singular matrices, where the LU-based
    backward of `torch.linalg.det` is not guaranteed to be. Larger n (five or
    more modalities) falls back to `torch.linalg.det`.
    """
    n = g.shape[-1]
    if n > 4:
        return torch.linalg.det(g)
    total = torch.zeros_like(g[..., 0, 0])
    for perm in permutations(range(n)):
        inversions = sum(perm[i] > perm[j] for i in range(n) for j in range(i + 1, n))
        term = g[..., 0, perm[0]]
        for r in range(1, n):
            term = term * g[..., r, perm[r]]
        total = total - term if inversions % 2 else total + term
    return total


def gram_volumes(anchors: torch.Tensor, data: torch.Tensor, data_available: torch.Tensor, eps: float) -> torch.Tensor:
    """Vol(a_p, x_q^1, ..., x_q^K) = sqrt(det G) for every pair (p, q) -> [P, Q].

    anchors [P, D]; data [Q, K, D] (zeros where unavailable); data_available
    [Q, K]. G is the (K+1)x(K+1) Gram matrix of [a_p, x_q^1..K]; the row and
    column of an unavailable x_q^k are replaced by the identity's, which
    leaves det G equal to the determinant over the available vectors only.
    det is clamped at `eps` before the square root (finite gradients when the
    vectors are (nearly) dependent; det < 0 can come from rounding).
    """
    p, (q, k, _) = anchors.shape[0], data.shape
    aa = (anchors * anchors).sum(-1)  # [P]
    cross = torch.einsum("pd,qkd->pqk", anchors, data)  # [P, Q, K], 0 where unavailable
    dd = torch.einsum("qkd,qld->qkl", data, data)  # [Q, K, K]
    both = data_available.unsqueeze(-1) & data_available.unsqueeze(-2)
    eye = torch.eye(k, dtype=dd.dtype, device=dd.device)
    dd = torch.where(both, dd, eye)
    if k == 2:  # three modalities: the 3x3 determinant expanded on [P, Q] tensors, no [P, Q, 3, 3] Gram
        ax, ay = cross[..., 0], cross[..., 1]
        xx, yy, xy = dd[:, 0, 0], dd[:, 1, 1], dd[:, 0, 1]
        a = aa[:, None]
        det = a * (xx * yy - xy * xy) - ax * (ax * yy - xy * ay) + ay * (ax * xy - xx * ay)
        return det.clamp_min(eps).sqrt()
    top = torch.cat([aa[:, None, None].expand(p, q, 1), cross], -1)  # [P, Q, K+1]
    bottom = torch.cat([cross.unsqueeze(-1), dd.unsqueeze(0).expand(p, q, k, k)], -1)  # [P, Q, K, K+1]
    gram = torch.cat([top.unsqueeze(-2), bottom], -2)  # [P, Q, K+1, K+1]
    return _det(gram).clamp_min(eps).sqrt()


def gram_volume(
    emb: dict[str, torch.Tensor],
    observed: torch.Tensor,
    logit_scale: torch.Tensor,
    modalities: tuple[str, ...] | list[str],
    *,
    available: torch.Tensor | None = None,
    anchor: str = "text",
    label_smoothing: float = 0.0,
    negatives_grad: bool = True,
    volume_eps: float = 1e-6,
    column_chunk: int = 0,
    global_batch: GlobalBatch = PROCESS_GROUP,
) -> dict[str, torch.Tensor]:
    """GRAM volume alignment with anchor modality `anchor`.

    For anchor a_i and the data of sample j, Vol(a_i, x_j, y_j, ...) =
    sqrt(det G) with G the Gram matrix of [a_i, the non-anchor modalities
    available for j] (an unavailable modality is left out of the volume).
    logits = -Vol * logit_scale (logit_scale plays 1/tau). The loss is the
    mean of two cross-entropies over the rows: anchor-to-data (a local anchor
    against the data of every gathered sample) and data-to-anchor (the local
    data against every gathered anchor).

    Rows: samples whose anchor is available and that have at least one other
    available modality. Candidate columns: samples with at least one
    non-anchor modality available (anchor-to-data) / with the anchor
    available (data-to-anchor). Each direction is the mean over the rows of
    the global batch; the objective is 0.5 * (a2d + d2a).

    `available` (default `observed`) marks observed or imputed vectors; only
    it matters here (every row has an observed modality by construction).
    `label_smoothing` as in GRAM's reference (0.1 there). `negatives_grad`
    False gathers the columns without gradient, as the reference does: each
    direction then trains only its own query side (the positive column is a
    constant too), and the rank-averaged gradient is no longer that of the
    single-process loss.
    Volumes are computed in fp32 at least. `column_chunk` > 0 computes the
    volumes and logits that many columns at a time, recomputed in backward
    (pretrain/chunked_ce.py): memory O(rows x chunk) instead of O(rows x
    columns x K). Returns {"loss", "loss_value", "loss/<anchor>->data",
    "loss/data-><anchor>"} and an "active/<term>" flag for each term.
    """
    if anchor not in modalities:
        raise ValueError(f"gram anchor {anchor!r} is not one of the modalities {list(modalities)}")
    if len(modalities) < 2:
        raise ValueError("gram needs at least two modalities")
    available = observed if available is None else available
    world, batch = global_batch.world(), observed.shape[0]
    offset = global_batch.rank() * batch
    a = list(modalities).index(anchor)
    others = [m for m in range(len(modalities)) if m != a]

    x = _stack_available(emb, available, modalities)  # [B, M, D]
    x_all = global_batch.gather(x) if negatives_grad else global_batch.gather_nograd(x.detach())  # [W*B, M, D]
    available_all = global_batch.gather_nograd(available.to(torch.uint8)).bool()
    others_available_all, others_available = available_all[:, others], available[:, others]

    rows = available[:, a] & others_available.any(1)
    total = global_batch.sum(rows.sum().to(torch.float64).reshape(1))[0]

    def anchor_to_data(anchors: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, cols: slice) -> torch.Tensor:
        return -scale * gram_volumes(anchors, data, others_available_all[cols], volume_eps)

    def data_to_anchor(data: torch.Tensor, anchors: torch.Tensor, scale: torch.Tensor, cols: slice) -> torch.Tensor:
        return -scale * gram_volumes(anchors, data, others_available, volume_eps).T

    scale = logit_scale.to(x.dtype)
    # anchor -> data: local anchors against the data of every gathered sample
    ad = masked_ce(
        anchor_to_data,
        x[:, a],
        x_all[:, others],
        scale,
        others_available_all.any(1),
        offset,
        label_smoothing=label_smoothing,
        chunk=column_chunk,
    )
    # data -> anchor: local data against every gathered anchor
    da = masked_ce(
        data_to_anchor,
        x[:, others],
        x_all[:, a],
        scale,
        available_all[:, a],
        offset,
        label_smoothing=label_smoothing,
        chunk=column_chunk,
    )
    # Rows that are no positive hold inf/nan: selected away (no indexing, no host sync).
    # With no row in the global batch the terms are 0 and only the zero-weight graph remains.
    denominator = total.clamp_min(1.0)
    ad_term = torch.where(rows, ad, 0.0).sum() / denominator.to(ad.dtype)
    da_term = torch.where(rows, da, 0.0).sum() / denominator.to(da.dtype)
    loss = _zero_in_graph(emb, logit_scale)
    loss = loss + (0.5 * (ad_term + da_term) * world).to(loss.dtype)
    global_terms = global_batch.sum(torch.stack([ad_term.detach(), da_term.detach()]).double())
    active = (total > 0).expand(2)
    names = [f"{anchor}->data", f"data->{anchor}"]
    return _term_outputs(names, global_terms, active, loss, 0.5 * global_terms.sum())


class _SymmetricEig(torch.autograd.Function):
    """`torch.linalg.eigh` of small symmetric matrices with a broadened backward.

    The exact eigenvector gradient divides by eigenvalue gaps lam_j - lam_i:
    inf when the two leading eigenvalues tie, and 0/0 = NaN in PyTorch's
    backward even for ties between eigenvectors the loss does not use (e.g.
    the zero eigenvalues of three identical vectors). Here 1/gap is replaced
    by gap / (gap^2 + eps) ("Lorentzian broadening"): the same to relative
    eps/gap^2 when eigenvalues are apart, 0 for an exact tie, and never larger
    than 1 / (2 sqrt(eps)). The forward is the plain eigh (ascending).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, eps: float):
        # A non-finite matrix (a diverging step) would make LAPACK raise: factor the identity
        # in its place and return NaN eigenvalues, so the loss is NaN and the step guard skips it.
        finite = torch.isfinite(a).flatten(-2).all(-1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        lam, vec = torch.linalg.eigh(torch.where(finite[..., None, None], a, eye))
        lam = torch.where(finite[..., None], lam, torch.nan)
        ctx.save_for_backward(lam, vec)
        ctx.eps = eps
        return lam, vec

    @staticmethod
    def backward(ctx, g_lam: torch.Tensor, g_vec: torch.Tensor):
        lam, vec = ctx.saved_tensors
        inner = vec.mT @ g_vec
        inner = 0.5 * (inner - inner.mT)  # tangent space of the orthogonal group
        gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # [i, j] = lam_j - lam_i
        inner = inner * gap / (gap * gap + ctx.eps)  # 0 on the diagonal
        inner = inner + torch.diag_embed(g_lam)
        return vec @ inner @ vec.mT, None


def _leading_directions(
    x: torch.Tensor,
    available: torch.Tensor,
    tau1: float,
    gap_eps: float,
    eig_floor: float,
    sign_tol: float,
    sign_fix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the leading left singular vector u [B, D] of Z_i (its available
    columns; zeros for a row with none) and the singular-value cross-entropy
    CE(l / tau1, 0) [B] over its available columns' singular values (0 for
    rows with fewer than two available columns).

    Fixed shapes, no grouping and no host sync: every row's M x M Gram matrix
    X^T X is built with its unavailable columns zero (`x` holds exact zeros
    there), so it is block-diagonal: the available columns' Gram matrix Z^T Z
    and a zero block. One batched eigh gives Z^T Z = V diag(l^2) V^T padded
    with zero eigenvalues, whose eigenvectors stay in the zero block; the
    leading eigenvector is Z's (its eigenvalue is >= 1 for unit vectors), and
    the n_i largest eigenvalues are Z's singular values squared (those below
    the floor tie with the padding and are clamped to the same value).
    l = sqrt(max(lam, eig_floor)) (the floor keeps the gradient finite at a zero
    singular value, e.g. two identical vectors) and u = normalize(Z v_1), with
    the sign fixed so that u . mean(columns of Z) > 0; where |u . mean| <=
    sign_tol (a tie), so that u . (first available column, in modality order)
    >= 0. A single available vector gives u = normalize(z), whatever `sign_fix`.
    """
    n_rows, n_mod, dim = x.shape
    counts = available.sum(1)  # [B]
    lam, vec = _SymmetricEig.apply(x @ x.mT, gap_eps)  # ascending, [B, M] and [B, M, M]
    lead = vec[..., -1]  # [B, M], zero on unavailable columns
    u = F.normalize((lead.unsqueeze(-1) * x).sum(1), dim=-1)
    # Sign against the column mean; where that is (near) zero, against the
    # first available column. The fallback matters: for two unit vectors
    # with a negative cosine, u = normalize(z1 - z2) is exactly orthogonal
    # to their mean, so the mean alone would leave the sign to rounding.
    mean = x.sum(1) / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
    first = x[torch.arange(n_rows, device=x.device), available.to(torch.uint8).argmax(1)]
    along_mean = (u * mean).sum(-1)
    reference = torch.where(along_mean.abs() > sign_tol, along_mean, (u * first).sum(-1))
    sign = torch.where(reference < 0, -1.0, 1.0).to(u.dtype).detach()
    if not sign_fix:  # the solver's sign, except for a single vector (u = normalize(z))
        sign = torch.where(counts == 1, sign, torch.ones_like(sign))
    u = u * sign.unsqueeze(-1)
    singular = lam.clamp_min(eig_floor).sqrt().flip(-1)  # descending, [B, M]
    beyond = torch.arange(n_mod, device=x.device).unsqueeze(0) >= counts.unsqueeze(1)  # padding of Z's spectrum
    logits = (singular / tau1).masked_fill(beyond, float("-inf"))
    target = torch.zeros(n_rows, dtype=torch.long, device=x.device)
    sv_ce = torch.where(counts >= 2, F.cross_entropy(logits, target, reduction="none"), 0.0)
    return u, sv_ce


def pmrl(
    emb: dict[str, torch.Tensor],
    observed: torch.Tensor,
    logit_scale: torch.Tensor,
    modalities: tuple[str, ...] | list[str],
    *,
    available: torch.Tensor | None = None,
    tau1: float = 0.1,
    tau2: float = 0.0,
    sign_fix: bool = True,
    eig_gap_eps: float = 1e-8,
    eig_floor: float = 1e-6,
    sign_tol: float = 1e-3,
    column_chunk: int = 0,
    global_batch: GlobalBatch = PROCESS_GROUP,
) -> dict[str, torch.Tensor]:
    """PMRL: maximise each instance's leading singular value, contrast the leading directions.

    Z_i stacks the available (observed or imputed) vectors of sample i;
    l_1 >= l_2 >= ... are its singular values and u_i its leading left
    singular vector, signed so that u_i . mean(columns of Z_i) > 0 (where
    that is within `sign_tol` of 0, so that u_i . first column >= 0).
        L = mean_i CE(l_i / tau1, target 0)          (rows with >= 2 available)
          + symmetric CE of u_i . u_j * logit_scale over the global batch
    (1/tau2 is `logit_scale`, or fixed when `tau2` > 0 as in PMRL's reference,
    0.1 there; rows and candidate columns: samples with any available
    modality). `sign_fix` False leaves u with the eigensolver's sign, as the
    reference does. The score matrix u_i . u_j is symmetric and rows
    and columns share one candidate set, so the column-wise cross-entropy
    equals the row-wise one and the symmetric term is computed as the latter.
    A term no sample of the global batch has is left out (all-reduced counts,
    chosen by masks on the device). `column_chunk` as in `pairwise_infonce`.

    Finite gradients: see `_leading_directions` (eigenvalue floor
    `eig_floor` on l^2) and `_SymmetricEig` (gap broadening `eig_gap_eps`).
    Returns {"loss", "loss_value", "loss/singular_values", "loss/instance"}
    and an "active/<term>" flag for each term.
    """
    available = observed if available is None else available
    world, batch = global_batch.world(), observed.shape[0]
    offset = global_batch.rank() * batch
    x = _stack_available(emb, available, modalities)
    u, sv_ce = _leading_directions(x, available, tau1, eig_gap_eps, eig_floor, sign_tol, sign_fix)
    u_all = global_batch.gather(u)  # with gradient, back to the owner of each row
    available_all = global_batch.gather_nograd(available.to(torch.uint8)).bool()
    multi = available.sum(1) >= 2
    has_any, has_any_all = available.any(1), available_all.any(1)
    totals = global_batch.sum(torch.stack([multi.sum(), has_any.sum()]).to(torch.float64))
    denominators = totals.clamp_min(1.0)

    loss = _zero_in_graph(emb, logit_scale)
    sv_term = sv_ce.sum() / denominators[0].to(sv_ce.dtype)  # sv_ce is 0 on rows with < 2 columns
    inverse_tau2 = logit_scale.to(u.dtype) if tau2 <= 0 else torch.full_like(logit_scale, 1.0 / tau2, dtype=u.dtype)
    ce = masked_ce(_dot_logits, u, u_all, inverse_tau2, has_any_all, offset, chunk=column_chunk)
    inst_term = torch.where(has_any, ce, 0.0).sum() / denominators[1].to(ce.dtype)
    loss = loss + ((sv_term + inst_term) * world).to(loss.dtype)
    global_terms = global_batch.sum(torch.stack([sv_term.detach(), inst_term.detach()]).double())
    return _term_outputs(["singular_values", "instance"], global_terms, totals > 0, loss, global_terms.sum())


class Objective(Protocol):
    """An alignment objective with its options bound (see `create_objective`).

    Returns "loss" (this rank's part, for backward), "loss_value" (the global
    value) and per term "loss/<term>", with "active/<term>" when the term can be
    absent from a batch (a term without it is logged always). All device tensors."""

    def __call__(
        self,
        emb: dict[str, torch.Tensor],
        observed: torch.Tensor,
        logit_scale: torch.Tensor,
        modalities: tuple[str, ...] | list[str],
        *,
        available: torch.Tensor | None = None,
        global_batch: GlobalBatch = PROCESS_GROUP,
    ) -> dict[str, torch.Tensor]: ...


def joint_with_pairwise(
    emb: dict[str, torch.Tensor],
    observed: torch.Tensor,
    logit_scale: torch.Tensor,
    modalities: tuple[str, ...] | list[str],
    *,
    available: torch.Tensor | None = None,
    global_batch: GlobalBatch = PROCESS_GROUP,
    joint: Objective,
    pairwise: Objective,
    joint_weight: float = 1.0,
    pairwise_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """`joint_weight` x a joint objective on the completed tuples (`available`) plus
    `pairwise_weight` x pairwise InfoNCE on the observed pairs only.

    The pairwise term is what contrastive pretraining optimised; kept beside the
    joint term it holds the cross-modal (cosine) alignment the joint term alone
    does not constrain (volumes and singular values ignore a column's sign).
    Imputed vectors enter the joint term only. Terms are logged as
    "loss/joint/<term>" and "loss/pairwise/<pair>" (and "active/..." likewise)."""
    joint_out = joint(emb, observed, logit_scale, modalities, available=available, global_batch=global_batch)
    pair_out = pairwise(emb, observed, logit_scale, modalities, available=observed, global_batch=global_batch)
    out = {
        "loss": joint_weight * joint_out["loss"] + pairwise_weight * pair_out["loss"],
        "loss_value": joint_weight * joint_out["loss_value"] + pairwise_weight * pair_out["loss_value"],
    }
    for prefix, part in (("joint", joint_out), ("pairwise", pair_out)):
        for key, value in part.items():
            kind, _, name = key.partition("/")
            if name:  # "loss/<term>" and "active/<term>"
                out[f"{kind}/{prefix}/{name}"] = value
    return out


def create_objective(cfg: LossConfig) -> Objective:
    """The configured objective, built once, with exactly its own options bound; a joint
    objective (gram, pmrl) with `pairwise_weight` > 0 gets the pairwise term beside it."""
    joint: Objective
    pairwise: Objective = partial(
        pairwise_infonce, imputed_pair_weight=cfg.imputed_pair_weight, column_chunk=cfg.column_chunk
    )
    if cfg.objective == "pairwise":
        return pairwise
    if cfg.objective == "gram":
        joint = partial(
            gram_volume,
            anchor=cfg.gram_anchor,
            label_smoothing=cfg.gram_label_smoothing,
            negatives_grad=cfg.gram_negatives_grad,
            column_chunk=cfg.column_chunk,
        )
    elif cfg.objective == "pmrl":
        joint = partial(
            pmrl, tau1=cfg.pmrl_tau1, tau2=cfg.pmrl_tau2, sign_fix=cfg.pmrl_sign_fix, column_chunk=cfg.column_chunk
        )
    else:
        raise ValueError(f"loss.objective {cfg.objective!r} is not one of: pairwise, gram, pmrl")
    if cfg.pairwise_weight <= 0 and cfg.joint_weight == 1.0:
        return joint
    # The observed pairs' InfoNCE beside the joint term: every pair is observed, so no imputed weight.
    observed_pairwise: Objective = partial(pairwise_infonce, column_chunk=cfg.column_chunk)
    return partial(
        joint_with_pairwise,
        joint=joint,
        pairwise=observed_pairwise,
        joint_weight=cfg.joint_weight,
        pairwise_weight=cfg.pairwise_weight,
    )
