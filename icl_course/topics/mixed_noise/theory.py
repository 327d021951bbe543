"""How many GD++ layers noiseless least squares needs, as a function of the condition number.

Vladymyrov et al. 2024 (Theorem 5.1) show that GD++ reaches error ``eps`` in
``O(log kappa + log log (1/eps))`` layers, where plain GD needs ``O(kappa log (1/eps))``. This module
checks the shape of that statement numerically, in float64.

GD++ with its own ``(eta_k, gamma_k)`` in layer ``k`` (``icl_course.solvers.GDPlusPlus`` uses one pair
for all layers) takes a GD step on the current inputs and then moves every input, query included, by
``I - gamma_k S_k`` with ``S_k = (1/n) X_k^T X_k``. Every matrix involved is a polynomial in
``S = (1/n) X^T X``, so everything happens eigenvalue by eigenvalue: an eigenvalue ``lam`` of ``S``
is ``s_k(lam)`` in ``S_k``, with

    s_0 = lam,    s_{k+1} = s_k (1 - gamma_k s_k)^2,

and on noiseless data ``y = X w*`` the weight vector after ``L`` layers is ``w* - e_L(S) w*`` with

    e_L(lam) = prod_{k < L} (1 - eta_k s_k(lam)).

``gdpp_weights`` runs the layers on matrices; ``relative_errors`` runs the scalar recursion; the tests
check that they agree. ``layers_needed`` counts the layers of a per-layer choice of ``(eta_k, gamma_k)``
that is ours, not the paper's construction: ``gamma_k`` minimises the condition number of ``S_{k+1}``,
``eta_k = 2 / (s_min + s_max)`` is the best GD step for the current spectrum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gdpp_weights", "relative_errors", "best_gamma", "greedy_schedule", "layers_needed", "gd_layers_needed",
           "geometric_spectrum", "layer_counts", "counts_figure"]


def gdpp_weights(xs: Tensor, ys: Tensor, etas, gammas) -> Tensor:
    """GD++'s weight vector after ``len(etas)`` layers with per-layer ``(eta_k, gamma_k)``: ``(B, d)``."""
    if len(etas) != len(gammas):
        raise ValueError(f"etas and gammas must have the same length, got {len(etas)} and {len(gammas)}")
    if xs.ndim != 3 or ys.shape != xs.shape[:2]:
        raise ValueError(f"xs must have shape (B, n, d) and ys (B, n), got {tuple(xs.shape)} and {tuple(ys.shape)}")
    B, n, d = xs.shape
    eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
    X, r, T = xs, ys, eye.expand(B, d, d)
    w = torch.zeros_like(xs[:, 0])
    for eta, gamma in zip(etas, gammas):
        h = torch.einsum("bnd,bn->bd", X, r) / n
        w = w + eta * torch.einsum("bij,bi->bj", T, h)
        r = r - eta * torch.einsum("bnd,bd->bn", X, h)
        M = eye - gamma * (X.transpose(1, 2) @ X) / n
        X, T = X @ M, M @ T
    return w


def relative_errors(lams: Tensor, etas, gammas) -> Tensor:
    """``e_L(lam)`` for every eigenvalue ``lam`` of ``S`` (any shape), after the layers ``(etas, gammas)``."""
    if len(etas) != len(gammas):
        raise ValueError(f"etas and gammas must have the same length, got {len(etas)} and {len(gammas)}")
    s, e = lams.double(), torch.ones_like(lams, dtype=torch.float64)
    for eta, gamma in zip(etas, gammas):
        e = e * (1 - eta * s)
        s = s * (1 - gamma * s) ** 2
    return e


def _conditions(s: Tensor, gammas: Tensor) -> Tensor:
    """The condition number of ``s (1 - gamma s)^2`` for every ``gamma`` of ``gammas``."""
    t = s[None, :] * (1 - gammas[:, None] * s[None, :]) ** 2
    return t.max(-1).values / t.min(-1).values


def best_gamma(s: Tensor, n_grid: int = 400) -> float:
    """The ``gamma`` in ``[0, 1 / max(s))`` that makes ``s (1 - gamma s)^2`` best conditioned (grid, then refined)."""
    s = s.double().flatten()
    grid = torch.linspace(0, 0.999, n_grid, dtype=torch.float64) / s.max()
    i = int(_conditions(s, grid).argmin())
    fine = torch.linspace(grid[max(i - 1, 0)].item(), grid[min(i + 1, n_grid - 1)].item(), n_grid, dtype=torch.float64)
    return fine[int(_conditions(s, fine).argmin())].item()


