"""Newton's method for a matrix inverse, for least squares in context, and as attention weights.

**Newton-Schulz** (Schulz 1933) inverts a matrix ``A`` by the iteration

    X_{k+1} = X_k (2 I - A X_k),     X_0 = alpha A^T,   0 < alpha < 2 / ||A||_2^2,

whose residual squares every step, ``I - A X_{k+1} = (I - A X_k)^2``: quadratic convergence, so
``log2(kappa^2 log(1/eps))`` steps reach accuracy ``eps`` where gradient descent on
``1/2 ||A X - I||_F^2`` needs ~``kappa^2 log(1/eps)`` (``kappa`` the condition number of ``A``).

**Iterative Newton for least squares** (Fu et al. 2024, eq. 4) runs it on the context's second-moment
matrix ``S = (1/n) X^T X`` (symmetric, so ``X_0 = alpha S``) and predicts with
``w_k = M_k (1/n) X^T y``; it converges to the least-squares solution.

**The attention construction** (after Giannou et al. 2024, Lemma 4.1): linear attention is cubic in
the tokens and cannot write the ``2 X`` of a Newton step from data tokens alone, so the tokens carry
constant features. Token layout, ``D = 3d + 1`` (slots ``x | u | e | y``)::

    data token j:   (x_j, M x_j, 0,   y_j)     j = 1..n
    basis token m:  (0,   0,     e_m, 0  )     m = 1..d   (the identity, one column a token)
    query:          (x_q, M x_q, 0,   0  )

The ``u``-slot holds the current iterate applied to the token's input. Keys and values are the
``N = n + d`` context tokens (data and basis), so the layer's moment matrix has the blocks
``T_xx = (n/N) S``, ``T_ux = (n/N) M S``, ``T_ee = (1/N) I`` and ``T_yx = (n/N) b^T`` with
``b = (1/n) X^T y``. One single-head layer each:

- *set-up*: ``u <- u + alpha S x``                 (M_0 = alpha S);
- *doubling*: ``u <- u + u`` through the basis tokens (M -> 2M);
- *correction*: ``u <- u - 1/4 (2M) S u``            (2M -> 2M - M S M);
- *read-out*: ``y <- y - b^T u``                    (the prediction ``x_q^T M b`` = minus the y-slot).

Doubling then correction is one Newton-Schulz step, ``M <- 2M - M S M``, in two layers, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from icl_course.linear_transformer import FullAttention, LinearTransformer
from icl_course.runtime import require_finite
from icl_course.solvers import LinearSolver
from icl_course.tokens import check_shapes, read_prediction

__all__ = [
    "newton_schulz",
    "gd_inverse",
    "inverse_residuals",
    "iterations_to_tolerance",
    "IterativeNewton",
    "spectral_gd_predictions",
    "newton_order_predictions",
    "effective_orders",
    "newton_tokens",
    "NewtonTransformer",
    "newton_transformer",
    "newton_step_weights",
    "read_iterate",
]


# --- matrix inversion: Newton-Schulz against gradient descent ----------------------------------


def _check_square(A: Tensor) -> None:
    if not torch.is_tensor(A) or A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be a (batch of) square matrices, got {getattr(A, 'shape', type(A).__name__)}")


def _check_iters(n_iters) -> None:
    if not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an integer >= 0, got {n_iters!r}")


def _default_alpha(A: Tensor) -> Tensor:
    """``1 / ||A||_2^2`` per matrix, shape ``(..., 1, 1)``: inside Newton-Schulz's safe range."""
    return 1.0 / torch.linalg.matrix_norm(A, ord=2)[..., None, None] ** 2


def newton_schulz(A: Tensor, n_iters: int, alpha: float | None = None) -> list[Tensor]:
    """Newton-Schulz iterates ``[X_0, ..., X_{n_iters}]`` for ``A^{-1}``, from ``X_0 = alpha A^T``.

    ``alpha`` defaults to ``1 / ||A||_2^2`` (per matrix); any ``0 < alpha < 2 / ||A||_2^2`` converges.

    >>> A = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> X = newton_schulz(A, 8)[-1]
    >>> torch.allclose(X, torch.linalg.inv(A))
    True
    """
    _check_square(A)
    _check_iters(n_iters)
    if alpha is not None:
        require_finite("alpha", alpha, above=0)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    X = (_default_alpha(A) if alpha is None else alpha) * A.mT
    iterates = [X]
    for _ in range(n_iters):
        X = X @ (2 * eye - A @ X)  # Newton-Schulz: the residual I - A X squares
        iterates.append(X)
    return iterates


