"""Checks for the exercises of the mixed-noise chapter (momentum and adaptive rescaling)."""

from __future__ import annotations

import math

import torch

from icl_course.checking import Wrong, check, expect, expect_close, expect_shape
from icl_course.linear_transformer import DiagAttention
from icl_course.metrics import evaluate
from icl_course.tasks import Gaussian, RegressionTask, Uniform
from icl_course.tokens import make_tokens

from .ridge import ConstRR, tune_const_ridge
from .ridge import noise_estimate as reference_noise_estimate

__all__ = ["noise_estimate", "const_ridge_penalty", "discovered_layer"]


def _random_task(gen: torch.Generator, sigma_max: float = 5.0) -> RegressionTask:
    d = int(torch.randint(2, 8, (1,), generator=gen))
    n_ctx = d + int(torch.randint(3, 15, (1,), generator=gen))  # n > d, as the estimate needs
    return RegressionTask(d=d, n_ctx=n_ctx, inputs=Gaussian(), noise=Uniform(0.0, sigma_max))


@check("Exercise 1: AdaRR's noise estimate")
def noise_estimate(student_fn, gen):
    task = _random_task(gen)
    batch = task.sample(64, gen, dtype=torch.float64)
    got = student_fn(batch.xs, batch.ys)
    B, n, d = batch.xs.shape
    expect_shape("sigma2_hat", got, (B,))
    got = got.detach().double()
    want = reference_noise_estimate(batch.xs, batch.ys)
    if torch.allclose(got, want * (n - d) / n, rtol=1e-5):
        raise Wrong(f"You divide by n = {n}; the unbiased estimate divides by n - d = {n - d} (d parameters were fitted).")
    if torch.allclose(got, want.sqrt(), rtol=1e-5):
        raise Wrong("You return sigma_hat; ridge's penalty needs the variance sigma_hat^2.")
    if torch.allclose(got, (batch.ys.pow(2).sum(-1)) / (n - d), rtol=1e-5):
        raise Wrong("Those are the targets' energies: subtract the least-squares fit X w_ols before squaring.")
    expect_close("sigma2_hat", got, want, rtol=1e-5, atol=1e-8,
                 hint="Fit w_ols by least squares, square the residuals y - X w_ols, sum over the n pairs, divide by n - d.")


@check("Exercise 2: the best constant ridge penalty")
def const_ridge_penalty(student_fn, gen):
    sigma_max = float(torch.empty(1).uniform_(1.0, 5.0, generator=gen))
    batch = _random_task(gen, sigma_max).sample(4000, gen, dtype=torch.float64)
    lam = student_fn(batch)
    expect(isinstance(lam, (float, int)) or (torch.is_tensor(lam) and lam.numel() == 1), "Return one number, lam.")
    lam = float(lam)
    expect(math.isfinite(lam) and lam >= 0, f"lam must be a finite number >= 0, got {lam}.")
    best = tune_const_ridge(batch)
    loss, best_loss = evaluate(ConstRR(lam), batch), evaluate(best, batch)
    direction = "too large" if lam > best.lam else "too small"
    expect(
        loss <= best_loss * (1 + 2e-3),
        f"lam = {lam:.4g} gives 0.5·MSE {loss:.5g} on the batch; the best constant penalty ({best.lam:.4g}) gives "
        f"{best_loss:.5g}, so yours is {direction}. Minimise the query loss over lam (e.g. a log grid then refine).",
    )


def _layer(d: int, c: dict[str, float]) -> DiagAttention:
    """A one-head DIAG layer with exactly the coefficients ``c`` (``q_x = q_y = 1``)."""
    layer = DiagAttention(d, n_heads=1, init_std=0.0).double()
    with torch.no_grad():
        layer.q_x.fill_(1.0)
        layer.q_y.fill_(c["w_xy"] / c["w_xx"])
        layer.p_x.fill_(c["w_xx"])
        layer.p_y.fill_(c["w_yx"])
    return layer


@check("Exercise 3: one layer of the discovered algorithm")
def discovered_layer(student_fn, gen):
    task = _random_task(gen)
    batch = task.sample(32, gen, dtype=torch.float64)
    u = torch.empty(4, dtype=torch.float64).uniform_(0.05, 0.3, generator=gen)
    c = {"w_xx": -u[0].item(), "w_xy": -u[1].item(), "w_yx": -u[2].item()}
    c["w_yy"] = c["w_yx"] * c["w_xy"] / c["w_xx"]  # what a one-head layer can express: w_xx w_yy = w_xy w_yx
    n, d = task.n_ctx, task.d
    # A state after one earlier layer, so the query's y-slot is not zero.
    Z = _layer(d, c)(make_tokens(batch.xs, batch.ys, batch.x_query))
    X, r, x_q, s = Z[:, :n, :d], Z[:, :n, d], Z[:, n, :d], Z[:, n, d]
    out = student_fn(X.clone(), r.clone(), x_q.clone(), s.clone(), dict(c))
    expect(isinstance(out, tuple) and len(out) == 4, "Return the tuple (X_new, r_new, xq_new, s_new).")
    want = _layer(d, c)(Z)
    names = ("X_new", "r_new", "xq_new", "s_new")
    wants = (want[:, :n, :d], want[:, :n, d], want[:, n, :d], want[:, n, d])
    for name, got, ref in zip(names, out, wants):
        expect_shape(name, got, tuple(ref.shape))
    sigma, g = X.transpose(1, 2) @ X / n, torch.einsum("bnd,bn->bd", X, r) / n
    rho = r.pow(2).sum(-1) / n
    r_new = (1 + c["w_yy"] * rho)[:, None] * r + c["w_yx"] * torch.einsum("bnd,bd->bn", X, g)
    stale = X + c["w_xx"] * X @ sigma + c["w_xy"] * torch.einsum("bn,bd->bnd", r_new, g)
    if torch.allclose(out[0].double(), stale, rtol=1e-6, atol=1e-9):
        raise Wrong("X_new uses the *updated* residuals; every update of a layer reads the tokens as they were before it.")
    hints = {
        "X_new": "x_i gains w_xx Sigma x_i + w_xy r_i g with Sigma = X^T X / n and g = X^T r / n.",
        "r_new": "r_i becomes (1 + w_yy rho) r_i + w_yx <x_i, g> with rho = ||r||^2 / n.",
        "xq_new": "the query moves like a context input, with its own y-slot s in place of r_i.",
        "s_new": "the query's y-slot is rescaled and stepped like a residual, with x_q in place of x_i.",
    }
    for name, got, ref in zip(names, out, wants):
        expect_close(name, got, ref, rtol=1e-6, atol=1e-9, hint=hints[name])