def greedy_schedule(lams: Tensor, n_layers: int) -> tuple[list[float], list[float]]:
    """Per-layer ``(etas, gammas)``: ``gamma_k`` from :func:`best_gamma`, ``eta_k = 2 / (s_min + s_max)``."""
    s, etas, gammas = lams.double(), [], []
    for _ in range(n_layers):
        etas.append(2 / (s.min() + s.max()).item())
        gammas.append(best_gamma(s))
        s = s * (1 - gammas[-1] * s) ** 2
    return etas, gammas


def layers_needed(lams: Tensor, eps: float, max_layers: int = 200) -> int:
    """The fewest layers of :func:`greedy_schedule` after which every ``|e_L(lam)| <= eps``."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    s, e = lams.double(), torch.ones_like(lams, dtype=torch.float64)
    for layer in range(1, max_layers + 1):
        eta, gamma = 2 / (s.min() + s.max()).item(), best_gamma(s)
        e = e * (1 - eta * s)
        s = s * (1 - gamma * s) ** 2
        if e.abs().max().item() <= eps:
            return layer
    raise RuntimeError(f"no convergence to eps={eps} within {max_layers} layers")


def gd_layers_needed(kappa: float, eps: float) -> int:
    """Plain GD with its best constant step on a spectrum of condition number ``kappa``: every step
    shrinks the worst error by ``(kappa - 1) / (kappa + 1)``."""
    if not kappa > 1:
        raise ValueError(f"kappa must be > 1, got {kappa!r}")
    return math.ceil(math.log(eps) / math.log((kappa - 1) / (kappa + 1)))


def geometric_spectrum(kappa: float, d: int = 10) -> Tensor:
    """``d`` eigenvalues geometric from ``1 / kappa`` to 1 (float64)."""
    if not kappa >= 1:
        raise ValueError(f"kappa must be >= 1, got {kappa!r}")
    return torch.logspace(-math.log10(kappa), 0, d, dtype=torch.float64)


def layer_counts(kappas=(1e1, 1e2, 1e3, 1e4, 1e5, 1e6), epsilons=(1e-1, 1e-2, 1e-3, 1e-6, 1e-9, 1e-12),
                 eps: float = 1e-6, kappa: float = 100.0, d: int = 10) -> dict:
    """GD++ (greedy schedule) and GD layer counts against ``kappa`` at ``eps``, and against ``eps`` at
    ``kappa``, on a geometric spectrum of ``d`` eigenvalues; with the least-squares fit
    ``layers ~ a log10(kappa) + b log2(log10(1/eps)) + c`` over the whole grid."""
    grid = [(k, e) for k in kappas for e in epsilons]
    counts = {(k, e): layers_needed(geometric_spectrum(k, d), e) for k, e in grid}
    A = torch.tensor([[math.log10(k), math.log2(math.log10(1 / e)), 1.0] for k, e in grid], dtype=torch.float64)
    y = torch.tensor([float(counts[g]) for g in grid], dtype=torch.float64)
    coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    return {
        "kappas": list(kappas), "epsilons": list(epsilons), "eps": eps, "kappa": kappa, "d": d,
        "gdpp_vs_kappa": [layers_needed(geometric_spectrum(k, d), eps) for k in kappas],
        "gd_vs_kappa": [gd_layers_needed(k, eps) for k in kappas],
        "gdpp_vs_eps": [layers_needed(geometric_spectrum(kappa, d), e) for e in epsilons],
        "gd_vs_eps": [gd_layers_needed(kappa, e) for e in epsilons],
        "fit": {"per_decade_of_kappa": coef[0].item(), "per_doubling_of_digits": coef[1].item(),
                "constant": coef[2].item(), "max_abs_residual": (A @ coef - y).abs().max().item()},
    }


def counts_figure(counts: dict):
    """Layers to reach ``eps`` against ``kappa`` (left) and against ``eps`` (right), GD++ and plain GD."""
    from icl_course import plots

    fig, (left, right) = plots.figure(ncols=2, width=4.2)
    for ax, x, key, label in ((left, counts["kappas"], "kappa", f"eps = {counts['eps']:g}"),
                              (right, [1 / e for e in counts["epsilons"]], "eps", f"kappa = {counts['kappa']:g}")):
        ax.plot(x, counts[f"gdpp_vs_{key}"], marker="o", label="GD++ (greedy per-layer gamma, eta)")
        ax.plot(x, counts[f"gd_vs_{key}"], marker="s", ls="--", color="0.4", label="GD (best constant step)")
        ax.set(xscale="log", yscale="log", ylabel="layers needed", title=label)
        ax.legend(fontsize=7)
    left.set_xlabel("condition number kappa")
    right.set_xlabel("1 / eps")
    return fig