def gd_inverse(A: Tensor, n_iters: int, record: list[int] | None = None) -> dict[int, Tensor]:
    """Gradient descent on ``f(X) = 1/2 ||A X - I||_F^2`` from ``X = 0`` with step ``1 / ||A||_2^2``.

    ``X_{k+1} = X_k - eta A^T (A X_k - I)``; its first step is Newton-Schulz's ``X_0``. Returns the
    iterates at the steps in ``record`` (default: every step), as ``{step: X}``.
    """
    _check_square(A)
    _check_iters(n_iters)
    keep = set(range(n_iters + 1)) if record is None else set(record)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    eta = _default_alpha(A)
    X = torch.zeros_like(A)
    out = {0: X} if 0 in keep else {}
    for k in range(1, n_iters + 1):
        X = X - eta * A.mT @ (A @ X - eye)
        if k in keep:
            out[k] = X
    return out


def inverse_residuals(A: Tensor, iterates) -> list[float]:
    """Relative error ``||I - A X||_2`` of every iterate (the largest over a batch)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return [torch.linalg.matrix_norm(eye - A @ X, ord=2).max().item() for X in iterates]


def iterations_to_tolerance(A: Tensor, tol: float = 1e-8, method: str = "newton", max_iters: int = 10**7) -> int:
    """The fewest iterations after which ``||I - A X||_2 <= tol``, for ``method`` 'newton' or 'gd'.

    Both residuals are spectral functions of ``A A^T``: with ``s`` its eigenvalues over ``||A||_2^2``,
    GD's residual after ``k`` steps is ``max (1 - s)^k`` and Newton-Schulz's after ``k`` iterations is
    ``max (1 - s)^(2^k)``. Counting in closed form lets GD's count run to millions without iterating.
    """
    _check_square(A)
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if method not in ("newton", "gd"):
        raise ValueError(f"method must be 'newton' or 'gd', got {method!r}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    s = torch.linalg.svdvals(A.double()) ** 2
    s = s / s.max(dim=-1, keepdim=True).values
    rho = (1 - s.min()).item()  # the slowest mode's contraction per GD step
    if rho <= 0:
        return 0 if method == "newton" else 1
    gd_steps = math.ceil(math.log(tol) / math.log(rho))  # (1 - s_min)^k <= tol
    if method == "newton":
        return math.ceil(math.log2(gd_steps))  # (1 - s_min)^(2^k) <= tol; 2^k is an integer
    if gd_steps > max_iters:
        raise ValueError(f"GD would need {gd_steps} > max_iters={max_iters} steps")
    return gd_steps


# --- least squares in context: Iterative Newton and GD as predictors ---------------------------


def _moments(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
    n = xs.shape[1]
    S = xs.transpose(1, 2) @ xs / n  # (B, d, d)
    b = torch.einsum("bnd,bn->bd", xs, ys) / n  # (B, d)
    return S, b


@dataclass
class IterativeNewton(LinearSolver):
    """``n_steps`` of Newton-Schulz on ``S = (1/n) X^T X``, then ``w = M_k (1/n) X^T y`` (Fu et al. eq. 4).

    ``M_0 = alpha S`` and ``M_{k+1} = 2 M_k - M_k S M_k``. ``alpha=None`` takes ``1 / ||S||_2^2`` per
    sequence (what the chapter compares with trained models); a fixed ``alpha`` is what the attention
    construction can hold in its weights (it cannot compute a norm), and converges when
    ``alpha < 2 / ||S||_2^2`` for every sequence.

    ``order=p`` runs the Newton-type iteration of order ``p`` instead (Giannou et al. 2024, eq. 3.4):
    ``M_{k+1} = M_k (I + R_k + ... + R_k^(p-1))`` with ``R_k = I - S M_k``, so ``R_{k+1} = R_k^p``
    (``p = 2`` is Newton-Schulz). ``start='identity'`` begins at ``M_0 = I / ||S||_2``, one GD step,
    instead of ``alpha S``; from there ``R_k = (I - S / ||S||_2)^(p^k)``: iteration ``k`` of order ``p``
    *is* ``p^k`` steps of GD with step ``1 / ||S||_2`` (tested).
    """

    n_steps: int
    alpha: float | None = None
    order: int = 2
    start: str = "S"

    def __post_init__(self):
        if not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0, got {self.n_steps!r}")
        if self.alpha is not None:
            require_finite("IterativeNewton: alpha", self.alpha, above=0)
        if not isinstance(self.order, int) or self.order < 2:
            raise ValueError(f"order must be an integer >= 2, got {self.order!r}")
        if self.start not in ("S", "identity"):
            raise ValueError(f"start must be 'S' (M_0 = alpha S) or 'identity' (M_0 = I / ||S||), got {self.start!r}")
        if self.start == "identity" and self.alpha is not None:
            raise ValueError("alpha sets M_0 = alpha S; it cannot be combined with start='identity'")

    def iterates(self, S: Tensor) -> list[Tensor]:
        """``[M_0, ..., M_{n_steps}]`` for a batch of second-moment matrices ``S`` ``(B, d, d)``."""
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        if self.start == "identity":
            M = eye / torch.linalg.matrix_norm(S, ord=2)[..., None, None]
        else:
            M = (_default_alpha(S) if self.alpha is None else self.alpha) * S
        out = [M]
        for _ in range(self.n_steps):
            if self.order == 2:
                M = M @ (2 * eye - S @ M)  # Newton-Schulz on S
            else:
                R = eye - S @ M
                power, series = eye, eye
                for _ in range(self.order - 1):  # I + R + ... + R^(p-1)
                    power = power @ R
                    series = series + power
                M = M @ series
            out.append(M)
        return out

    def weights(self, xs, ys):
        S, b = _moments(xs, ys)
        return (self.iterates(S)[-1] @ b[..., None])[..., 0]

    def predict_all(self, xs, ys, x_query) -> Tensor:
        """Predictions after ``0, 1, ..., n_steps`` iterations: ``(n_steps + 1, B)``."""
        check_shapes(xs, ys, x_query)
        S, b = _moments(xs, ys)
        return torch.stack([torch.einsum("bd,bde,be->b", x_query, M, b) for M in self.iterates(S)])


def spectral_gd_predictions(xs: Tensor, ys: Tensor, x_query: Tensor, steps: list[int]) -> Tensor:
    """Predictions of GD with step ``1 / ||S||_2`` (per sequence) after each count in ``steps``: ``(K, B)``.

    GD on ``1/(2n) ||X w - y||^2`` from 0 gives ``w_k = V diag((1 - (1 - eta lam)^k) / lam) V^T b`` in
    the eigenbasis of ``S``, so any step count (thousands) costs one eigendecomposition. Equals
    ``GradientDescent(eta, k)`` (tested); directions with ``lam = 0`` stay at 0, as GD leaves them.
    """
    check_shapes(xs, ys, x_query)
    if any((not isinstance(k, int)) or k < 0 for k in steps):
        raise ValueError(f"steps must be integers >= 0, got {steps}")
    S, b = _moments(xs, ys)
    lam, V = torch.linalg.eigh(S)  # (B, d), (B, d, d)
    eta = 1.0 / lam[:, -1:].clamp(min=torch.finfo(lam.dtype).tiny)  # (B, 1)
    qv = torch.einsum("bd,bde->be", x_query, V)  # (B, d): x_q in the eigenbasis
    bv = torch.einsum("bd,bde->be", b, V)  # (B, d)
    safe = torch.where(lam > 1e-12 * lam[:, -1:], lam, torch.ones_like(lam))
    k = torch.tensor(steps, dtype=lam.dtype, device=lam.device)[:, None, None]  # (K, 1, 1)
    gain = (1 - (1 - eta * lam)[None] ** k) / safe[None]  # (K, B, d)
    gain = torch.where(lam[None] > 1e-12 * lam[None, :, -1:], gain, eta[None] * k)  # lam -> 0 limit
    return (gain * qv[None] * bv[None]).sum(-1)


def newton_order_predictions(xs: Tensor, ys: Tensor, x_query: Tensor, exponents) -> Tensor:
    """Predictions of Newton-type iterations from ``M_0 = S / ||S||_2^2`` in closed form: ``(K, B)``.

    Order ``p`` after ``k`` iterations leaves the residual ``R_k = R_0^(p^k)`` with
    ``R_0 = I - S^2 / ||S||_2^2`` (``IterativeNewton(k, order=p)``, tested), so its iterate is
    ``M = S^-1 (I - R_0^t)`` with ``t = p^k``. Each entry of ``exponents`` is such a ``t`` (any real
    ``t >= 1``: ``R_0`` has eigenvalues in ``[0, 1)``), which lets a layer's error be placed between
    orders. Directions with ``lam = 0`` stay at 0, as the iteration leaves them.
    """
    check_shapes(xs, ys, x_query)
    t = torch.as_tensor(exponents, dtype=xs.dtype, device=xs.device).reshape(-1)
    if not bool(((t >= 1) & torch.isfinite(t)).all()):
        raise ValueError(f"exponents must be finite and >= 1, got {exponents}")
    S, b = _moments(xs, ys)
    lam, V = torch.linalg.eigh(S)  # (B, d), (B, d, d)
    top = lam[:, -1:].clamp(min=torch.finfo(lam.dtype).tiny)
    keep = lam > 1e-12 * top
    r0 = (1 - (lam / top) ** 2).clamp(0, 1)  # R_0's eigenvalues
    safe = torch.where(keep, lam, torch.ones_like(lam))
    gain = torch.where(keep[None], (1 - r0[None] ** t[:, None, None]) / safe[None], torch.zeros_like(lam)[None])
    qv = torch.einsum("bd,bde->be", x_query, V)
    bv = torch.einsum("bd,bde->be", b, V)
    return (gain * qv[None] * bv[None]).sum(-1)


def effective_orders(layer_losses, xs: Tensor, ys: Tensor, x_query: Tensor, y: Tensor, first_iteration: int = 1,
                     max_exponent: float = 1e9) -> list[float | None]:
    """For layer ``l`` (1-based) of a stack, the real order ``p`` at which ``l - 1 + first_iteration``
    Newton-type iterations from ``M_0 = S / ||S||_2^2`` reach the layer's 0.5·MSE on these sequences.

    ``first_iteration`` says which iteration layer 1 is set against: 1 (default) counts ``M_0`` as the
    input before any layer, 0 sets layer 1 against ``M_0`` itself. The order is ``p = t^(1/k)`` with
    ``k`` the layer's iteration count and ``t`` the exponent of ``newton_order_predictions`` whose loss
    equals the layer's (bisection on ``log t``; the mean loss falls monotonically in ``t`` on the
    chapter's data). ``None`` where ``k = 0``, where the layer does worse than ``M_0`` (no order fits)
    or better than ``t = max_exponent``.
    """
    if first_iteration not in (0, 1):
        raise ValueError(f"first_iteration must be 0 or 1, got {first_iteration!r}")

    def loss(t: float) -> float:
        pred = newton_order_predictions(xs, ys, x_query, [t])[0]
        return 0.5 * ((pred - y) ** 2).mean().item()

    out: list[float | None] = []
    for layer, target in enumerate(layer_losses, start=1):
        k = layer - 1 + first_iteration
        if k == 0 or not loss(1.0) > target > loss(max_exponent):
            out.append(None)
            continue
        lo, hi = 0.0, math.log(max_exponent)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if loss(math.exp(mid)) > target else (lo, mid)
        out.append(math.exp((lo + hi) / 2 / k))
    return out


# --- the attention construction ----------------------------------------------------------------


def newton_tokens(xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
    """Tokens of the construction (module docstring): ``(B, n + d + 1, 3d + 1)``, ``u``-slots zero."""
    check_shapes(xs, ys, x_query)
    B, n, d = xs.shape
    zeros = xs.new_zeros(B, n, d)
    data = torch.cat([xs, zeros, zeros, ys[..., None]], dim=-1)  # (B, n, 3d+1)
    eye = torch.eye(d, dtype=xs.dtype, device=xs.device).expand(B, d, d)
    basis = torch.cat([xs.new_zeros(B, d, 2 * d), eye, xs.new_zeros(B, d, 1)], dim=-1)  # (B, d, 3d+1)
    query = torch.cat([x_query, x_query.new_zeros(B, 2 * d + 1)], dim=-1)[:, None]  # (B, 1, 3d+1)
    return torch.cat([data, basis, query], dim=1)


def read_iterate(Z: Tensor, d: int) -> Tensor:
    """The ``u``-slots ``M x`` of every token: ``(B, n + d + 1, d)``."""
    return Z[..., d : 2 * d]


def _blocks(d: int):
    return slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d), 3 * d  # x, u, e, y


def _layer(d: int, dtype) -> FullAttention:
    return FullAttention(3 * d, n_heads=1, init_std=0.0).to(dtype)


def newton_step_weights(d: int, n_ctx: int, dtype=torch.float64) -> tuple[FullAttention, FullAttention]:
    """The two layers of one Newton-Schulz step, ``M <- 2M - M S M`` (doubling, then correction).

    A layer adds ``P T Q^T z`` to every token ``z`` (``T`` the context tokens' moment matrix).
    Doubling: ``Q^T`` copies ``u`` into the ``e``-slot, where ``T_ee = I/N``; ``P`` copies it back times
    ``N``. Correction: ``Q^T`` copies ``u`` into the ``x``-slot, ``T_ux = (n/N) (2M) S`` maps it, and
    ``P`` adds ``-(N/n)/4`` of the result to ``u``: ``-1/4 (2M) S (2M) x = -M S M x``.
    """
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
    x, u, e, _ = _blocks(d)
    N = n_ctx + d
    double, correct = _layer(d, dtype), _layer(d, dtype)
    eye = torch.eye(d, dtype=dtype)
    with torch.no_grad():
        double.Q[0, u, e] = eye  # Q^T z puts u into the e-slot
        double.P[0, u, e] = N * eye
        correct.Q[0, u, x] = eye  # Q^T z puts u into the x-slot
        correct.P[0, u, u] = -(N / n_ctx) / 4 * eye
    return double, correct


class NewtonTransformer(LinearTransformer):
    """A linear-attention stack on the construction's tokens, with the package's predictor call."""

    def __init__(self, layers: list, d: int, n_ctx: int):
        super().__init__(layers)
        self.d_input, self.n_ctx = d, n_ctx

    def tokens(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        if not torch.is_tensor(xs) or xs.ndim != 3 or xs.shape[-1] != self.d_input or xs.shape[1] != self.n_ctx:
            raise ValueError(
                f"xs must have shape (B, n_ctx={self.n_ctx}, d={self.d_input}) (the weights hold n_ctx), "
                f"got {tuple(getattr(xs, 'shape', ()))}"
            )
        check_shapes(xs, ys, x_query, dtype=self.dtype)
        return newton_tokens(xs, ys, x_query)

    def predict(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        return read_prediction(self(self.tokens(xs, ys, x_query)))

    def predict_per_layer(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        states = self(self.tokens(xs, ys, x_query), return_all=True)
        return torch.stack([read_prediction(Z) for Z in states[1:]])


def newton_transformer(d: int, n_ctx: int, n_steps: int, alpha: float, dtype=torch.float64) -> NewtonTransformer:
    """``2 n_steps + 2`` linear-attention layers that compute ``IterativeNewton(n_steps, alpha)`` exactly.

    Layers: set-up (``M_0 = alpha S``), a doubling and a correction layer per Newton step, read-out.

    >>> from icl_course.tasks import RegressionTask, generator
    >>> batch = RegressionTask(d=3, n_ctx=8).sample(4, generator(0), dtype=torch.float64)
    >>> model = newton_transformer(d=3, n_ctx=8, n_steps=5, alpha=20.0)
    >>> exact = IterativeNewton(5, alpha=20.0).predict(batch.xs, batch.ys, batch.x_query)
    >>> bool((model.predict(batch.xs, batch.ys, batch.x_query) - exact).abs().max() < 1e-10)
    True
    """
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an integer >= 0, got {n_steps!r}")
    require_finite("alpha", alpha, above=0)
    x, u, _, y = _blocks(d)
    N = n_ctx + d
    eye = torch.eye(d, dtype=dtype)
    setup, readout = _layer(d, dtype), _layer(d, dtype)
    with torch.no_grad():
        setup.Q[0, x, x] = eye  # Q^T z keeps x; T_xx = (n/N) S
        setup.P[0, u, x] = alpha * (N / n_ctx) * eye  # u += alpha S x
        readout.Q[0, u, x] = eye  # Q^T z puts u into the x-slot; T_yx = (n/N) b^T
        readout.P[0, y, y] = -(N / n_ctx)  # y -= b^T u, so minus the y-slot is x_q^T M b
    steps = [layer for _ in range(n_steps) for layer in newton_step_weights(d, n_ctx, dtype)]
    return NewtonTransformer([setup, *steps, readout], d=d, n_ctx=n_ctx)
