"""Comparing learners: loss, how close two predictors' outputs are, and their implicit models.

The *implicit model* of a predictor on one sequence is ``d y_hat / d x_q``, the gradient of its
prediction with respect to the query input (von Oswald et al. 2023, Sec. 3). For a linear model it
is the weight vector; for any linear transformer it is exact too, because the query never feeds the
keys or values, so the prediction is linear in ``x_q`` (Vladymyrov et al. 2024, Thm. 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import check_shapes, make_tokens, read_prediction

__all__ = [
    "mse_loss",
    "evaluate",
    "evaluate_with_error",
    "per_sequence_losses",
    "standard_error",
    "prediction_distance",
    "implicit_weights",
    "implicit_weights_per_layer",
    "model_cosine",
    "model_distance",
]


def mse_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """The course's loss: ``0.5 * mean((y_hat - y)^2)``."""
    if y_hat.shape != y.shape:
        raise ValueError(f"y_hat has shape {tuple(y_hat.shape)} but y has shape {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("y_hat and y are empty: the mean loss of no predictions is undefined")
    return 0.5 * ((y_hat - y) ** 2).mean()


def _check_batch(batch) -> None:
    """Every metric averages over the batch's sequences: it must hold at least one."""
    if not hasattr(batch, "xs") or not hasattr(batch, "x_query"):
        raise TypeError(f"batch must be a RegressionBatch (with xs, ys, x_query), got {type(batch).__name__}")
    if len(batch.xs) == 0:
        raise ValueError("batch is empty (B = 0 sequences): its mean loss is undefined")


@torch.no_grad()
def evaluate(predictor, batch) -> float:
    """0.5·MSE of ``predictor`` on the queries of ``batch``."""
    _check_batch(batch)
    return mse_loss(predictor.predict(batch.xs, batch.ys, batch.x_query), batch.y_query).item()


@torch.no_grad()
def per_sequence_losses(predictor, batch) -> torch.Tensor:
    """0.5·squared error of ``predictor`` on the query of every sequence of ``batch``, ``(B,)`` float64."""
    _check_batch(batch)
    y_hat = predictor.predict(batch.xs, batch.ys, batch.x_query)
    if y_hat.shape != batch.y_query.shape:
        raise ValueError(f"predictions have shape {tuple(y_hat.shape)} but y_query has shape {tuple(batch.y_query.shape)}")
    return 0.5 * (y_hat - batch.y_query).double() ** 2


def standard_error(values: torch.Tensor) -> float:
    """The standard error of the mean of ``values`` (one per sequence): their sample standard
    deviation over ``sqrt(len(values))``; NaN for a single value."""
    values = torch.as_tensor(values).double().flatten()
    return values.std().item() / len(values) ** 0.5 if len(values) > 1 else float("nan")


def evaluate_with_error(predictor, batch) -> tuple[float, float]:
    """0.5·MSE of ``predictor`` on the queries of ``batch`` and its :func:`standard_error` over the
    sequences."""
    losses = per_sequence_losses(predictor, batch)
    return losses.mean().item(), standard_error(losses)


@torch.no_grad()
def prediction_distance(a, b, batch) -> float:
    """Mean over sequences of ``|y_hat_a - y_hat_b|`` on the queries of ``batch``."""
    _check_batch(batch)
    return (a.predict(batch.xs, batch.ys, batch.x_query) - b.predict(batch.xs, batch.ys, batch.x_query)).abs().mean().item()


def implicit_weights(predictor, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
    """``d y_hat / d x_q`` for every sequence, by autograd: ``(B, d)``.

    Sequences are independent, so the gradient of the summed predictions gives every sequence's
    own gradient at once.
    """
    check_shapes(xs, ys, x_query)
    x_query = x_query.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y_hat = predictor.predict(xs, ys, x_query)  # (B,)
        (grad,) = torch.autograd.grad(y_hat.sum(), x_query)
    return grad.detach()


def implicit_weights_per_layer(model, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
    """The implicit model read out after every layer of a linear transformer: ``(L, B, d)``.

    Row ``l`` is ``d y_hat_l / d x_q`` with ``y_hat_l`` minus the query's y-slot after layer ``l+1``
    (what ``model.predict_per_layer`` returns), so ``y_hat_l = <w_l, x_q>`` exactly for a stack
    without a token clamp.
    """
    check_shapes(xs, ys, x_query, dtype=getattr(model, "dtype", None))
    x_query = x_query.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        states = model(make_tokens(xs, ys, x_query), return_all=True)[1:]  # L tensors (B, n+1, d+1)
        grads = [torch.autograd.grad(read_prediction(Z).sum(), x_query, retain_graph=True)[0] for Z in states]
    return torch.stack(grads).detach()


def model_cosine(a, b, batch) -> float:
    """Mean cosine similarity of the two predictors' implicit models over the sequences of ``batch``."""
    _check_batch(batch)
    wa = implicit_weights(a, batch.xs, batch.ys, batch.x_query)
    wb = implicit_weights(b, batch.xs, batch.ys, batch.x_query)
    return torch.nn.functional.cosine_similarity(wa, wb, dim=-1).mean().item()


def model_distance(a, b, batch) -> float:
    """Mean L2 distance ``||w_a - w_b||`` of the two predictors' implicit models."""
    _check_batch(batch)
    wa = implicit_weights(a, batch.xs, batch.ys, batch.x_query)
    wb = implicit_weights(b, batch.xs, batch.ys, batch.x_query)
    return (wa - wb).norm(dim=-1).mean().item()
