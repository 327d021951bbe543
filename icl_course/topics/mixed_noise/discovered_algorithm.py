"""The algorithm a trained DIAG linear transformer runs, written out on ``(X, y)``.

A DIAG layer (``DiagAttention``) with coefficients ``w_xx, w_xy, w_yx, w_yy`` (heads summed: the
update is linear in them) moves the context inputs ``x_i``, the context targets ``r_i`` (the y-slots,
which start as ``y_i``) and the query. With the layer's statistics of the current tokens

    Sigma = (1/n) X^T X,   g = (1/n) X^T r,   rho = (1/n) ||r||^2,

the token update (Vladymyrov et al. 2024, eq. 2 with diagonal blocks) reads

    r   <- (1 + w_yy rho) r + w_yx X g                  (rescale, then a GD step: w_yx < 0)
    X   <- X (I + w_xx Sigma) + w_xy r g^T               (precondition, then push along g)
    y_q <- (1 + w_yy rho) y_q + w_yx x_q^T g             (the query's y-slot, -prediction)
    x_q <- (I + w_xx Sigma) x_q + w_xy y_q g

Three ingredients beyond gradient descent:

- **Adaptive rescaling** ``1 + w_yy rho``: with ``w_yy < 0`` the residuals and the prediction are
  shrunk by a factor that falls as the residual energy ``rho`` grows, i.e. more for noisier
  sequences, like a ridge penalty that grows with the noise.
- **Momentum**: the inputs absorb ``w_xy r g^T``, so the next layer's gradient
  ``g' = (1/n) X'^T r'`` contains the previous direction, ``g' = (I + w_xx Sigma)(1/n) X^T r' +
  beta g`` with ``beta = w_xy <r, r'> / n``: earlier gradients are carried forward, as in heavy-ball.
- **Preconditioning** ``I + w_xx Sigma`` (GD++, chapter 2).

The prediction is linear in the query (``y_hat = <u, x_q>``), so the algorithm keeps a weight
vector ``u`` and the query map ``M`` (``x_q^(l) = M x_q``) instead of a query token:

    u <- (1 + w_yy rho) u - w_yx M^T g,      M <- (I + w_xx Sigma) M - w_xy g u^T.

``DiscoveredAlgorithm`` runs exactly this and is a learner with the shared call
``predict(xs, ys, x_query)``; ``tests/test_mixed_noise.py`` checks it against the transformer in
float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from icl_course.linear_transformer import DiagAttention, LinearTransformer
from icl_course.runtime import require_finite
from icl_course.solvers import LinearSolver

__all__ = ["LayerCoefficients", "DiscoveredAlgorithm"]


@dataclass(frozen=True)
class LayerCoefficients:
    """One layer's four scalars (summed over heads)."""

    w_xx: float  # input preconditioning
    w_xy: float  # residual -> input: momentum
    w_yx: float  # minus the GD step size
    w_yy: float  # residual energy -> rescaling

    def __post_init__(self):
        for name in ("w_xx", "w_xy", "w_yx", "w_yy"):
            require_finite(f"LayerCoefficients: {name}", getattr(self, name))


@dataclass
class DiscoveredAlgorithm(LinearSolver):
    """The iterative algorithm of a DIAG (or GD++) stack; one ``LayerCoefficients`` per layer."""

    layers: list[LayerCoefficients]

    def __post_init__(self):
        if len(self.layers) == 0:
            raise ValueError("layers must hold at least one LayerCoefficients")
        if not all(isinstance(c, LayerCoefficients) for c in self.layers):
            raise TypeError(f"layers must be a list of LayerCoefficients, got {[type(c).__name__ for c in self.layers]}")

    @classmethod
    def from_model(cls, model: LinearTransformer) -> "DiscoveredAlgorithm":
        """Read the coefficients of a trained DIAG or GD++ stack (``FULL`` has no such form)."""
        if not isinstance(model, LinearTransformer) or not all(isinstance(layer, DiagAttention) for layer in model.layers):
            raise ValueError("model must be a stack of DIAG or GD++ layers (DiagAttention)")
        layers = []
        for layer in model.layers:
            c = {k: v.detach().double().sum().item() for k, v in layer.coefficients().items()}
            layers.append(LayerCoefficients(**c))
        return cls(layers)

    def run(self, xs: Tensor, ys: Tensor) -> dict[str, Tensor]:
        """Run every layer; return the final ``u`` ``(B, d)`` and per-layer traces.

        Traces (each ``(L, B)``): ``rescale`` = ``1 + w_yy rho``, ``momentum`` = ``beta`` (the weight of
        the previous gradient in the next one; the last layer has no next one, so 0), ``rho``.
        """
        B, n, d = xs.shape
        eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
        X, r = xs, ys  # (B, n, d), (B, n)
        u = torch.zeros_like(xs[:, 0])  # (B, d): y_hat = <u, x_q>
        M = eye.expand(B, d, d)  # (B, d, d): the query input after l layers is M x_q
        rescales, momenta, rhos = [], [], []
        for c in self.layers:
            sigma = X.transpose(1, 2) @ X / n  # (B, d, d)
            g = torch.einsum("bnd,bn->bd", X, r) / n  # (B, d)
            rho = r.pow(2).sum(-1) / n  # (B,)
            rescale = 1 + c.w_yy * rho  # (B,)
            precond = eye + c.w_xx * sigma  # (B, d, d), symmetric
            u_new = rescale[:, None] * u - c.w_yx * torch.einsum("bij,bi->bj", M, g)  # += -w_yx M^T g
            M = precond @ M - c.w_xy * torch.einsum("bi,bj->bij", g, u)  # uses the old u
            r_new = rescale[:, None] * r + c.w_yx * torch.einsum("bnd,bd->bn", X, g)
            X = X @ precond + c.w_xy * torch.einsum("bn,bd->bnd", r, g)  # uses the old r
            momenta.append(c.w_xy * (r * r_new).sum(-1) / n)
            u, r = u_new, r_new
            rescales.append(rescale)
            rhos.append(rho)
        momenta[-1] = torch.zeros_like(momenta[-1])
        return {"u": u, "rescale": torch.stack(rescales), "momentum": torch.stack(momenta), "rho": torch.stack(rhos)}

    def weights(self, xs, ys):
        return self.run(xs, ys)["u"]

    def step_sizes(self) -> list[float]:
        """The GD step size ``-w_yx`` of every layer."""
        return [-c.w_yx for c in self.layers]
