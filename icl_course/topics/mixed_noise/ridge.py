"""Ridge regression baselines for sequences with different noise levels (Vladymyrov et al. 2024, Sec. 4).

With ``w ~ N(0, I)`` and noise ``N(0, sigma^2)`` the Bayes-optimal prediction is ridge regression
with ``lam = sigma^2``. A learner that does not know ``sigma`` must pick ``lam`` from the data:

- ``OracleRidge(sigma)``: knows every sequence's ``sigma`` (the reference of the adjusted loss).
- ``ConstRR(lam)``: one ``lam`` for every sequence, tuned for the whole noise distribution.
- ``AdaRR()``: plugs in the noise estimate ``sigma_hat^2 = ||y - X w_ols||^2 / (n - d)``.
- ``TunedRR(cap, scale)``: ``lam = scale * min(sigma_hat^2, cap)``, with ``cap`` and ``scale`` tuned.

All are called like every learner of the package: ``predict(xs, ys, x_query) -> y_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from icl_course.runtime import require_finite
from icl_course.solvers import LinearSolver, Ridge, _check_bounds, golden_section
from icl_course.tokens import check_shapes

__all__ = ["OracleRidge", "ConstRR", "AdaRR", "TunedRR", "noise_estimate", "tune_const_ridge", "tune_tuned_ridge"]


def noise_estimate(xs: Tensor, ys: Tensor) -> Tensor:
    """The unbiased noise variance estimate ``||y - X w_ols||^2 / (n - d)`` of every sequence: ``(B,)``.

    Needs ``n > d`` (more context pairs than dimensions), else the least-squares fit is exact.
    """
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape (B, n, d), got {tuple(xs.shape)}")
    B, n, d = xs.shape
    if n <= d:
        raise ValueError(f"the noise estimate needs n > d context pairs, got n={n}, d={d}")
    w_ols = torch.linalg.lstsq(xs, ys[..., None]).solution[..., 0]  # (B, d)
    residual = ys - torch.einsum("bnd,bd->bn", xs, w_ols)  # (B, n)
    return residual.pow(2).sum(-1) / (n - d)


class OracleRidge(LinearSolver):
    """Ridge with ``lam = sigma^2`` per sequence: the posterior mean under ``w ~ N(0, I)``."""

    def __init__(self, sigma: Tensor | float):
        self.sigma = require_finite("OracleRidge: sigma", torch.as_tensor(sigma), at_least=0)

    def weights(self, xs, ys):
        return Ridge(self.sigma.to(xs) ** 2).weights(xs, ys)


@dataclass
class ConstRR(LinearSolver):
    """Ridge with one ``lam`` for every sequence (tune it with ``tune_const_ridge``)."""

    lam: float

    def __post_init__(self):
        require_finite("ConstRR: lam", self.lam, at_least=0)

    def weights(self, xs, ys):
        return Ridge(self.lam).weights(xs, ys)


@dataclass
class TunedRR(LinearSolver):
    """Ridge with ``lam = scale * min(sigma_hat^2, cap)`` (``noise_estimate``); ``AdaRR`` is ``cap=inf, scale=1``."""

    cap: float = math.inf
    scale: float = 1.0

    def __post_init__(self):
        if not self.cap > 0:
            raise ValueError(f"TunedRR cap must be > 0, got {self.cap}")
        require_finite("TunedRR: scale", self.scale, above=0)

    def weights(self, xs, ys):
        lam = self.scale * noise_estimate(xs, ys).clamp(max=self.cap)  # (B,)
        return Ridge(lam).weights(xs, ys)


class AdaRR(TunedRR):
    """Ridge with the plug-in noise estimate ``lam = sigma_hat^2``."""

    def __init__(self):
        super().__init__(cap=math.inf, scale=1.0)

    def __repr__(self):
        return "AdaRR()"


# --- tuning: every lam at once from one eigendecomposition per sequence --------------------------


class _Spectrum:
    """Ridge predictions for any ``lam`` in O(d): ``y_hat(lam) = sum_k a_k / (e_k + lam)``.

    With ``X^T X = V diag(e) V^T``, ``w(lam) = V diag(1 / (e + lam)) V^T X^T y``, so
    ``a_k = (V^T x_q)_k (V^T X^T y)_k``. Float64 throughout.
    """

    def __init__(self, batch):
        check_shapes(batch.xs, batch.ys, batch.x_query)
        xs, ys, xq = (t.double().cpu() for t in (batch.xs, batch.ys, batch.x_query))
        e, V = torch.linalg.eigh(xs.transpose(1, 2) @ xs)  # (B, d), (B, d, d)
        b = torch.einsum("bdk,bnd,bn->bk", V, xs, ys)  # V^T X^T y
        self.e, self.a = e, torch.einsum("bdk,bd->bk", V, xq) * b  # (B, d) each
        self.y_query = batch.y_query.double().cpu()
        self.sigma_hat2 = noise_estimate(xs, ys) if xs.shape[1] > xs.shape[2] else None

    def losses(self, lam: Tensor) -> Tensor:
        """0.5·MSE for every column of ``lam`` ((B, K) per sequence, or (K,) shared): ``(K,)``."""
        lam = lam.double()
        lam = lam.expand(self.e.shape[0], -1) if lam.ndim == 1 else lam  # (B, K)
        pred = (self.a[:, None, :] / (self.e[:, None, :] + lam[..., None])).sum(-1)  # (B, K)
        return 0.5 * (pred - self.y_query[:, None]).pow(2).mean(0)


def tune_const_ridge(batch, bounds: tuple[float, float] = (1e-3, 1e3)) -> ConstRR:
    """The ``ConstRR`` whose ``lam`` has the lowest 0.5·MSE on ``batch`` (log grid, then golden section)."""
    lo, hi = _check_bounds(bounds)
    spec = _Spectrum(batch)
    grid = torch.linspace(math.log(lo), math.log(hi), 81, dtype=torch.float64)
    losses = spec.losses(grid.exp())
    i = int(losses.argmin())
    a, b = grid[max(i - 1, 0)].item(), grid[min(i + 1, len(grid) - 1)].item()
    loss_at = lambda t: spec.losses(torch.tensor([math.exp(t)], dtype=torch.float64)).item()  # noqa: E731
    return ConstRR(math.exp(golden_section(loss_at, a, b, tol=1e-5)))


def tune_tuned_ridge(batch, n_grid: int = 21) -> TunedRR:
    """The ``TunedRR`` whose ``(cap, scale)`` has the lowest 0.5·MSE on ``batch``.

    A grid over ``scale`` in [0.1, 10] (log) and ``cap`` at quantiles of the batch's ``sigma_hat^2``
    (plus no cap), then a finer grid around the best point.
    """
    if not isinstance(n_grid, int) or n_grid < 2:
        raise ValueError(f"n_grid must be an integer >= 2, got {n_grid!r}")
    spec = _Spectrum(batch)
    if spec.sigma_hat2 is None:
        raise ValueError("tune_tuned_ridge needs n > d context pairs")
    s2 = spec.sigma_hat2  # (B,)

    def search(caps: Tensor, scales: Tensor) -> tuple[float, float, float]:
        best = (math.inf, math.inf, 1.0)
        for cap in caps.tolist():
            lam = scales[None, :] * s2.clamp(max=cap)[:, None]  # (B, K)
            losses = spec.losses(lam)
            j = int(losses.argmin())
            if losses[j].item() < best[0]:
                best = (losses[j].item(), cap, scales[j].item())
        return best

    quantiles = torch.quantile(s2, torch.linspace(0.5, 1.0, n_grid - 1, dtype=torch.float64))
    caps = torch.cat([quantiles, torch.tensor([math.inf], dtype=torch.float64)])
    _, cap, scale = search(caps, torch.logspace(-1, 1, n_grid, dtype=torch.float64))
    if math.isfinite(cap):  # refine both around the best point
        caps = cap * torch.logspace(-0.1, 0.1, n_grid, dtype=torch.float64)
    else:
        caps = torch.tensor([math.inf], dtype=torch.float64)
    _, cap, scale = search(caps, scale * torch.logspace(-0.05, 0.05, n_grid, dtype=torch.float64))
    return TunedRR(cap=cap, scale=scale)
