"""Streaming randomized PCA for very wide samples (Halko, Martinsson & Tropp 2011, §4–5).

Finds the top principal directions of n samples x ∈ R^p (for ISI, p = N·D = 150,528 for ViT-B)
without storing the samples or forming the p × p covariance C = Σ (x − x̄)(x − x̄)ᵀ:

    pass 0 (range)   Y = C Ω with Ω a seeded Gaussian p × k test matrix (k = rank + oversampling).
                     x̄ is unknown while streaming, so stream Σ x(xᵀΩ) and Σ x and correct at the
                     end: C Ω = Σ x(xᵀΩ) − (Σx)(Σx)ᵀΩ / n   (`centered_range_sketch`).
    pass 1..q (power) Y = C Q with the previous basis, x̄ now known; each pass squares the
                     spectral decay the basis sees, for spectra that fall slowly.
    basis            Q = orth(Y), p × k orthonormal (`orthonormal_basis`).

A caller then streams the k-dim projections z = Qᵀ(x − x̄) (which it needs anyway) and ends with
the Rayleigh–Ritz step (`rayleigh_ritz`) on Σ zzᵀ: the top eigenvectors R of Cov(z) give the
principal directions Q·R and their variances. When k ≥ rank(C) (e.g. k ≥ p or k ≥ n − 1) the
result is exact; otherwise it is the standard randomized approximation, whose error shrinks
with the oversampling and the power passes.

Memory: p·k float64 for Ω, for each sketch Y and for each basis Q; cost O(n·p·k) per pass.
Every streamed quantity is a sum, so batches and processes add. Ω is drawn on the CPU from a
seeded generator, so every process and device gets the same matrix.
"""

from __future__ import annotations

import torch


def gaussian_test_matrix(dim: int, width: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal (dim, width) float64 matrix, identical for a given seed on every process/device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, width, generator=generator, dtype=torch.float64).to(device)


def centered_range_sketch(sum_x_xt_omega: torch.Tensor, sum_x: torch.Tensor, count: torch.Tensor | float,
                          omega: torch.Tensor) -> torch.Tensor:
    """C Ω from the streamed Σ x(xᵀΩ) (p, k), Σ x (p) and n: removes the mean after the fact."""
    return sum_x_xt_omega - torch.outer(sum_x, sum_x @ omega) / count


def orthonormal_basis(sketch: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (p, k) of the sketch's column space (reduced QR)."""
    return torch.linalg.qr(sketch, mode="reduced").Q


def rayleigh_ritz(centered_zz: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenpairs of Σ (z − z̄)(z − z̄)ᵀ (k, k): variances (rank,) descending, rotation (k, rank).

    The variances are sums of squares over the samples (divide by n for a covariance).
    """
    evals, evecs = torch.linalg.eigh(centered_zz)
    order = torch.argsort(evals, descending=True)[:rank]
    return evals[order].clamp_min(0.0), evecs[:, order]
