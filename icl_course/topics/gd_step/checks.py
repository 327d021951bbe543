"""Checks for the exercises of chapter 1 (one linear-attention layer is one step of GD)."""

from __future__ import annotations

import torch

from icl_course.checking import Wrong, check, expect, expect_close, expect_shape
from icl_course.linear_transformer import FullAttention, LinearTransformer, linear_transformer
from icl_course.metrics import evaluate, implicit_weights
from icl_course.solvers import GradientDescent, tune_step_size
from icl_course.tasks import RegressionTask, Uniform

__all__ = ["construction_weights", "best_step_size", "implicit_model"]


def _random_task(gen: torch.Generator) -> RegressionTask:
    d = int(torch.randint(2, 8, (1,), generator=gen))
    n_ctx = int(torch.randint(3, 12, (1,), generator=gen))
    return RegressionTask(d=d, n_ctx=n_ctx, inputs=Uniform(-1.0, 1.0))


@check("Exercise 1: the weights of one GD step")
def construction_weights(student_fn, gen):
    task = _random_task(gen)
    d, eta = task.d, float(torch.empty(1).uniform_(0.5, 3.0, generator=gen))
    out = student_fn(d, eta)
    expect(isinstance(out, tuple) and len(out) == 2, "Return a pair `(Q, P)`.")
    Q, P = out
    expect_shape("Q", Q, (d + 1, d + 1))
    expect_shape("P", P, (d + 1, d + 1))
    layer = FullAttention(d, init_std=0.0).double()
    with torch.no_grad():
        layer.Q[0], layer.P[0] = Q.double(), P.double()
    batch = task.sample(64, gen, dtype=torch.float64)
    got = LinearTransformer([layer]).predict(batch.xs, batch.ys, batch.x_query)
    want = GradientDescent(eta).predict(batch.xs, batch.ys, batch.x_query)
    tol = 1e-5 * want.abs().max().item()  # float32 answers are welcome
    if torch.allclose(got, -want, rtol=0, atol=tol):
        raise Wrong("Your layer writes +y_hat into the query's y-slot; the read-out takes *minus* the y-slot.")
    ratio = (got @ want) / (want @ want)
    if not torch.allclose(got, ratio * want, rtol=0, atol=tol) or abs(ratio) < 1e-6:
        raise Wrong(
            "The layer's prediction is not proportional to one GD step's: the score z_q^T Q c_j should be "
            "x_q^T x_j (only Q's x-block is non-zero) and the value P c_j should carry y_j into the y-slot."
        )
    expect(
        abs(ratio - 1) < 1e-5,
        f"Right direction, wrong size: your prediction is {ratio.item():.4g} x one GD step with eta={eta:.3g}. "
        "The layer already divides by n; P's y-entry sets the step size.",
    )


def _one_step_window(batch, slack: float) -> tuple[float, float]:
    """One GD step's best step size on ``batch``, and how far from it a step size may lie for a loss
    within ``(1 + slack)`` of the best: the prediction is ``eta * a``, so the loss is a quadratic in eta,
    ``L(eta) = L* + 0.5 mean(a^2) (eta - eta*)^2``."""
    n = batch.xs.shape[1]
    a = torch.einsum("bn,bnd,bd->b", batch.ys, batch.xs, batch.x_query) / n
    y = batch.y_query
    eta = float(a @ y / (a @ a))
    return eta, float((slack * ((eta * a - y) ** 2).mean() / (a * a).mean()).sqrt())


@check("Exercise 2: the best step size")
def best_step_size(student_fn, gen):
    # Two batches from tasks whose best step sizes lie too far apart for one eta to be accepted on both,
    # so that a number which ignores the batch fails. With one batch, eta = 1.85 passed one call in ten
    # (the accepted window, +-0.03 to 0.05, covers that much of where the best eta of a task falls).
    slack = 1e-3
    first = _random_task(gen).sample(2000, gen, dtype=torch.float64)
    eta_1, window_1 = _one_step_window(first, slack)
    for _ in range(100):
        second = _random_task(gen).sample(2000, gen, dtype=torch.float64)
        eta_2, window_2 = _one_step_window(second, slack)
        if abs(eta_1 - eta_2) > 1.5 * (window_1 + window_2):
            break
    for batch in (first, second):
        eta = student_fn(batch)
        expect(isinstance(eta, (float, int)) or (torch.is_tensor(eta) and eta.numel() == 1), "Return one number, eta.")
        eta = float(eta)
        best_eta, best_loss = tune_step_size(batch, n_steps=1)
        loss = evaluate(GradientDescent(eta), batch)
        expect(
            loss <= best_loss * (1 + slack),
            f"eta = {eta:.4g} gives loss {loss:.5g}; the best step size ({best_eta:.4g}) gives {best_loss:.5g}.",
        )


@check("Exercise 3: the implicit model by autograd")
def implicit_model(student_fn, gen):
    task = _random_task(gen)
    seed = int(torch.randint(2**31, (1,), generator=gen))
    model = linear_transformer(task.d, n_layers=2, n_heads=2, init_std=0.3, seed=seed).double()
    batch = task.sample(16, gen, dtype=torch.float64)
    w = student_fn(model, batch.xs, batch.ys, batch.x_query)
    expect(torch.is_tensor(w), f"Return a tensor, got {type(w).__name__}.")
    expect(
        tuple(w.shape) != tuple(batch.xs.shape),
        "You returned d y_hat / d xs; the implicit model is the gradient with respect to the *query* x_q.",
    )
    expect_close("w", w, implicit_weights(model, batch.xs, batch.ys, batch.x_query), rtol=1e-6, atol=1e-9)
