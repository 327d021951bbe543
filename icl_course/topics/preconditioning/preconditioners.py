"""Preconditioned gradient descent in context: the optimal one-layer preconditioner and its loss.

One step of preconditioned GD from ``w = 0`` on ``L(w) = 1/(2n) ||X w - y||^2`` predicts

    y_hat = x_q^T Gamma h,      h = (1/n) X^T y ,

and one linear self-attention layer computes exactly this (``gd_transformer``). For inputs
``x ~ N(0, Sigma)``, weights ``w ~ N(0, I)`` and no label noise, the expected loss of any ``Gamma``
has a closed form, and the best ``Gamma`` is (Ahn et al. 2023, Thm. 1)

    Gamma* = ((n+1)/n Sigma + tr(Sigma)/n I)^(-1) .

Derivation, in the chapter's notation (``S = (1/n) X^T X`` so ``h = S w``): the error is
``x_q^T (Gamma S - I) w``; averaging over ``x_q``, ``w`` and then ``X`` with the Gaussian fourth
moment ``E[S^2] = (n+1)/n Sigma^2 + tr(Sigma)/n Sigma`` gives

    E (y_hat - y_q)^2 = tr(Gamma^T Sigma Gamma E[S^2]) - 2 tr(Sigma Gamma Sigma) + tr(Sigma) ,

a convex quadratic in ``Gamma`` whose minimiser is ``Gamma*``, with minimum
``tr(Sigma) - tr(Sigma^2 Gamma*)``.

This module also reads the preconditioner out of a trained layer (``layer_preconditioner``) and
builds the chapter's rotated, non-isotropic input covariance (``rotated_covariance``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from icl_course.linear_transformer import LinearSelfAttention
from icl_course.runtime import require_finite

__all__ = [
    "rotated_covariance",
    "second_moment_of_S",
    "optimal_preconditioner",
    "preconditioned_step_loss",
    "optimal_step_loss",
    "best_plain_step",
    "layer_preconditioner",
    "relative_error",
    "distance_to_multiple",
]


def _check_cov(cov: Tensor) -> Tensor:
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    require_finite("cov", cov)
    if not torch.allclose(cov, cov.T, atol=1e-10):
        raise ValueError("cov must be symmetric")
    return cov


def _check_n(n_ctx: int) -> None:
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")


def rotated_covariance(scales=(1.0, 1.0, 0.5, 0.25, 1.0), seed: int = 0) -> Tensor:
    """``Sigma = U D^2 U^T`` with ``D = diag(scales)`` and a random rotation ``U`` (float64).

    The default ``scales`` are those of Ahn et al.'s reference code (d = 5); condition number
    ``(max scale / min scale)^2 = 16``. ``U`` is the Q factor of a Gaussian matrix (signs fixed so the
    same seed gives the same ``U`` everywhere).

    >>> cov = rotated_covariance()
    >>> torch.linalg.eigvalsh(cov).round(decimals=4).tolist()
    [0.0625, 0.25, 1.0, 1.0, 1.0]
    """
    scales = torch.as_tensor(scales, dtype=torch.float64)
    if scales.ndim != 1 or len(scales) < 1 or not (scales > 0).all() or not torch.isfinite(scales).all():
        raise ValueError(f"scales must be a non-empty 1-D sequence of finite positive numbers, got {scales.tolist()}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    d = len(scales)
    gen = torch.Generator().manual_seed(seed)
    U, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    U = U * torch.sign(torch.diagonal(R))  # a unique Q factor: positive diagonal of R
    return (U * scales**2) @ U.T  # U diag(scales^2) U^T


def second_moment_of_S(cov: Tensor, n_ctx: int) -> Tensor:
    """``E[S^2]`` for ``S = (1/n) X^T X`` and Gaussian rows ``x ~ N(0, Sigma)``.

    ``E[S^2] = (1/n) E[x x^T x x^T] + (n-1)/n Sigma^2`` and, for a Gaussian,
    ``E[x x^T x x^T] = 2 Sigma^2 + tr(Sigma) Sigma``.
    """
    cov = _check_cov(cov)
    _check_n(n_ctx)
    n = n_ctx
    return (n + 1) / n * cov @ cov + torch.trace(cov) / n * cov


def optimal_preconditioner(cov: Tensor, n_ctx: int) -> Tensor:
    """``Gamma* = ((n+1)/n Sigma + tr(Sigma)/n I)^(-1)`` (Ahn et al. 2023, Thm. 1), float64.

    >>> optimal_preconditioner(torch.eye(5), 20).diagonal().round(decimals=4).tolist()
    [0.7692, 0.7692, 0.7692, 0.7692, 0.7692]
    """
    cov = _check_cov(cov)
    _check_n(n_ctx)
    n, d = n_ctx, cov.shape[0]
    A = (n + 1) / n * cov + torch.trace(cov) / n * torch.eye(d, dtype=torch.float64)
    return torch.linalg.inv(A)


def preconditioned_step_loss(gamma: Tensor, cov: Tensor, n_ctx: int) -> float:
    """Expected 0.5·MSE of one preconditioned GD step ``y_hat = x_q^T Gamma h`` (module docstring).

    For ``x ~ N(0, Sigma)``, ``w ~ N(0, I)``, no label noise; ``gamma`` may be any ``(d, d)`` matrix
    (``eta * I`` is one plain GD step with step size ``eta``).
    """
    cov = _check_cov(cov)
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    if tuple(gamma.shape) != tuple(cov.shape):
        raise ValueError(f"gamma must have shape {tuple(cov.shape)}, got {tuple(gamma.shape)}")
    require_finite("gamma", gamma)
    M = second_moment_of_S(cov, n_ctx)
    mse = torch.trace(gamma.T @ cov @ gamma @ M) - 2 * torch.trace(cov @ gamma @ cov) + torch.trace(cov)
    return 0.5 * mse.item()


def optimal_step_loss(cov: Tensor, n_ctx: int) -> float:
    """The loss of ``Gamma*``: ``0.5 (tr(Sigma) - tr(Sigma^2 Gamma*))``."""
    cov = _check_cov(cov)
    gamma = optimal_preconditioner(cov, n_ctx)
    return 0.5 * (torch.trace(cov) - torch.trace(cov @ cov @ gamma)).item()


def best_plain_step(cov: Tensor, n_ctx: int) -> tuple[float, float]:
    """The best plain step ``Gamma = eta I`` in closed form: ``(eta, loss)``.

    The loss is a quadratic ``a eta^2 - 2 b eta + c`` with ``a = tr(Sigma E[S^2])`` and
    ``b = tr(Sigma^2)``, so ``eta = b / a``.
    """
    cov = _check_cov(cov)
    a = torch.trace(cov @ second_moment_of_S(cov, n_ctx)).item()
    b = torch.trace(cov @ cov).item()
    eta = b / a
    return eta, preconditioned_step_loss(eta * torch.eye(cov.shape[0], dtype=torch.float64), cov, n_ctx)


def layer_preconditioner(layer: LinearSelfAttention) -> Tensor:
    """The preconditioner ``Gamma`` that a linear self-attention layer applies to ``h = (1/n) X^T y``.

    The query's prediction is minus its y-slot update, ``-(1/n) sum_{h,j} (z_q^T Q_h c_j) (P_h c_j)_y``
    with ``z_q = (x_q, 0)`` and ``c_j = (x_j, y_j)``. Its part linear in ``y`` is ``x_q^T Gamma h`` with

        Gamma = -sum_h ( P_h[y, y] Q_h[x, x] + Q_h[x, y] P_h[y, x] ) ,

    a product of Q and P entries, so it does not depend on how a trained layer splits the scale
    between them. (The other two parts, ``x_q^T Q_xx S P_yx`` and ``x_q^T Q_xy P_yy ||y||^2 / n``,
    only add error; a trained layer drives them to zero.) ``(d, d)``, detached.
    """
    if not isinstance(layer, LinearSelfAttention):
        raise TypeError(f"layer must be a LinearSelfAttention layer (e.g. model.layers[0]), got {type(layer).__name__}")
    Q, P = (m.detach() for m in layer.matrices())  # (H, D, D) each
    d = layer.d
    main = P[:, d, d, None, None] * Q[:, :d, :d]  # (H, d, d): the GD path y_j -> value, x_j -> score
    cross = Q[:, :d, d, None] * P[:, d, None, :d]  # (H, d, 1) * (H, 1, d): y_j -> score, x_j -> value
    return -(main + cross).sum(0)


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b||_F / ||b||_F``."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}")
    if not bool((b != 0).any()):
        raise ValueError("b must not be zero: the error relative to a zero reference is undefined")
    return ((a - b).norm() / b.norm()).item()


def distance_to_multiple(a: Tensor, b: Tensor) -> tuple[float, float]:
    """How far ``a`` is from the nearest multiple of ``b``: ``(min_c ||a - c b||_F / ||a||_F, c*)``.

    ``c* = <a, b> / ||b||^2`` and the distance is ``sqrt(1 - cos^2)``, ``cos`` the Frobenius cosine of
    ``a`` and ``b``: 0 when ``a`` is a multiple of ``b``, 1 when it is orthogonal to it. Ahn et al.'s
    critical points of the L-layer loss have every layer's preconditioner a multiple of ``Sigma^-1``.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}")
    if not bool((a != 0).any()) or not bool((b != 0).any()):
        raise ValueError("a and b must not be zero: the distance to a multiple of zero is undefined")
    c = (a * b).sum() / (b * b).sum()
    return ((a - c * b).norm() / a.norm()).item(), c.item()
