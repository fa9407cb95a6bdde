"""Ridge regression from streamed sufficient statistics, scored by pooled held-out R².

A linear regression y ≈ Wᵀx + b over n samples (x ∈ R^p, y ∈ R^q) needs only the sums

    n,  Σx,  Σy,  Σxxᵀ (p×p),  Σxyᵀ (p×q),  Σy² (per output)

which add over batches, over disjoint groups of images and over processes, so samples are seen
once and never stored. Every function here works on such sums in float64, batched over any
leading dims (ISI keeps one regression per token position).

Fitting is scikit-learn's `Ridge(alpha, fit_intercept=True)`: x and y are centred by the
training means, W = (Cxx + αI)⁻¹ Cxy, b = ȳ − Wᵀx̄ (the intercept is not penalised). The
penalty is α = c · tr(Cxx)/p, so one grid of multipliers c suits any feature scale.

Held-out error from the scoring group's sums, centred on that group's own means (less
cancellation than raw second moments):

    SSE = Σ_q SST_q − 2 tr(WᵀCxy) + tr(WᵀCxxW) + n ‖(ȳ − ȳ_train) − Wᵀ(x̄ − x̄_train)‖²

and R² = 1 − ΣSSE / ΣSST pooled over all leading indices and outputs, which is scikit-learn's
`r2_score(y, ŷ, multioutput="variance_weighted")` over the flattened outputs.

Two-block ridge (`two_block_sse_change`): features x = [x₁ ; x₂] with a penalty of each block's
own, α₁‖W₁‖² + α₂‖W₂‖², α₂ = ∞ allowed (then W₂ = 0 and the fit is the x₁-only ridge). This is the
nested ISI regression: x₁ = h_i (the token itself), x₂ = g(H) (the whole token set).

Kernel (dual) ridge on held features, for regressions with more features than samples, is at
the end (`kernel_heldout_sse`); it gives the same W as the primal form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_RIDGE_GRID = tuple(10.0 ** k for k in range(-6, 3))  # multipliers c of tr(Cxx)/p


class IllPosedRegressionWarning(UserWarning):
    """A regression with too few samples for its number of inputs to mean what it claims."""


@dataclass
class RegressionSums:
    """Sums over `count` samples; every tensor may carry the same leading dims (e.g. positions)."""

    count: torch.Tensor  # () number of samples (shared by all leading indices)
    sum_x: torch.Tensor  # (..., p)
    sum_y: torch.Tensor  # (..., q)
    xx: torch.Tensor  # (..., p, p)  Σ x xᵀ
    xy: torch.Tensor  # (..., p, q)  Σ x yᵀ
    yy: torch.Tensor  # (..., q)     Σ y² per output

    def __add__(self, other: RegressionSums) -> RegressionSums:
        return RegressionSums(self.count + other.count, self.sum_x + other.sum_x, self.sum_y + other.sum_y,
                              self.xx + other.xx, self.xy + other.xy, self.yy + other.yy)

    @classmethod
    def from_samples(cls, x: torch.Tensor, y: torch.Tensor) -> RegressionSums:
        """Sums of samples x (n, ..., p), y (n, ..., q), in float64."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        return cls(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                   x.sum(0), y.sum(0), torch.einsum("n...i,n...j->...ij", x, x),
                   torch.einsum("n...i,n...j->...ij", x, y), y.square().sum(0))


@dataclass
class CenteredMoments:
    count: torch.Tensor  # ()
    mean_x: torch.Tensor  # (..., p)
    mean_y: torch.Tensor  # (..., q)
    cxx: torch.Tensor  # (..., p, p)  Σ (x − x̄)(x − x̄)ᵀ
    cxy: torch.Tensor  # (..., p, q)
    sst: torch.Tensor  # (..., q)     Σ (y − ȳ)² per output


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ rhs for symmetric positive-definite matrices (a covariance plus α·I, α > 0), batched.

    Cholesky rather than torch.linalg.solve: besides being the right factorisation here, batched float64
    LU solves on CPU with more than one thread fail at random ("Pivots given to lu_solve must all be
    greater or equal to 1", torch 2.14) where Cholesky does not."""
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(matrix))


def centered(sums: RegressionSums) -> CenteredMoments:
    n = sums.count
    if float(n) < 1:
        raise ValueError("regression sums over zero samples")
    mean_x, mean_y = sums.sum_x / n, sums.sum_y / n
    cxx = sums.xx - n * mean_x.unsqueeze(-1) * mean_x.unsqueeze(-2)
    cxy = sums.xy - n * mean_x.unsqueeze(-1) * mean_y.unsqueeze(-2)
    sst = (sums.yy - n * mean_y.square()).clamp_min(0.0)
    return CenteredMoments(n, mean_x, mean_y, cxx, cxy, sst)


