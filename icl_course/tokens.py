"""Tokens: how a regression sequence is fed to a transformer, and how its answer is read out.

Token ``e_i = (x_i, y_i)`` in R^(d+1) for every context pair; the query token is ``(x_q, 0)`` and
comes last. The prediction is read from the query's y-slot after the last layer, with a **minus**
sign (von Oswald et al. 2023): the GD construction writes ``-y_hat`` there.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["make_tokens", "read_prediction", "check_shapes"]


def make_tokens(xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
    """Stack context pairs and the query into ``Z`` of shape ``(B, n+1, d+1)``.

    >>> Z = make_tokens(torch.zeros(2, 4, 3), torch.ones(2, 4), torch.ones(2, 3))
    >>> tuple(Z.shape), Z[0, -1, -1].item()
    ((2, 5, 4), 0.0)
    """
    check_shapes(xs, ys, x_query)
    context = torch.cat([xs, ys[..., None]], dim=-1)  # (B, n, d+1)
    query = torch.cat([x_query, torch.zeros_like(x_query[:, :1])], dim=-1)  # (B, d+1), y-slot 0
    return torch.cat([context, query[:, None]], dim=1)  # (B, n+1, d+1)


def read_prediction(Z: Tensor) -> Tensor:
    """The prediction: minus the query token's y-slot. ``(B, n+1, d+1) -> (B,)``."""
    return -Z[:, -1, -1]


def check_shapes(xs: Tensor, ys: Tensor, x_query: Tensor, dtype: torch.dtype | None = None) -> None:
    """Raise unless ``xs, ys, x_query`` are ``(B, n, d), (B, n), (B, d)`` tensors of one floating dtype.

    With ``dtype`` (a model's), that dtype: a float64 batch into a float32 model is a ``ValueError``
    that says how to cast one of them, never a silent cast or an error from deep inside torch.
    """
    for name, t in (("xs", xs), ("ys", ys), ("x_query", x_query)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape (B, n, d), got {tuple(xs.shape)}")
    B, n, d = xs.shape
    if n < 1:
        raise ValueError("xs must hold at least one context point (n >= 1)")
    if tuple(ys.shape) != (B, n):
        raise ValueError(f"ys must have shape (B, n) = {(B, n)}, got {tuple(ys.shape)}")
    if tuple(x_query.shape) != (B, d):
        raise ValueError(f"x_query must have shape (B, d) = {(B, d)}, got {tuple(x_query.shape)}")
    for name, t in (("xs", xs), ("ys", ys), ("x_query", x_query)):
        if dtype is not None and t.dtype != dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but the model's parameters are {dtype}: cast the batch "
                f"(batch.to(dtype={dtype})) or the model (model.double() for float64, model.float() for float32)"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}: cast it with .float() or .double()")
        if t.dtype != xs.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but xs has {xs.dtype}: give the inputs one dtype (batch.to(dtype=...))")
