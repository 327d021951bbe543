"""Checks for the exercises of chapter 2 (deeper linear transformers run preconditioned GD)."""

from __future__ import annotations

import torch

from icl_course.checking import Wrong, check, expect, expect_close, expect_shape
from icl_course.linear_transformer import linear_transformer
from icl_course.metrics import implicit_weights_per_layer
from icl_course.solvers import GradientDescent
from icl_course.tasks import Gaussian, RegressionTask

from . import preconditioners

__all__ = ["optimal_preconditioner", "preconditioned_gd", "implicit_models_per_layer"]


def _random_cov(d: int, gen: torch.Generator) -> torch.Tensor:
    """A random, clearly non-isotropic covariance (float64) with eigenvalues in [0.1, 2]."""
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    evals = 0.1 + 1.9 * torch.rand(d, generator=gen, dtype=torch.float64)
    return (U * evals) @ U.T


def _random_task(gen: torch.Generator) -> RegressionTask:
    d = int(torch.randint(2, 7, (1,), generator=gen))
    n_ctx = int(torch.randint(4, 25, (1,), generator=gen))
    return RegressionTask(d=d, n_ctx=n_ctx, inputs=Gaussian(cov=_random_cov(d, gen)))


@check("Exercise 1: the optimal preconditioner")
def optimal_preconditioner(student_fn, gen):
    d = int(torch.randint(2, 7, (1,), generator=gen))
    n = int(torch.randint(3, 40, (1,), generator=gen))
    cov = _random_cov(d, gen)
    gamma = student_fn(cov.clone(), n)
    expect(torch.is_tensor(gamma), f"Return a tensor, got {type(gamma).__name__}.")
    expect_shape("Gamma", gamma, (d, d))
    gamma = gamma.detach().double()
    want = preconditioners.optimal_preconditioner(cov, n)
    eye = torch.eye(d, dtype=torch.float64)
    trace = torch.trace(cov)
    if torch.allclose(gamma, torch.linalg.inv(cov), rtol=1e-6, atol=1e-9):
        raise Wrong(
            "You returned Sigma^-1: the best preconditioner for infinitely many context points. With n points "
            "the estimate S of Sigma is noisy, and the fourth moment E[S^2] adds (1/n)(Sigma + tr(Sigma) I) to Sigma."
        )
    if torch.allclose(gamma, torch.linalg.inv(want), rtol=1e-6, atol=1e-9):
        raise Wrong("You returned (n+1)/n Sigma + tr(Sigma)/n I itself; Gamma* is its inverse.")
    if torch.allclose(gamma, torch.linalg.inv(cov + trace / n * eye), rtol=1e-6, atol=1e-9):
        raise Wrong(
            "Close: the Sigma term needs the factor (n+1)/n (from E[x x^T x x^T] = 2 Sigma^2 + tr(Sigma) Sigma)."
        )
    if torch.allclose(gamma, torch.linalg.inv((n + 1) / n * cov + d / n * eye), rtol=1e-6, atol=1e-9):
        raise Wrong("The shrinkage term is tr(Sigma)/n, not d/n (they agree only when tr(Sigma) = d).")
    expect_close("Gamma", gamma, want, rtol=1e-5, atol=1e-8)


@check("Exercise 2: preconditioned GD as a solver")
def preconditioned_gd(student_cls, gen):
    task = _random_task(gen)
    d = task.d
    # A non-symmetric preconditioner, so that Gamma and Gamma^T give different answers.
    gamma = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    eta = float(torch.empty(1).uniform_(0.2, 0.6, generator=gen))
    n_steps = int(torch.randint(2, 5, (1,), generator=gen))
    batch = task.sample(32, gen, dtype=torch.float64)
    solver = student_cls(eta, n_steps, gamma.clone())
    expect(hasattr(solver, "predict"), "Your class needs a method predict(xs, ys, x_query).")
    got = solver.predict(batch.xs, batch.ys, batch.x_query)
    expect(torch.is_tensor(got), f"predict should return a tensor, got {type(got).__name__}.")
    expect_shape("predict(xs, ys, x_query)", got, (len(batch),))
    got = got.detach().double()

    def reference(**changes):
        args = {"eta": eta, "n_steps": n_steps, "preconditioner": gamma} | changes
        return GradientDescent(**args).predict(batch.xs, batch.ys, batch.x_query)

    want = reference()
    tol = 1e-5 * (1 + want.abs().max().item())

    def same(a):
        return torch.allclose(got, a, rtol=0, atol=tol)

    if same(reference(preconditioner=gamma.T)):
        raise Wrong("You applied Gamma^T. The update is w <- w - eta * Gamma @ grad, with grad a column vector.")
    if same(reference(preconditioner=None)):
        raise Wrong("Your predictions are those of plain GD: the preconditioner is never applied.")
    if same(reference(eta=eta * batch.xs.shape[1])):
        raise Wrong("Your gradient misses the 1/n: L(w) = 1/(2n) ||X w - y||^2.")
    if same(reference(eta=-eta)):
        raise Wrong("Your step goes uphill: subtract eta * Gamma @ grad.")
    for k in (n_steps - 1, n_steps + 1):
        if k >= 0 and same(reference(n_steps=k)):
            raise Wrong(f"Your solver takes {k} steps instead of n_steps = {n_steps}.")
    expect_close("predict(xs, ys, x_query)", got, want, rtol=1e-5, atol=tol)


@check("Exercise 3: the implicit linear model after every layer")
def implicit_models_per_layer(student_fn, gen):
    task = _random_task(gen)
    n_layers = int(torch.randint(2, 5, (1,), generator=gen))
    seed = int(torch.randint(2**31, (1,), generator=gen))
    # init_std 0.05 keeps the implicit weights O(1) (0.2 gave up to 1e38 over 200 draws, and feedback in 1e11s)
    model = linear_transformer(task.d, n_layers=n_layers, n_heads=2, init_std=0.05, seed=seed).double()
    batch = task.sample(16, gen, dtype=torch.float64)
    w = student_fn(model, batch.xs, batch.ys, batch.x_query)
    expect(torch.is_tensor(w), f"Return a tensor, got {type(w).__name__}.")
    want = implicit_weights_per_layer(model, batch.xs, batch.ys, batch.x_query)  # (L, B, d)
    if tuple(w.shape) == tuple(want.shape[1:]):
        raise Wrong(f"Return one implicit model per layer, shape (L, B, d) = {tuple(want.shape)}, not only the last.")
    expect_shape("w", w, tuple(want.shape))
    w = w.detach().double()
    if n_layers > 1 and torch.allclose(w, want.flip(0), rtol=1e-6, atol=1e-9):
        raise Wrong("Your layers are in reverse order: row 0 should be the read-out after the first layer.")
    expect_close("w", w, want, rtol=1e-6, atol=1e-9, hint="Row l is d y_hat_l / d x_q, read out after layer l+1.")
