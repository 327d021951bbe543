"""Logistic regression in context: the task, Newton's method (IRLS) and GD, and a transformer with MLPs.

Sequence ``b`` has weights ``w_b``; labels are ``y_i = +1`` with probability ``sigmoid(<w_b, x_i>)``,
else ``-1``. A learner sees the n labelled pairs and outputs a *logit* ``z`` for the query.

The classical learners minimise the mu-regularized logistic loss of the context (Giannou et al. 2024,
Sec. 5)

    L(w) = (1/n) sum_i softplus(-y_i <w, x_i>) + (mu / 2) ||w||^2

from ``w = 0``: by Newton's method (= iteratively reweighted least squares, IRLS), which converges
quadratically near the optimum ``w*``, or by gradient descent with step ``1 / (lambda_max(S) / 4 + mu)``.

To ask whether a transformer *emulates* Newton's method, the task's training target is the logit of
the optimum, ``z* = <w*, x_q>`` (computed by Newton to machine precision when a batch is drawn), and
every learner is scored by ``0.5 mean (z - z*)^2``: Newton's iterates, GD's, and every block of a
trained model on one scale. The expected cross-entropy of the query's label,
``CE(z) = p_q softplus(-z) + (1 - p_q) softplus(z)`` with ``p_q = sigmoid(<w_b, x_q>)``, measures how
good the predictions are as probabilities.

**Giannou et al.'s own setup** (their public code, ``Leiay/icl_newton``) differs: labels are the clean
signs ``y_i = sign(<w_b, x_i>)``, ``mu = 0.01``, the target is the optimum's weight vector found by
*damped* Newton, and a model is scored by the regularized loss ``L`` of the weights it outputs.
``LogisticTask(labels="sign", query="basis", damped=True)`` is that task in this module's terms: the
query is a basis vector ``e_m`` (``m`` drawn per sequence), so the target logit ``<w*, e_m>`` is
coordinate ``m`` of the weights, and :func:`predicted_weights` reads a model's whole weight vector
out with the d basis queries (the query token is never a key or value, so each probe is independent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icl_course import pretrained
from icl_course.linear_transformer import FullAttention, LinearTransformer
from icl_course.metrics import mse_loss
from icl_course.runtime import require_finite
from icl_course.solvers import LinearSolver
from icl_course.tasks import Gaussian, Uniform, generator
from icl_course.tokens import make_tokens, read_prediction

__all__ = [
    "LogisticBatch",
    "LogisticTask",
    "expected_cross_entropy",
    "regularized_loss",
    "regularized_gradient",
    "LogisticNewton",
    "LogisticGD",
    "TokenMLP",
    "AttentionMLPTransformer",
    "attention_mlp_transformer",
    "predicted_weights",
]


def _check_labels(ys: Tensor) -> None:
    if not bool(((ys == 1) | (ys == -1)).all()):
        raise ValueError("ys must hold labels -1 or +1")


def _check_mu(mu) -> None:
    require_finite("mu", mu, above=0)  # > 0 keeps the optimum finite


def _check_solver(mu, n_steps) -> None:
    _check_mu(mu)
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an integer >= 0, got {n_steps!r}")


@dataclass
class LogisticBatch:
    """B sequences of n labelled points in dimension d."""

    xs: Tensor  # (B, n, d) context inputs
    ys: Tensor  # (B, n)    labels in {-1, +1}
    x_query: Tensor  # (B, d)
    p_query: Tensor  # (B,)   true probability that the query's label is +1
    w: Tensor  # (B, d)     true weights
    z_star: Tensor  # (B,)  query logit of the regularized optimum w* (the training target)

    def to(self, device=None, dtype=None) -> "LogisticBatch":
        fields = (self.xs, self.ys, self.x_query, self.p_query, self.w, self.z_star)
        return LogisticBatch(*(t.to(device=device, dtype=dtype) for t in fields))

    def __len__(self) -> int:
        return self.xs.shape[0]


def expected_cross_entropy(logits: Tensor, p: Tensor) -> Tensor:
    """Mean of ``p softplus(-z) + (1 - p) softplus(z)``: the expected log-loss of a label ~ Bernoulli(p)."""
    if logits.shape != p.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but p has shape {tuple(p.shape)}")
    return (p * F.softplus(-logits) + (1 - p) * F.softplus(logits)).mean()


@dataclass(frozen=True)
class LogisticTask:
    """Logistic regression in context (module docstring); ``sample`` and ``loss`` as ``RegressionTask``.

    Args:
        mu: the regularization of ``L`` (its optimum is the target).
        deep_supervision: train on the mean loss over every read-out of ``model.predict_per_layer``
            (so each block's logit is a prediction in its own right) instead of the last one only.
        labels: ``"bernoulli"`` (``y = +1`` with probability ``sigmoid(<w, x>)``) or ``"sign"``
            (``y = sign(<w, x>)``, Giannou et al.'s clean labels; ``p_query`` is then 0 or 1).
        query: ``"random"`` (drawn like the inputs) or ``"basis"`` (``e_m``, so ``z*`` is ``w*_m``).
        damped: compute ``w*`` with damped Newton (:class:`LogisticNewton`), as Giannou et al. do.

    >>> batch = LogisticTask(d=3, n_ctx=6).sample(2, generator(0))
    >>> tuple(batch.xs.shape), sorted(batch.ys.unique().tolist())
    ((2, 6, 3), [-1.0, 1.0])
    """

    d: int
    n_ctx: int
    inputs: Uniform | Gaussian = field(default_factory=Gaussian)
    weights: Gaussian = field(default_factory=Gaussian)
    mu: float = 0.1
    deep_supervision: bool = True
    newton_steps: int = 12  # Newton iterations behind z* (5-6 reach float64 precision at mu = 0.1)
    labels: str = "bernoulli"  # "bernoulli": y = +1 w.p. sigmoid(<w, x>); "sign": y = sign(<w, x>)
    query: str = "random"  # "random": x_q drawn like the inputs; "basis": x_q = e_m, m uniform
    damped: bool = False  # z* from damped Newton (needed for "sign" labels at small mu, see LogisticNewton)

    def __post_init__(self):
        _check_mu(self.mu)
        if self.labels not in ("bernoulli", "sign"):
            raise ValueError(f"labels must be 'bernoulli' or 'sign', got {self.labels!r}")
        if self.query not in ("random", "basis"):
            raise ValueError(f"query must be 'random' or 'basis', got {self.query!r}")
        if not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"d must be an integer >= 1, got {self.d!r}")
        if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be an integer >= 1, got {self.n_ctx!r}")
        if not isinstance(self.newton_steps, int) or self.newton_steps < 1:
            raise ValueError(f"newton_steps must be an integer >= 1, got {self.newton_steps!r}")
        for name in ("inputs", "weights"):
            if not callable(getattr(getattr(self, name), "draw", None)):
                raise TypeError(f"{name} must be a distribution such as Gaussian(), got {getattr(self, name)!r}")

    def sample(self, batch_size: int, gen: torch.Generator, device=None, dtype=torch.float32) -> LogisticBatch:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        B, n, d = batch_size, self.n_ctx, self.d
        x_all = self.inputs.draw((B, n + 1, d), gen, dtype)  # (B, n+1, d)
        w = self.weights.draw((B, d), gen, dtype)  # (B, d)
        if self.query == "basis":  # x_q = e_m: the target logit is coordinate m of the weights
            m = torch.randint(d, (B,), generator=gen, device=gen.device)
            x_all[:, n] = F.one_hot(m, d).to(dtype)
        margin = torch.einsum("bnd,bd->bn", x_all, w)  # (B, n+1)
        if self.labels == "sign":
            p = (margin > 0).to(dtype)  # the label is certain
            labels = torch.where(margin[:, :n] > 0, 1.0, -1.0).to(dtype)
        else:
            p = torch.sigmoid(margin)
            labels = torch.where(torch.rand((B, n), generator=gen, dtype=dtype, device=gen.device) < p[:, :n], 1.0, -1.0).to(dtype)
        xs, x_q = x_all[:, :n], x_all[:, n]
        newton = LogisticNewton(self.mu, self.newton_steps, damped=self.damped)
        w_star = newton.weights(xs.double(), labels.double())  # (B, d)
        z_star = torch.einsum("bd,bd->b", w_star, x_q.double()).to(dtype)
        batch = LogisticBatch(xs=xs, ys=labels, x_query=x_q, p_query=p[:, n], w=w, z_star=z_star)
        return batch.to(device=device)

    def loss(self, model, batch: LogisticBatch) -> Tensor:
        """``0.5 mean (z - z*)^2`` of the model's query logit (averaged over read-outs, see class doc)."""
        if self.deep_supervision:
            logits = model.predict_per_layer(batch.xs, batch.ys, batch.x_query)  # (read-outs, B)
            return 0.5 * ((logits - batch.z_star) ** 2).mean()
        return mse_loss(model.predict(batch.xs, batch.ys, batch.x_query), batch.z_star)


# --- the classical learners ---------------------------------------------------------------------


def regularized_loss(xs: Tensor, ys: Tensor, w: Tensor, mu: float) -> Tensor:
    """``L(w)`` of every sequence: ``(B,)``."""
    margins = ys * torch.einsum("bnd,bd->bn", xs, w)  # (B, n)
    return F.softplus(-margins).mean(-1) + 0.5 * mu * (w * w).sum(-1)


def regularized_gradient(xs: Tensor, ys: Tensor, w: Tensor, mu: float) -> Tensor:
    """``grad L(w)`` of every sequence: ``(B, d)``."""
    margins = ys * torch.einsum("bnd,bd->bn", xs, w)  # (B, n)
    coef = -ys * torch.sigmoid(-margins) / xs.shape[1]  # d softplus(-m) / d(w.x) / n
    return torch.einsum("bnd,bn->bd", xs, coef) + mu * w


@dataclass
class LogisticNewton(LinearSolver):
    """``n_steps`` of Newton's method on ``L`` from ``w = 0`` (IRLS).

    ``w <- w - H^{-1} grad L(w)`` with ``H = (1/n) X^T D X + mu I`` and
    ``D = diag(s_i (1 - s_i))``, ``s_i = sigmoid(<w, x_i>)``. Each step is a weighted least-squares
    solve, hence the name IRLS. ``predict`` returns the query's logit ``<w, x_q>``.
    """

    mu: float
    n_steps: int = 1
    damped: bool = False

    def __post_init__(self):
        _check_solver(self.mu, self.n_steps)
        if not isinstance(self.damped, bool):
            raise ValueError(f"damped must be True or False, got {self.damped!r}")

    def iterates(self, xs: Tensor, ys: Tensor) -> list[Tensor]:
        """``[w_0, ..., w_{n_steps}]``, each ``(B, d)``.

        ``damped``: the step is shortened to ``t = 2 sqrt(mu) / (2 sqrt(mu) + lambda)`` with the Newton
        decrement ``lambda = sqrt(g^T H^{-1} g)``, the rule of Giannou et al.'s code. It converges from
        any start; the full step can overshoot when the context is separable and ``mu`` is small
        (clean ``sign`` labels), because the optimum's weights are then large.
        """
        _check_labels(ys)
        B, n, d = xs.shape
        eye = torch.eye(d, dtype=xs.dtype, device=xs.device)
        w = xs.new_zeros(B, d)
        out = [w]
        for _ in range(self.n_steps):
            s = torch.sigmoid(torch.einsum("bnd,bd->bn", xs, w))  # (B, n)
            H = torch.einsum("bni,bn,bnj->bij", xs, s * (1 - s), xs) / n + self.mu * eye  # (B, d, d)
            g = regularized_gradient(xs, ys, w, self.mu)
            step = torch.linalg.solve(H, g)  # (B, d)
            if self.damped:
                decrement = (g * step).sum(-1, keepdim=True).clamp(min=0).sqrt()  # (B, 1)
                step = step * (2 * self.mu**0.5 / (2 * self.mu**0.5 + decrement))
            w = w - step
            out.append(w)
        return out

    def weights(self, xs, ys):
        return self.iterates(xs, ys)[-1]


@dataclass
class LogisticGD(LinearSolver):
    """``n_steps`` of gradient descent on ``L`` from 0 with step ``1 / (lambda_max(S) / 4 + mu)``.

    ``lambda_max(S) / 4 + mu`` bounds the curvature of ``L`` (``sigmoid' <= 1/4``), so this is the
    classical safe step, chosen per sequence.
    """

    mu: float
    n_steps: int = 1

    def __post_init__(self):
        _check_solver(self.mu, self.n_steps)

    def iterates(self, xs: Tensor, ys: Tensor, record: list[int] | None = None) -> dict[int, Tensor]:
        """``{k: w_k}`` for the steps in ``record`` (default: every step)."""
        _check_labels(ys)
        keep = set(range(self.n_steps + 1)) if record is None else set(record)
        S = xs.transpose(1, 2) @ xs / xs.shape[1]  # (B, d, d)
        eta = 1.0 / (torch.linalg.eigvalsh(S)[:, -1:] / 4 + self.mu)  # (B, 1)
        w = xs.new_zeros(xs.shape[0], xs.shape[2])
        out = {0: w} if 0 in keep else {}
        for k in range(1, self.n_steps + 1):
            w = w - eta * regularized_gradient(xs, ys, w, self.mu)
            if k in keep:
                out[k] = w
        return out

    def weights(self, xs, ys):
        return self.iterates(xs, ys, record=[self.n_steps])[self.n_steps]


# --- a transformer of linear attention and ReLU MLP layers --------------------------------------


class TokenMLP(nn.Module):
    """A residual ReLU MLP applied to every token on its own: ``z <- z + W_2 relu(W_1 z + b_1) + b_2``.

    The layer Giannou et al. pair with linear attention: attention mixes tokens, the MLP computes
    the non-linear ``sigmoid``-like factors of a Newton step token by token.
    """

    def __init__(self, d: int, width: int = 32, init_std: float = 1e-3, gen: torch.Generator | None = None):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an integer >= 1, got {d!r}")
        require_finite("init_std", init_std, at_least=0)
        self.d = d  # the token dimension is d + 1, as for the attention layers
        D = d + 1
        self.W1 = nn.Parameter(torch.randn(width, D, generator=gen) / D**0.5)  # a usual fan-in init
        self.b1 = nn.Parameter(torch.zeros(width))
        self.W2 = nn.Parameter(init_std * torch.randn(D, width, generator=gen))  # starts near the identity map
        self.b2 = nn.Parameter(torch.zeros(D))

    def forward(self, Z: Tensor) -> Tensor:
        hidden = torch.relu(Z @ self.W1.T + self.b1)  # (B, T, width)
        return Z + hidden @ self.W2.T + self.b2  # (B, T, D)


class AttentionMLPTransformer(LinearTransformer):
    """Blocks of (linear attention, ReLU MLP); ``predict_per_layer`` reads out after every *block*."""

    @property
    def args(self) -> dict:
        """The arguments of :func:`attention_mlp_transformer` that rebuild this stack (for ``pretrained``)."""
        attention, mlp = self.layers[0], self.layers[1]
        return {"d": self.d, "n_blocks": len(self.layers) // 2, "n_heads": attention.n_heads,
                "width": mlp.W1.shape[0], "clamp": self.clamp}

    def predict_per_layer(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        """The query logit after every (attention, MLP) block: ``(n_blocks, B)``."""
        self.check_inputs(xs, ys, x_query)
        states = self(make_tokens(xs, ys, x_query), return_all=True)
        return torch.stack([read_prediction(Z) for Z in states[2::2]])


def attention_mlp_transformer(
    d: int, n_blocks: int, n_heads: int = 1, width: int = 32, init_std: float = 1e-3, clamp: float | None = 10.0,
    seed: int = 0,
) -> AttentionMLPTransformer:
    """``n_blocks`` blocks of (linear attention, ReLU MLP), read out as minus the query's y-slot."""
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be an integer >= 1, got {n_blocks!r}")
    gen = generator(seed)
    layers = []
    for _ in range(n_blocks):
        layers += [FullAttention(d, n_heads, init_std, gen), TokenMLP(d, width, init_std, gen)]
    return AttentionMLPTransformer(layers, clamp=clamp)


pretrained.register(AttentionMLPTransformer, build=attention_mlp_transformer)


def predicted_weights(model, xs: Tensor, ys: Tensor) -> Tensor:
    """The weight vector a model trained with ``query="basis"`` outputs: ``(B, n, d), (B, n) -> (B, d)``.

    Coordinate ``m`` is the model's logit for the query ``e_m``; the d probes run as one batch.
    """
    B, n, d = xs.shape
    probes = torch.eye(d, dtype=xs.dtype, device=xs.device).expand(B, d, d).reshape(B * d, d)
    logits = model.predict(xs.repeat_interleave(d, 0), ys.repeat_interleave(d, 0), probes)  # (B d,)
    return logits.reshape(B, d)
