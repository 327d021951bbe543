"""Checks for the exercises of chapter 5 (test-time training makes the inner loop explicit)."""

from __future__ import annotations

import torch

from icl_course.checking import Wrong, check, expect, expect_close, expect_shape

from . import layers as ttt

__all__ = ["inner_gradient", "one_step_is_linear_attention", "dual_mini_batch"]


def _sizes(gen: torch.Generator) -> tuple[int, int, int]:
    n = int(torch.randint(3, 12, (1,), generator=gen))  # tokens
    f_k = int(torch.randint(2, 7, (1,), generator=gen))  # key features
    f_v = f_k + int(torch.randint(1, 4, (1,), generator=gen))  # value features (never f_k: a transpose shows)
    return n, f_k, f_v


@check("Exercise 1: the inner-loop gradient by hand")
def inner_gradient(student_fn, gen):
    n, f_k, f_v = _sizes(gen)
    W = torch.randn(f_k, f_v, generator=gen, dtype=torch.float64)
    K = torch.randn(n, f_k, generator=gen, dtype=torch.float64)
    V = torch.randn(n, f_v, generator=gen, dtype=torch.float64)
    grad = student_fn(W.clone(), K.clone(), V.clone())
    W_ = W.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(((K @ W_ - V) ** 2).sum(), W_)
    expect(torch.is_tensor(grad), f"Return a tensor, got {type(grad).__name__}.")
    if tuple(grad.shape) == (f_v, f_k):
        raise Wrong(f"Your gradient has shape {tuple(grad.shape)}, the transpose of W's {(f_k, f_v)}: try K^T (K W - V).")
    expect_shape("grad", grad, (f_k, f_v))
    grad = grad.detach().double()
    if torch.allclose(grad, want / 2, atol=1e-8):
        raise Wrong("Off by a factor 2: the loss is a *sum of squares* (no 1/2), so its gradient is 2 K^T (K W - V).")
    if torch.allclose(grad, -want, atol=1e-8):
        raise Wrong("The sign is flipped: the residual is K W - V (prediction minus target).")
    expect_close("grad", grad, want, rtol=1e-6, atol=1e-8, hint="Compare with autograd on a small example.")


@check("Exercise 2: one GD step from W0 = 0 is linear attention")
def one_step_is_linear_attention(student_fn, gen):
    n, f_k, f_v = _sizes(gen)
    m = int(torch.randint(1, 6, (1,), generator=gen))  # queries
    Q = torch.randn(m, f_k, generator=gen, dtype=torch.float64)
    K = torch.randn(n, f_k, generator=gen, dtype=torch.float64)
    V = torch.randn(n, f_v, generator=gen, dtype=torch.float64)
    # eta in [0.1, 0.45] or [0.55, 1]: near eta = 1/2 the step is Q K^T V itself, and that mistake would
    # pass, or be called off in the last digits instead of named.
    eta = float(torch.empty(1).uniform_(0.1, 0.9, generator=gen))
    eta += 0.1 if eta > 0.45 else 0.0
    out = student_fn(Q.clone(), K.clone(), V.clone(), eta)
    expect(torch.is_tensor(out), f"Return a tensor, got {type(out).__name__}.")
    expect_shape("z", out, (m, f_v))
    out = out.detach().double()
    want = 2 * eta * Q @ K.T @ V  # one step: W1 = 0 - eta * 2 K^T (K 0 - V)
    if torch.allclose(out, want / (2 * eta), atol=1e-8):
        raise Wrong(f"You returned Q K^T V, which is the step with eta = 1/2; here eta = {eta:.3g}: W1 = 2 eta K^T V.")
    if torch.allclose(out, -want, atol=1e-8):
        raise Wrong("The sign is flipped: a GD step *subtracts* the gradient, and at W = 0 the gradient is -2 K^T V.")
    expect_close("z", out, want, rtol=1e-6, atol=1e-8, hint="W1 = W0 - eta * grad with W0 = 0, then z = Q W1.")


@check("Exercise 3: one mini-batch of the dual form")
def dual_mini_batch(student_fn, gen):
    n, f_k, f_v = _sizes(gen)
    f_v = f_k  # the layer maps a head's features to themselves
    q, k, v = (torch.randn(1, 1, n, f_k, generator=gen, dtype=torch.float64) / f_k**0.5 for _ in range(3))
    eta = 0.2 * torch.rand(1, 1, n, generator=gen, dtype=torch.float64)
    W = 0.3 * torch.randn(f_k, f_v, generator=gen, dtype=torch.float64)
    want, state = ttt.ttt_primal(q, k, v, eta, [(W[None], None)], mini_batch=n)  # one mini-batch, primal form
    out = student_fn(q[0, 0].clone(), k[0, 0].clone(), v[0, 0].clone(), eta[0, 0].clone(), W.clone())
    expect(isinstance(out, tuple) and len(out) == 2, "Return a pair `(Z, W_new)`.")
    Z, W_new = out
    expect_shape("Z", Z, (n, f_v))
    expect_shape("W_new", W_new, (f_k, f_v))
    Z, W_new = Z.detach().double(), W_new.detach().double()
    want, W_want = want[0, 0], state[0][0][0, 0]
    no_mask = q[0, 0] @ W - ((q[0, 0] @ k[0, 0].T) * eta[0, 0]) @ (2 * (k[0, 0] @ W - v[0, 0]))
    if torch.allclose(Z, no_mask, atol=1e-8):
        raise Wrong("Token t must only see the gradients of tokens i <= t: mask the (n x n) matrix with tril.")
    expect_close("W_new", W_new, W_want, rtol=1e-6, atol=1e-8,
                 hint="The state after the mini-batch is W - K^T (eta * G) with G = 2 (K W - V).")
    expect_close("Z", Z, want, rtol=1e-6, atol=1e-8,
                 hint="Z = Q W - (tril(Q K^T) * eta_i in column i) @ G.")
