"""CovMatch's loss: ||rho C_real - C_syn||_F^2 plus per-modality mean matching of the projected
features, with the Frobenius term in its Gram form for real batches (no `[D_v, D_t]` matrix)."""

from __future__ import annotations

from torch import Tensor, nn


def cross_covariance(v: Tensor, t: Tensor) -> Tensor:
    """Centred image-text cross-covariance `[D_v, D_t]` of a batch, divisor n - 1."""
    n = v.shape[0]
    return (v - v.mean(0)).T @ (t - t.mean(0)) / (n - 1)


def weighted_statistics(v: Tensor, t: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted cross-covariance and means with reliability weights `w` (divisor
    sum w - sum w^2 / sum w: with 0/1 weights, the n - 1 covariance of the kept pairs)."""
    w = w.to(v.dtype)
    total = w.sum()
    mv, mt = (w @ v) / total, (w @ t) / total
    cov = ((v - mv) * w[:, None]).T @ (t - mt) / (total - (w * w).sum() / total)
    return cov, mv[None], mt[None]


def _centred(x: Tensor) -> Tensor:
    return x - x.mean(0, keepdim=True)


def _cov_inner(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """<C_a, C_b>_F from the two batches' Gram matrices, never forming a `[D_v, D_t]` matrix.

    <A_v^T A_t, B_v^T B_t> = sum_ij (A_v B_v^T)_ij (A_t B_t^T)_ij: O(n_a n_b (D_v + D_t)) instead
    of O((n_a + n_b) D_v D_t), which is what makes a step cheap with 1000-2000-d trunks.
    """
    av, at = map(_centred, a)
    bv, bt = map(_centred, b)
    return ((av @ bv.T) * (at @ bt.T)).sum() / ((len(av) - 1) * (len(bv) - 1))


def covmatch_loss(
    real: tuple[Tensor, Tensor],
    syn: tuple[Tensor, Tensor],
    heads: tuple[nn.Module, nn.Module],
    rho: float,
    lam: float,
    real_cov: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """||rho C_real - C_syn||_F^2 + lam * sum over modalities of ||mean G h_real - mean G h_syn||^2.

    `real` and `syn` are (image, text) trunk features; `heads` the current linear projections G
    (affine, so the projected mean is the projection of the mean). For a real batch the
    Frobenius term is expanded as rho^2 |C_r|^2 - 2 rho <C_r, C_s> + |C_s|^2 (see `_cov_inner`).
    With `real_cov` given (statistics of all real pairs, precomputed), `real` only supplies
    the real means (a single row each is enough). The two terms come back detached, still on
    the device: reading them is a host sync, done only when a step is logged.
    """
    if real_cov is None:
        cov = (
            rho**2 * _cov_inner(real, real).detach()
            - 2 * rho * _cov_inner(real, syn)
            + _cov_inner(syn, syn)
        )
    else:
        cov = (rho * real_cov - cross_covariance(*syn)).pow(2).sum()
    mean = sum(
        (head(r.mean(0, keepdim=True)) - head(s.mean(0, keepdim=True))).pow(2).sum()
        for head, r, s in zip(heads, real, syn, strict=True)
    )
    return cov + lam * mean, {"cov": cov.detach(), "mean": mean.detach()}
