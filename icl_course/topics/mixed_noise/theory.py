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
           "geometric_spectrum", "layer_counts", "counts_figure", "two_level_coefficients", "two_level_prediction",
           "two_level_transformer", "two_level_task", "two_level_gaps"]


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


# --- Theorem 5.2: two layers solve ridge regression for two noise levels ---------------------------
#
# Vladymyrov et al. 2024, Theorem 5.2 (proof in their appendix A.5): inputs x_i ~ N(0, I/n) (so that
# X^T X -> I), y_i = <w, x_i> + xi_i with xi_i ~ N(0, sigma^2) and sigma one of two values sigma_1, sigma_2.
# As n -> oo, a two-layer linear transformer whose first layer has only w_yx (one GD step) and whose second
# has only w_yy (the adaptive rescaling) outputs ridge regression with lam = sigma^2 for either level.
#
# In our layers' convention (statistics with 1/n, ``discovered_algorithm``): layer 1 gives
# u_1 = a X^T y with a = -w_yx / n and residuals r = y - a X X^T y; layer 2 multiplies u by
# 1 + w_yy rho, rho = ||r||^2 / n -> sigma^2 (the signal part <w, x_i> has variance ||w||^2 / n -> 0).
# Ridge tends to X^T y / (1 + sigma^2), so (1 + w_yy sigma_k^2) a = 1 / (1 + sigma_k^2) for k = 1, 2:
# two linear equations in a and a w_yy, whose solution is
#
#     a = (1 + s_1 + s_2) / ((1 + s_1)(1 + s_2)),   w_yy = -1 / (1 + s_1 + s_2),   s_k = sigma_k^2.


def two_level_coefficients(sigma1: float, sigma2: float, n: int):
    """The two layers of the Theorem 5.2 construction for context length ``n``: ``[LayerCoefficients]``."""
    from .discovered_algorithm import LayerCoefficients

    for name, value in (("sigma1", sigma1), ("sigma2", sigma2)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    s1, s2 = sigma1**2, sigma2**2
    a = (1 + s1 + s2) / ((1 + s1) * (1 + s2))
    return [LayerCoefficients(0.0, 0.0, -n * a, 0.0), LayerCoefficients(0.0, 0.0, 0.0, -1 / (1 + s1 + s2))]


def two_level_prediction(xs: Tensor, ys: Tensor, x_query: Tensor, sigma1: float, sigma2: float) -> Tensor:
    """The construction's prediction in closed form: ``(1 + w_yy rho) a <X^T y, x_q>``, ``(B,)``."""
    if xs.ndim != 3 or ys.shape != xs.shape[:2] or x_query.shape != (xs.shape[0], xs.shape[2]):
        raise ValueError(f"xs must be (B, n, d), ys (B, n), x_query (B, d); got {tuple(xs.shape)}, "
                         f"{tuple(ys.shape)}, {tuple(x_query.shape)}")
    n = xs.shape[1]
    first, second = two_level_coefficients(sigma1, sigma2, n)
    a = -first.w_yx / n
    g = torch.einsum("bnd,bn->bd", xs, ys)  # X^T y, (B, d)
    r = ys - a * torch.einsum("bnd,bd->bn", xs, g)  # residuals after the GD step, (B, n)
    rescale = 1 + second.w_yy * r.pow(2).sum(-1) / n  # (B,)
    return rescale * a * torch.einsum("bd,bd->b", g, x_query)


def two_level_transformer(d: int, sigma1: float, sigma2: float, n: int):
    """A two-layer one-head DIAG ``LinearTransformer`` (float64) with the construction's weights:
    layer 1 ``q_x = 1, p_y = w_yx`` (only ``w_yx = p_y q_x`` nonzero), layer 2 ``q_y = 1, p_y = w_yy``."""
    from icl_course.linear_transformer import linear_transformer

    model = linear_transformer(d, n_layers=2, attention="diag").double()
    first, second = two_level_coefficients(sigma1, sigma2, n)
    with torch.no_grad():
        for layer, (q_x, q_y, p_y) in zip(model.layers, ((1.0, 0.0, first.w_yx), (0.0, 1.0, second.w_yy))):
            layer.q_x.fill_(q_x), layer.q_y.fill_(q_y), layer.p_x.zero_(), layer.p_y.fill_(p_y)
    return model.eval()


def two_level_task(n: int, d: int = 10):
    """The theorem's data with ``n`` context pairs: ``x ~ N(0, I/n)`` (query too), ``w ~ N(0, I)``; pass
    the noise level to :meth:`sample` through the task's ``noise``."""
    from icl_course.tasks import Gaussian, RegressionTask

    return lambda sigma: RegressionTask(d=d, n_ctx=n, inputs=Gaussian(std=1 / math.sqrt(n)), noise=float(sigma))


@torch.no_grad()
def two_level_gaps(sigma1: float = 1.0, sigma2: float = 3.0, ns=(100, 1_000, 10_000), d: int = 10,
                   n_seq: int = 200, seed: int = 0) -> dict:
    """How close the construction comes to ridge with ``lam = sigma^2`` as ``n`` grows (float64):
    for each level and each ``n``, ``mean |y_hat - y_ridge| / mean |y_ridge|`` over ``n_seq`` sequences
    of that level, beside the same gap of the single ridge with ``lam = sigma_other^2`` (what a learner
    that does not adapt to the level gets at best among the two)."""
    from icl_course.solvers import Ridge
    from icl_course.tasks import generator

    out = {"n": list(ns), "levels": [sigma1, sigma2], "construction": {}, "other_level_ridge": {}}
    for j, (sigma, other) in enumerate(((sigma1, sigma2), (sigma2, sigma1))):
        ours, wrong = [], []
        for k, n in enumerate(ns):
            b = two_level_task(n, d)(sigma).sample(n_seq, generator(seed + 100 * j + k), dtype=torch.float64)
            ridge = Ridge(sigma**2).predict(b.xs, b.ys, b.x_query)
            scale = ridge.abs().mean().item()
            got = two_level_prediction(b.xs, b.ys, b.x_query, sigma1, sigma2)
            ours.append((got - ridge).abs().mean().item() / scale)
            wrong.append((Ridge(other**2).predict(b.xs, b.ys, b.x_query) - ridge).abs().mean().item() / scale)
        out["construction"][f"{sigma:g}"], out["other_level_ridge"][f"{sigma:g}"] = ours, wrong
    return out
