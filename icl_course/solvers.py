"""Classical in-context learners, called exactly like a trained transformer.

Each solver fits a linear model to one sequence's context ``(X, y)`` and predicts the query:
``solver.predict(xs, ys, x_query) -> y_hat``, the same call as ``LinearTransformer.predict``, so an
evaluation is a loop ``for model in [trained, *baselines]``. ``solver.weights(xs, ys)`` returns the
fitted ``w`` of every sequence, shape ``(B, d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .metrics import mse_loss
from .tokens import check_shapes

__all__ = ["GradientDescent", "LeastSquares", "Ridge", "tune_step_size"]


class LinearSolver:
    """Shared predictor call of the solvers: ``y_hat = <w(X, y), x_q>``."""

    def weights(self, xs: Tensor, ys: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        check_shapes(xs, ys, x_query)
        return torch.einsum("bd,bd->b", self.weights(xs, ys), x_query)


@dataclass
class GradientDescent(LinearSolver):
    """``n_steps`` of (preconditioned) gradient descent on ``L(w) = 1/(2n) ||X w - y||^2`` from 0.

    ``w_{k+1} = w_k - eta * Gamma * (1/n) X^T (X w_k - y)``, with ``Gamma = I`` unless a
    ``preconditioner`` is given. One step from 0 is ``w_1 = (eta/n) X^T y``: what one layer of linear
    self-attention computes (von Oswald et al. 2023).
    """

    eta: float
    n_steps: int = 1
    preconditioner: Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0, got {self.n_steps!r}")

    def weights(self, xs, ys):
        n = xs.shape[1]
        w = torch.zeros_like(xs[:, 0])  # (B, d)
        gamma = None if self.preconditioner is None else torch.as_tensor(self.preconditioner).to(xs)
        for _ in range(self.n_steps):
            residual = torch.einsum("bnd,bd->bn", xs, w) - ys  # (B, n)
            grad = torch.einsum("bnd,bn->bd", xs, residual) / n  # (B, d)
            w = w - self.eta * (grad if gamma is None else grad @ gamma.T)
        return w


class LeastSquares(LinearSolver):
    """Ordinary least squares (the minimum-norm solution when ``n < d``)."""

    def weights(self, xs, ys):
        return (torch.linalg.pinv(xs) @ ys[..., None])[..., 0]  # (B, d, n) @ (B, n, 1) -> (B, d)


@dataclass
class Ridge(LinearSolver):
    """Ridge regression ``w = (X^T X + lam I)^{-1} X^T y``; ``lam`` a number or one per sequence (B,)."""

    lam: float | Tensor

    def weights(self, xs, ys):
        lam = torch.as_tensor(self.lam).to(xs)
        if (lam < 0).any():
            raise ValueError("Ridge lam must be >= 0")
        d = xs.shape[-1]
        gram = xs.transpose(1, 2) @ xs  # (B, d, d)
        eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
        A = gram + lam.reshape(-1, 1, 1) * eye
        return torch.linalg.solve(A, torch.einsum("bnd,bn->bd", xs, ys))


def tune_step_size(
    batch, n_steps: int = 1, preconditioner: Tensor | None = None, bounds: tuple[float, float] = (1e-3, 1e3)
) -> tuple[float, float]:
    """Line search for the GD step size with the lowest 0.5·MSE on ``batch``: ``(eta, loss)``.

    A log-spaced grid over ``bounds`` brackets the minimum, then golden-section search narrows it
    to a relative width of 1e-4. Steps that diverge count as infinite loss.
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")

    def loss_at(log_eta: float) -> float:
        y_hat = GradientDescent(math.exp(log_eta), n_steps, preconditioner).predict(batch.xs, batch.ys, batch.x_query)
        value = mse_loss(y_hat, batch.y_query).item()
        return value if math.isfinite(value) else math.inf

    grid = torch.linspace(math.log(lo), math.log(hi), 61).tolist()
    losses = [loss_at(g) for g in grid]
    i = min(range(len(grid)), key=losses.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    while b - a > 1e-4:
        c, e = b - ratio * (b - a), a + ratio * (b - a)
        if loss_at(c) < loss_at(e):
            b = e
        else:
            a = c
    log_eta = (a + b) / 2
    return math.exp(log_eta), loss_at(log_eta)

