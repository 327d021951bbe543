"""Checks for the exercises of chapter 4 (transformers and Newton's method)."""

from __future__ import annotations

import torch

from icl_course.checking import Wrong, check, expect, expect_close, expect_shape
from icl_course.linear_transformer import FullAttention
from icl_course.tasks import IllConditioned, RegressionTask

from . import matrix_inverse as ref
from .logistic import LogisticGD, LogisticNewton, LogisticTask, regularized_gradient

__all__ = ["newton_schulz_iterate", "newton_step_layers", "irls"]


def _random_matrix(gen: torch.Generator) -> torch.Tensor:
    dim = int(torch.randint(3, 8, (1,), generator=gen))
    kappa = float(torch.empty(1).uniform_(2.0, 50.0, generator=gen))
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    s = kappa ** -torch.linspace(0, 1, dim, dtype=torch.float64)
    scale = float(torch.empty(1).uniform_(0.5, 3.0, generator=gen))  # ||A|| is not 1: the start must use it
    return scale * U @ torch.diag(s) @ V.T


@check("Exercise 1: Newton-Schulz")
def newton_schulz_iterate(student_fn, gen):
    A = _random_matrix(gen)
    X0 = student_fn(A.clone(), 0)
    expect_shape("X", X0, tuple(A.shape))
    want0 = ref.newton_schulz(A, 0)[-1]
    if not torch.allclose(X0.double(), want0, rtol=1e-6, atol=1e-9):
        if torch.allclose(X0.double(), A.T / torch.linalg.matrix_norm(A, ord="fro") ** 2, rtol=1e-6, atol=1e-9):
            raise Wrong("X_0 uses the Frobenius norm; take alpha = 1 / ||A||_2^2 (the spectral norm, ord=2).")
        if torch.allclose(X0.double(), A / torch.linalg.matrix_norm(A, ord=2) ** 2, rtol=1e-6, atol=1e-9):
            raise Wrong("X_0 should be alpha * A^T (the transpose): A is not symmetric here.")
        raise Wrong("With n_iters = 0, return the start X_0 = A^T / ||A||_2^2 (spectral norm).")
    # Newton-Schulz converges quadratically: on a well-conditioned A, X_7 and X_8 agree to machine
    # precision, and an off-by-one answer would be right. Draw only counts k whose neighbours differ.
    iterates = ref.newton_schulz(A, 9)
    apart = [k for k in range(3, 9)
             if not any(torch.allclose(iterates[j], iterates[j + 1], rtol=1e-4, atol=1e-7) for j in (k - 1, k))]
    k = apart[int(torch.randint(len(apart), (1,), generator=gen))]
    X = student_fn(A.clone(), k)
    expect_shape("X", X, tuple(A.shape))
    X = X.double()
    if torch.allclose(X, iterates[k - 1], rtol=1e-6, atol=1e-9):
        raise Wrong(f"With n_iters = {k} you return the iterate X_{k - 1}: one iteration too few.")
    if torch.allclose(X, iterates[k + 1], rtol=1e-6, atol=1e-9):
        raise Wrong(f"With n_iters = {k} you return the iterate X_{k + 1}: one iteration too many.")
    expect_close("X", X, iterates[k], rtol=1e-6, atol=1e-9,
                 hint="Each iteration is X <- X (2I - A X).")


def _tokens_with_iterate(gen: torch.Generator):
    d = int(torch.randint(2, 6, (1,), generator=gen))
    n = int(torch.randint(d + 2, 16, (1,), generator=gen))
    task = RegressionTask(d=d, n_ctx=n, inputs=IllConditioned(d, 5.0))
    batch = task.sample(8, gen, dtype=torch.float64)
    M = torch.randn(8, d, d, generator=gen, dtype=torch.float64)
    Z = ref.newton_tokens(batch.xs, batch.ys, batch.x_query)
    inputs = torch.cat([batch.xs, batch.x_query[:, None]], dim=1)  # (B, n+1, d)
    rows = [*range(n), n + d]  # data tokens and query (basis tokens sit in between)
    Z[:, rows, d : 2 * d] = torch.einsum("bij,bnj->bni", M, inputs)
    S = batch.xs.mT @ batch.xs / n
    Mx = torch.einsum("bij,bnj->bni", M, inputs)
    MSMx = torch.einsum("bij,bnj->bni", M @ S @ M, inputs)
    return d, n, Z, rows, Mx, MSMx


