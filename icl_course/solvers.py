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
from .runtime import require_finite
from .tokens import check_shapes

__all__ = ["LinearSolver", "GradientDescent", "GDPlusPlus", "LeastSquares", "Ridge", "tune_step_size", "tune_gdpp"]


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
        require_finite("GradientDescent: eta", self.eta)
        if not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0, got {self.n_steps!r}")
        if self.preconditioner is not None:
            gamma = torch.as_tensor(self.preconditioner)
            if gamma.ndim != 2 or gamma.shape[0] != gamma.shape[1]:
                raise ValueError(f"GradientDescent: preconditioner must be a square matrix, got shape {tuple(gamma.shape)}")
            require_finite("GradientDescent: preconditioner", gamma)

    def weights(self, xs, ys):
        n, d = xs.shape[1:]
        w = torch.zeros_like(xs[:, 0])  # (B, d)
        gamma = None if self.preconditioner is None else torch.as_tensor(self.preconditioner).to(xs)
        if gamma is not None and tuple(gamma.shape) != (d, d):
            raise ValueError(f"GradientDescent: preconditioner must have shape (d, d) = {(d, d)}, got {tuple(gamma.shape)}")
        for _ in range(self.n_steps):
            residual = torch.einsum("bnd,bd->bn", xs, w) - ys  # (B, n)
            grad = torch.einsum("bnd,bn->bd", xs, residual) / n  # (B, d)
            w = w - self.eta * (grad if gamma is None else grad @ gamma.T)
        return w


@dataclass
class GDPlusPlus(LinearSolver):
    """GD++ (von Oswald et al. 2023, Sec. 4): GD that also preconditions every input, query included.

    Step ``k`` takes one GD step on the current inputs and then moves every input by the
    inputs' own second-moment matrix ``S_k = (1/n) X_k^T X_k``:

        h_k = (1/n) X_k^T r_k,   y_hat += eta <x_q^(k), h_k>,   r_{k+1} = r_k - eta X_k h_k,
        x^(k+1) = (I - gamma S_k) x^(k)   for every context input and the query.

    This is what a GD++ linear-attention layer computes (``GDPPAttention`` with ``w_xx = -gamma``,
    ``w_yx = -eta``; ``gdpp_transformer`` builds it). An eigenvalue ``lam`` of ``S`` becomes
    ``lam (1 - gamma lam)^2``, which shrinks the large ones most: the inputs become better
    conditioned with every step. ``gamma = 0`` is plain GD. The prediction stays linear in the query,
    ``y_hat = <w, x_q>`` with ``w = eta sum_k T_k^T h_k`` and ``x_q^(k) = T_k x_q``.
    """

    eta: float
    gamma: float
    n_steps: int = 1

    def __post_init__(self):
        require_finite("GDPlusPlus: eta", self.eta)
        require_finite("GDPlusPlus: gamma", self.gamma)
        if not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0, got {self.n_steps!r}")

    def weights(self, xs, ys):
        return _gdpp_weights(xs, ys, self.eta, self.gamma, self.n_steps)


def _gdpp_weights(xs, ys, eta, gamma, n_steps: int) -> Tensor:
    """GD++'s ``w`` (``GDPlusPlus``), unchecked: ``tune_gdpp`` differentiates it in ``(eta, gamma)``."""
    B, n, d = xs.shape
    eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
    X, r = xs, ys  # (B, n, d) current inputs, (B, n) current residuals
    T = eye.expand(B, d, d)  # (B, d, d): the query after k steps is T_k x_q
    w = torch.zeros_like(xs[:, 0])  # (B, d)
    for _ in range(n_steps):
        h = torch.einsum("bnd,bn->bd", X, r) / n  # (B, d): minus the gradient at the current fit
        w = w + eta * torch.einsum("bij,bi->bj", T, h)  # += eta T^T h
        r = r - eta * torch.einsum("bnd,bd->bn", X, h)  # (B, n)
        M = eye - gamma * (X.transpose(1, 2) @ X) / n  # (B, d, d), symmetric: I - gamma S_k
        X = X @ M  # every row x_i <- M x_i
        T = M @ T
    return w


class LeastSquares(LinearSolver):
    """Ordinary least squares (the minimum-norm solution when ``n < d``)."""

    def weights(self, xs, ys):
        return (torch.linalg.pinv(xs) @ ys[..., None])[..., 0]  # (B, d, n) @ (B, n, 1) -> (B, d)