def ridge_penalty_scale(moments: CenteredMoments) -> torch.Tensor:
    """tr(Cxx)/p per leading index (1 where the features are constant, so α stays positive)."""
    return _mean_variance(moments.cxx)


def ridge_weights(train: RegressionSums, multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., p, q) and b (..., q) of the ridge fit with α = multiplier · tr(Cxx)/p."""
    m = centered(train)
    alpha = multiplier * ridge_penalty_scale(m)
    eye = torch.eye(m.cxx.shape[-1], dtype=m.cxx.dtype, device=m.cxx.device)
    return _with_intercept(m, spd_solve(m.cxx + alpha[..., None, None] * eye, m.cxy))


def fitted_sse(weights: torch.Tensor, intercept: torch.Tensor, m: CenteredMoments) -> torch.Tensor:
    """SSE (...,) of the fit ŷ = Wᵀx + b over the scored samples, from their centred moments (the expansion above)."""
    offset = m.mean_y - intercept - (m.mean_x.unsqueeze(-2) @ weights).squeeze(-2)
    quadratic = ((m.cxx @ weights) * weights).sum((-2, -1))
    sse = m.sst.sum(-1) - 2.0 * (weights * m.cxy).sum((-2, -1)) + quadratic + m.count * offset.square().sum(-1)
    return sse.clamp_min(0.0)


def heldout_sse_at(train: RegressionSums, test: RegressionSums, multiplier: float) -> torch.Tensor:
    """Test SSE (...,) of the one ridge fit on `train` with α = multiplier · tr(Cxx)/p (a Cholesky solve:
    cheaper than `heldout_sse`'s eigendecomposition when only the chosen multiplier is scored)."""
    return fitted_sse(*ridge_weights(train, multiplier), centered(test))


def heldout_sse(train: RegressionSums, test: RegressionSums, multipliers: Sequence[float]) -> torch.Tensor:
    """Test-group SSE (..., len(multipliers)) of the ridge fits on `train`, one per multiplier.

    One eigendecomposition of the training Cxx serves the whole grid: in its eigenbasis the
    weights for α are diag(d)·P with d = 1/(s + α) and P = VᵀCxy, so with the test moments
    rotated too (M = VᵀCxx'V, T = VᵀCxy') the two trace terms are dᵀ(M ∘ PPᵀ)d and
    Σ_i d_i (P ∘ T)_i·: each multiplier costs O(p²), the grid O(p³ + p²q) in all.
    """
    tr, te = centered(train), centered(test)
    evals, evecs = torch.linalg.eigh(tr.cxx)
    evals = evals.clamp_min(0.0)
    scale = ridge_penalty_scale(tr).unsqueeze(-1)
    evecs_t = evecs.transpose(-2, -1)
    fit_xy = evecs_t @ tr.cxy  # P (..., p, q)
    quadratic = (evecs_t @ te.cxx @ evecs) * (fit_xy @ fit_xy.transpose(-2, -1))  # M ∘ PPᵀ (..., p, p)
    linear = (fit_xy * (evecs_t @ te.cxy)).sum(-1)  # (..., p)
    shift_x = (evecs_t @ (te.mean_x - tr.mean_x).unsqueeze(-1)).squeeze(-1)  # (..., p)
    shift_y = te.mean_y - tr.mean_y  # (..., q)
    d = _grid_reciprocals(evals, scale, multipliers)  # (..., G, p)
    offset = shift_y.unsqueeze(-2) - (d * shift_x.unsqueeze(-2)) @ fit_xy  # (..., G, q)
    sse = (te.sst.sum(-1, keepdim=True) - 2.0 * (d * linear.unsqueeze(-2)).sum(-1) + _quadratic_forms(d, quadratic)
           + te.count * offset.square().sum(-1))
    return sse.clamp_min(0.0)


def _grid_reciprocals(evals: torch.Tensor, scale: torch.Tensor, multipliers: Sequence[float]) -> torch.Tensor:
    """d = 1/(s + c·scale) (..., G, p) for every multiplier c at once (0 for an infinite one); scale (..., 1)."""
    grid = torch.tensor(multipliers, dtype=evals.dtype, device=evals.device).unsqueeze(-1)  # (G, 1)
    return 1.0 / (evals.unsqueeze(-2) + grid * scale.unsqueeze(-1))


def _quadratic_forms(d: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """dᵀ M d (..., G) for each of the G rows of d (..., G, p)."""
    return ((d @ matrix) * d).sum(-1)


def _mean_variance(cxx: torch.Tensor) -> torch.Tensor:
    """tr(C)/p per leading index, 1 where it is 0."""
    scale = torch.diagonal(cxx, dim1=-2, dim2=-1).sum(-1) / cxx.shape[-1]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def two_block_sse_change(train: RegressionSums, test: RegressionSums, split: int, first_multiplier: float,
                         multipliers: Sequence[float]) -> torch.Tensor:
    """Test SSE of two-block ridge fits minus that of the first block alone, (..., len(multipliers)).

    Features x = [x₁ (the first `split`) ; x₂ (the rest)]; the fit on `train` minimises
    ‖Yc − X₁W₁ − X₂W₂‖² + α₁‖W₁‖² + α₂‖W₂‖² (centred, intercept unpenalised) with
    α₁ = first_multiplier · tr(C₁₁)/p₁ and α₂ = c · tr(S)/p₂ for each c in `multipliers` (∞ allowed).
    Eliminating W₁ (A = C₁₁ + α₁I, W_s = A⁻¹C₁y the first-block-only ridge, P = A⁻¹C₁₂):

        S = C₂₂ − C₂₁P                 (the x₂ covariance left after ridge-partialling out x₁)
        W₂ = (S + α₂I)⁻¹(C₂y − C₂₁W_s)  (x₂ fitted to the residual of the first-block fit)
        W₁ = W_s − P W₂

    so α₂ = ∞ gives W₂ = 0, W₁ = W_s exactly, and the change is exactly 0. With S = UΛUᵀ,
    W = [W_s ; 0] + K·diag(d)·T with K = [−PU ; U], T = Uᵀ(C₂y − C₂₁W_s), d = 1/(λ + α₂): the change
    in SSE (`heldout_sse`'s expansion) is −2 dᵀℓ + dᵀ((KᵀC′K + n′kkᵀ) ∘ TTᵀ)d with
    ℓ = rows of T ∘ Kᵀ(C′xy − C′xx[W_s ; 0]) summed + n′ k ∘ T(δy − W_sᵀδx₁) and k = Kᵀδx,
    C′ the test group's centred moments and δ its mean shift: O(p²p₂) per leading index for the
    whole grid.
    """
    tr, te = centered(train), centered(test)
    s = split
    w_self, partial, schur, residual_cov = _eliminate_first_block(tr, split, first_multiplier)
    evals, evecs = torch.linalg.eigh(schur)
    evals = evals.clamp_min(0.0)
    scale = _mean_variance(schur).unsqueeze(-1)
    rotated = evecs.transpose(-2, -1) @ residual_cov  # T (.., p₂, q)
    k_matrix = torch.cat([-partial @ evecs, evecs], -2)  # K (.., p, p₂)
    k_t = k_matrix.transpose(-2, -1)
    k_delta = (k_t @ (te.mean_x - tr.mean_x).unsqueeze(-1)).squeeze(-1)  # (.., p₂)
    base_offset = (te.mean_y - tr.mean_y) - ((te.mean_x[..., :s] - tr.mean_x[..., :s]).unsqueeze(-2)
                                             @ w_self).squeeze(-2)  # (.., q)
    outer = rotated @ rotated.transpose(-2, -1)  # TTᵀ
    quadratic = (k_t @ te.cxx @ k_matrix + te.count * k_delta.unsqueeze(-1) * k_delta.unsqueeze(-2)) * outer
    linear = (rotated * (k_t @ (te.cxy - te.cxx[..., :s] @ w_self))).sum(-1)  # C′xx[W_s ; 0]
    linear = linear + te.count * k_delta * (rotated @ base_offset.unsqueeze(-1)).squeeze(-1)
    d = _grid_reciprocals(evals, scale, multipliers)
    return _quadratic_forms(d, quadratic) - 2.0 * (d * linear.unsqueeze(-2)).sum(-1)


def _first_block_penalised(m: CenteredMoments, split: int, first_multiplier: float) -> torch.Tensor:
    """A = C₁₁ + α₁I with α₁ = first_multiplier · tr(C₁₁)/p₁."""
    c11 = m.cxx[..., :split, :split]
    alpha1 = first_multiplier * _mean_variance(c11)
    return c11 + alpha1[..., None, None] * torch.eye(split, dtype=c11.dtype, device=c11.device)


def _eliminate_first_block(m: CenteredMoments, split: int, first_multiplier: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_s = A⁻¹C₁y (..., p₁, q), P = A⁻¹C₁₂ (..., p₁, p₂), S = C₂₂ − C₂₁P symmetrised and C₂y − C₂₁W_s
    (..., p₂, q): the first block ridge-partialled out (`two_block_sse_change`'s docstring)."""
    s, outputs = split, m.cxy.shape[-1]
    c12 = m.cxx[..., :s, s:]
    solved = spd_solve(_first_block_penalised(m, s, first_multiplier), torch.cat([m.cxy[..., :s, :], c12], -1))
    w_self, partial = solved[..., :outputs], solved[..., outputs:]
    schur = m.cxx[..., s:, s:] - c12.transpose(-2, -1) @ partial
    schur = 0.5 * (schur + schur.transpose(-2, -1))
    return w_self, partial, schur, m.cxy[..., s:, :] - c12.transpose(-2, -1) @ w_self


def _two_block_solutions(m: CenteredMoments, split: int, first_multiplier: float,
                         second_multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., p, q) of the first block's ridge alone ([W_s ; 0]) and of the two-block fit, by eliminating W₁:
    W₂ = (S + α₂I)⁻¹(C₂y − C₂₁W_s), W₁ = W_s − P W₂ (one p₁×p₁ and one p₂×p₂ factorisation)."""
    if second_multiplier == float("inf"):
        w_self = spd_solve(_first_block_penalised(m, split, first_multiplier), m.cxy[..., :split, :])
        alone = torch.cat([w_self, torch.zeros_like(m.cxy[..., split:, :])], -2)
        return alone, alone
    w_self, partial, schur, residual_cov = _eliminate_first_block(m, split, first_multiplier)
    alpha2 = second_multiplier * _mean_variance(schur)
    eye2 = torch.eye(schur.shape[-1], dtype=schur.dtype, device=schur.device)
    w_context = spd_solve(schur + alpha2[..., None, None] * eye2, residual_cov)
    return (torch.cat([w_self, torch.zeros_like(w_context)], -2),
            torch.cat([w_self - partial @ w_context, w_context], -2))


def _with_intercept(m: CenteredMoments, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weights, m.mean_y - (m.mean_x.unsqueeze(-2) @ weights).squeeze(-2)


def two_block_ridge_weights(train: RegressionSums, split: int, first_multiplier: float,
                            second_multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., p, q) and b (..., q) of the two-block ridge fit of `two_block_sse_change` (direct solves)."""
    m = centered(train)
    return _with_intercept(m, _two_block_solutions(m, split, first_multiplier, second_multiplier)[1])


def two_block_heldout_sse_at(train: RegressionSums, test: RegressionSums, split: int, first_multiplier: float,
                             second_multiplier: float) -> torch.Tensor:
    """Test SSE (..., 2) of the fits on `train` of the first block alone (column 0) and of both blocks at these
    multipliers (column 1), from one factorisation of the first block's penalised covariance."""
    m, scored = centered(train), centered(test)
    return torch.stack([fitted_sse(*_with_intercept(m, weights), scored)
                        for weights in _two_block_solutions(m, split, first_multiplier, second_multiplier)], -1)


def total_sum_of_squares(sums: RegressionSums) -> torch.Tensor:
    """Σ over outputs of Σ (y − ȳ)², per leading index: the R² denominator of a scoring group."""
    return (sums.yy - sums.sum_y.square() / sums.count).clamp_min(0.0).sum(-1)


def kernel_heldout_sse(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                       y_test: torch.Tensor, multipliers: Sequence[float]) -> torch.Tensor:
    """Test SSE (len(multipliers),) of ridge fits solved in the dual, from held samples (n, p) / (n, q).

    Same model as the primal: centred kernel K = XcXcᵀ, dual coefficients (K + αI)⁻¹Yc,
    α = c · tr(K)/p (tr(K) = tr(Cxx)), predictions (x − x̄)ᵀXcᵀ(K + αI)⁻¹Yc + ȳ.
    """
    x_train, y_train = x_train.to(torch.float64), y_train.to(torch.float64)
    x_test, y_test = x_test.to(torch.float64), y_test.to(torch.float64)
    mean_x, mean_y = x_train.mean(0), y_train.mean(0)
    xc = x_train - mean_x
    evals, evecs = torch.linalg.eigh(xc @ xc.T)
    evals = evals.clamp_min(0.0)
    scale = float(evals.sum()) / x_train.shape[1]
    scale = scale if scale > 0 else 1.0
    test_kernel_rotated = (x_test - mean_x) @ xc.T @ evecs  # (n_test, n_train)
    rotated_targets = evecs.T @ (y_train - mean_y)  # (n_train, q)
    residual_at_mean = y_test - mean_y
    out = []
    for multiplier in multipliers:
        prediction = test_kernel_rotated @ (rotated_targets / (evals + multiplier * scale).unsqueeze(-1))
        out.append((residual_at_mean - prediction).square().sum())
    return torch.stack(out)