def _as_layer(d: int, Q, P) -> FullAttention:
    layer = FullAttention(3 * d, init_std=0.0).double()
    with torch.no_grad():
        layer.Q[0], layer.P[0] = torch.as_tensor(Q).double(), torch.as_tensor(P).double()
    return layer


@check("Exercise 2: one Newton-Schulz step in two attention layers")
def newton_step_layers(student_fn, gen):
    d, n, Z, rows, Mx, MSMx = _tokens_with_iterate(gen)
    out = student_fn(d, n)
    expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(len(p) == 2 for p in out),
           "Return two pairs: ((Q1, P1), (Q2, P2)), the doubling layer first.")
    D = 3 * d + 1
    for i, (Q, P) in enumerate(out, start=1):
        expect_shape(f"Q{i}", Q, (D, D))
        expect_shape(f"P{i}", P, (D, D))
    (Q1, P1), (Q2, P2) = out
    Z2 = _as_layer(d, Q2, P2)(_as_layer(d, Q1, P1)(Z)).detach()
    got = ref.read_iterate(Z2, d)[:, rows]  # (B, n+1, d)
    # Write the result as a Mx + c MSMx (least squares over every token) to name the mistake.
    basis = torch.stack([Mx.flatten(), MSMx.flatten()], dim=1)  # (K, 2)
    coef = torch.linalg.lstsq(basis, got.flatten()[:, None]).solution[:, 0]
    fit_err = (basis @ coef - got.flatten()).abs().max().item()
    a, c = coef.tolist()
    expect(fit_err < 1e-6 * (1 + got.abs().max().item()),
           "The u-slots after your two layers are not a combination of M x and M S M x: check that Q moves "
           "u into the x-slot (correction) or the e-slot (doubling), and that P writes only into the u-slot.")
    expect(abs(a - 2) < 1e-6, f"After your layers u = {a:.3g} M x {c:+.3g} M S M x; the M x coefficient should be 2 "
           "(the doubling layer adds u once more: Q puts u into the e-slot, where the basis tokens give I / N).")
    if abs(c + 1) >= 1e-6:  # a hint for the two scale factors the correction layer meets, not the answer
        N = n + d
        if abs(c + 4) < 1e-6 or abs(c + 4 * n / N) < 1e-6:
            why = ("The correction layer multiplies two copies of the iterate, and it sees the doubled one: "
                   "what does doubling do to a product of two of them?")
        elif abs(c + n / N) < 1e-6:
            why = ("Attention averages over every token, basis tokens included, but S averages over the data "
                   "tokens only: compare the two counts.")
        else:
            why = ("Two scale factors meet in the correction layer: the iterate it sees was doubled, and "
                   "attention averages over more tokens than S does.")
        raise Wrong(f"After your layers u = {a:.3g} M x {c:+.3g} M S M x; the M S M x coefficient should be -1. {why}")
    others = Z2.clone()
    others[..., d : 2 * d] = Z[..., d : 2 * d]
    expect(torch.allclose(others, Z, atol=1e-9),
           "Your layers also change slots other than u (x, e or y): P should write into the u-slot only.")


@check("Exercise 3: Newton's method (IRLS) for regularized logistic regression")
def irls(student_fn, gen):
    d = int(torch.randint(2, 7, (1,), generator=gen))
    n = int(torch.randint(5, 30, (1,), generator=gen))
    mu = float(torch.empty(1).uniform_(0.05, 0.5, generator=gen))
    batch = LogisticTask(d=d, n_ctx=n, mu=mu).sample(16, gen, dtype=torch.float64)
    w1 = student_fn(batch.xs, batch.ys, mu, 1)
    expect_shape("w", w1, (16, d))
    w1 = w1.double()
    if torch.allclose(w1, LogisticGD(mu, 1).weights(batch.xs, batch.ys), rtol=1e-6, atol=1e-9):
        raise Wrong("One step of your method equals a gradient step: multiply the gradient by H^{-1}, the inverse Hessian.")
    expect_close("w after one step", w1, LogisticNewton(mu, 1).weights(batch.xs, batch.ys), rtol=1e-6, atol=1e-9,
                 hint="From w = 0: H = (1/n) X^T D X + mu I with D = diag(s (1 - s)), s = sigmoid(X w).")
    w = student_fn(batch.xs, batch.ys, mu, 12).double()
    grad = regularized_gradient(batch.xs, batch.ys, w, mu).norm(dim=-1).max().item()
    expect(grad < 1e-8, f"After 12 Newton steps the gradient of the regularized loss should vanish; its norm is "
           f"{grad:.2e}. Check the mu w term in the gradient and mu I in the Hessian.")