@dataclass
class Ridge(LinearSolver):
    """Ridge regression ``w = (X^T X + lam I)^{-1} X^T y``; ``lam`` a number or one per sequence (B,)."""

    lam: float | Tensor

    def __post_init__(self):
        require_finite("Ridge: lam", self.lam, at_least=0)
        if torch.is_tensor(self.lam) and self.lam.ndim > 1:
            raise ValueError(f"Ridge: lam must be a number or one per sequence, shape (B,), got shape {tuple(self.lam.shape)}")

    def weights(self, xs, ys):
        lam = torch.as_tensor(self.lam).to(xs)
        B, n, d = xs.shape
        if lam.ndim == 1 and lam.shape[0] != B:
            raise ValueError(f"Ridge: lam must be a number or one per sequence, shape (B,) = ({B},), got shape {tuple(lam.shape)}")
        if n < d and bool((lam == 0).any()):
            raise ValueError(
                f"Ridge: lam = 0 with fewer context points than dimensions (n={n} < d={d}) leaves X^T X singular: "
                "use a positive lam, or LeastSquares() for the minimum-norm solution"
            )
        gram = xs.transpose(1, 2) @ xs  # (B, d, d)
        eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
        A = gram + lam.reshape(-1, 1, 1) * eye
        try:
            return torch.linalg.solve(A, torch.einsum("bnd,bn->bd", xs, ys))
        except torch.linalg.LinAlgError as error:
            raise ValueError(
                "Ridge: X^T X + lam I is singular for some sequence (lam = 0 and repeated or dependent inputs?): "
                "use a positive lam, or LeastSquares() for the minimum-norm solution"
            ) from error


def tune_step_size(
    batch, n_steps: int = 1, preconditioner: Tensor | None = None, bounds: tuple[float, float] = (1e-3, 1e3)
) -> tuple[float, float]:
    """Line search for the GD step size with the lowest 0.5·MSE on ``batch``: ``(eta, loss)``.

    A log-spaced grid over ``bounds`` brackets the minimum, then golden-section search narrows it
    to a relative width of 1e-4. Steps that diverge count as infinite loss.
    """
    lo, hi = _check_bounds(bounds)

    def loss_at(log_eta: float) -> float:
        y_hat = GradientDescent(math.exp(log_eta), n_steps, preconditioner).predict(batch.xs, batch.ys, batch.x_query)
        value = mse_loss(y_hat, batch.y_query).item()
        return value if math.isfinite(value) else math.inf

    grid = torch.linspace(math.log(lo), math.log(hi), 61).tolist()
    losses = [loss_at(g) for g in grid]
    i = min(range(len(grid)), key=losses.__getitem__)
    log_eta = golden_section(loss_at, grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], tol=1e-4)
    return math.exp(log_eta), loss_at(log_eta)


def _check_bounds(bounds) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low < high``, both finite (the ends of a log-spaced search)."""
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high, both finite, got {bounds}")
    return lo, hi


def golden_section(f, a: float, b: float, tol: float) -> float:
    """The minimiser of a unimodal ``f`` on ``[a, b]``, by golden-section search to width ``tol``."""
    ratio = (math.sqrt(5) - 1) / 2
    while b - a > tol:
        c, e = b - ratio * (b - a), a + ratio * (b - a)
        if f(c) < f(e):
            b = e
        else:
            a = c
    return (a + b) / 2



def tune_gdpp(batch, n_steps: int = 1, max_iter: int = 50) -> tuple[float, float, float]:
    """The GD++ step size and input-preconditioning rate with the lowest 0.5·MSE on ``batch``.

    Returns ``(eta, gamma, loss)``, one pair shared by all ``n_steps`` steps. Starts from the best
    plain GD step (``tune_step_size``, ``gamma = 0``) and refines ``(log eta, gamma)`` by L-BFGS in
    float64; the line search only accepts decreases, so the result is never worse than plain GD on
    ``batch``.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    b = batch.to(dtype=torch.float64)
    eta0, loss0 = tune_step_size(b, n_steps)
    params = torch.tensor([math.log(eta0), 0.0], dtype=torch.float64, requires_grad=True)

    def loss_fn():
        y_hat = torch.einsum("bd,bd->b", _gdpp_weights(b.xs, b.ys, params[0].exp(), params[1], n_steps), b.x_query)
        return mse_loss(y_hat, b.y_query)

    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        loss = loss_fn().item()
    if not math.isfinite(loss) or loss > loss0:  # cannot happen with strong Wolfe, but stay safe
        return eta0, 0.0, loss0
    return math.exp(params[0].item()), params[1].item(), loss
