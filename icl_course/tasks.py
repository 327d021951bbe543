"""In-context regression tasks: where the data comes from.

A task draws a batch of *sequences*. Sequence ``b`` has its own weight vector ``w_b``, ``n_ctx``
context pairs ``(x_i, y_i)`` with ``y_i = <w_b, x_i> + eps_i`` and ``eps_i ~ N(0, sigma_b^2)``, and a
query ``x_q`` whose noise-free target ``y_q = <w_b, x_q>`` the learner must predict.

Every chapter's data follows one contract, :class:`Task`: ``sample(batch_size, gen, device)``
draws a batch and ``loss(model, batch)`` is the training objective; ``train`` and the evaluations
call nothing else. Input sampling is separate from the task (as in Garg et al.'s code): a
*distribution* (``Uniform``, ``Gaussian``, ...) has ``draw(shape, gen)`` for a tensor of that shape,
so the same task runs with uniform or Gaussian inputs, isotropic or not. Randomness comes only from the generator
argument: same seed, same batch on the same device. Everything is drawn on the generator's device
(``gen.device``) and in the batch's dtype (float32 unless asked for float64; inside
:func:`float64_draws`, Gaussian draws are made in float64 and rounded, the stream the shipped weights
were trained on), then moved to ``device`` if that is another one: ``train`` passes a generator on
the model's device, so a GPU draws its own batches and nothing is copied; ``generator(seed)`` (on
the CPU) gives the same numbers on every machine, which the evaluation sets use.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .metrics import mse_loss
from .runtime import generator, require_finite  # generator: also importable from here, as before it moved

__all__ = ["Task", "Uniform", "Gaussian", "Choice", "IllConditioned", "RegressionTask", "RegressionBatch", "generator",
           "float64_draws"]


@runtime_checkable
class Task(Protocol):
    """The contract of every chapter's data: what ``train`` and the evaluations call, and nothing else.

    ``RegressionTask`` here and each chapter's task (logistic regression, sequence regression,
    signal-plus-noise data, the looped chapter's objectives) follow it; ``tests/test_task_protocol.py``
    checks every one. A task whose data depend on the training step (a curriculum) also has
    ``sample_at(step, batch_size, gen, device=None)``, which ``train`` then calls instead of ``sample``.
    """

    def sample(self, batch_size: int, gen: torch.Generator, device=None) -> Any:
        """``batch_size`` fresh examples, drawn with ``gen`` on its device and moved to ``device``."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> Tensor:
        """The training objective of ``model`` on ``batch``: a scalar tensor to minimise."""
        ...


# --- distributions: each draws a tensor of a given shape (draw, not a Task's sample) -------------

_FLOAT64_DRAWS = [False]  # set by float64_draws(); otherwise Gaussians are drawn in the batch's dtype


@contextmanager
def float64_draws():
    """Within the block, ``Gaussian`` and ``IllConditioned`` draw in float64 and round to the batch's
    dtype, as every batch was drawn before December 2026: on the CPU, the same seed then gives the
    sequences on which the shipped weights' provenance records were measured (the tests that
    re-measure them use it, through ``pretrained.drawn_as``). Outside it, Gaussians are drawn in the
    batch's dtype on the generator's device: on the CPU a float32 ``randn`` is about six times cheaper."""
    before = _FLOAT64_DRAWS[0]
    _FLOAT64_DRAWS[0] = True
    try:
        yield
    finally:
        _FLOAT64_DRAWS[0] = before


@dataclass(frozen=True)
class Uniform:
    """Independent ``U(low, high)`` entries."""

    low: float = -0.5
    high: float = 0.5

    def __post_init__(self):
        require_finite("Uniform: low", self.low)
        require_finite("Uniform: high", self.high)
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, got low={self.low}, high={self.high}")

    def draw(self, shape, gen: torch.Generator, dtype=torch.float32) -> Tensor:
        # in place: the same numbers as low + (high - low) * rand(...), in half the time
        return torch.empty(shape, dtype=dtype, device=gen.device).uniform_(self.low, self.high, generator=gen)


@dataclass(frozen=True)
class Gaussian:
    """``N(0, cov)`` over the last dimension; ``cov=None`` means ``std^2 I``."""

    cov: Tensor | None = None
    std: float = 1.0

    def __post_init__(self):
        require_finite("Gaussian: std", self.std, at_least=0)
        if self.cov is not None:
            cov = torch.as_tensor(self.cov, dtype=torch.float64)
            if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
                raise ValueError(f"Gaussian cov must be a square matrix, got shape {tuple(cov.shape)}")
            require_finite("Gaussian: cov", cov)
            if not torch.allclose(cov, cov.T, atol=1e-8):
                raise ValueError("Gaussian cov must be symmetric")
            if torch.linalg.eigvalsh(cov).min() < -1e-8:
                raise ValueError("Gaussian cov must be positive semi-definite")

    @property
    def dim(self) -> int | None:
        return None if self.cov is None else int(torch.as_tensor(self.cov).shape[0])

    def draw(self, shape, gen: torch.Generator, dtype=torch.float32) -> Tensor:
        if self.cov is not None and shape[-1] != self.dim:
            raise ValueError(f"Gaussian cov is {self.dim}x{self.dim} but samples need dimension {shape[-1]}")
        if _FLOAT64_DRAWS[0]:
            z = torch.randn(shape, generator=gen, dtype=torch.float64, device=gen.device)
            root = None if self.cov is None else self._root.T.to(z.device)
            return (self.std * z if root is None else self.std * z @ root).to(dtype)
        z = torch.randn(shape, generator=gen, dtype=dtype, device=gen.device)  # in the batch's dtype
        if self.cov is None:
            return z if self.std == 1 else self.std * z
        return z @ (self.std * self._root.T).to(dtype=dtype, device=z.device)

    @functools.cached_property
    def _root(self) -> Tensor:
        """``L`` with ``cov = L L^T`` (by eigh, so a singular cov works too), computed once."""
        evals, evecs = torch.linalg.eigh(torch.as_tensor(self.cov, dtype=torch.float64))
        return evecs * evals.clamp(min=0).sqrt()  # (d, d)


@dataclass(frozen=True)
class Choice:
    """Each entry is one of ``values``, uniformly (e.g. noise levels ``{1, 3}``)."""

    values: tuple[float, ...]

    def __post_init__(self):
        if len(self.values) == 0:
            raise ValueError("Choice needs at least one value")
        for value in self.values:
            require_finite("Choice: values", value)

    def draw(self, shape, gen: torch.Generator, dtype=torch.float32) -> Tensor:
        idx = torch.randint(len(self.values), shape, generator=gen, device=gen.device)
        return torch.tensor(self.values, dtype=dtype, device=gen.device)[idx]


@dataclass(frozen=True)
class IllConditioned:
    """``N(0, U diag(lam) U^T)`` with a fresh Haar-random rotation ``U`` for every sequence.

    The eigenvalues ``lam`` are geometric from ``kappa`` down to 1, rescaled to mean 1 (so
    ``E||x||^2 = d`` as for ``Gaussian()``): the covariance has condition number exactly ``kappa``,
    and no single preconditioner suits all sequences (Fu et al. 2024, Sec. 4). Shapes are
    ``(B, ..., d)``; all of sequence ``b``'s inputs share its rotation.
    """

    d: int
    kappa: float = 10.0

    def __post_init__(self):
        if not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"IllConditioned d must be an integer >= 1, got {self.d!r}")
        require_finite("IllConditioned: kappa (condition number)", self.kappa, at_least=1)

    @property
    def dim(self) -> int:
        return self.d

    def eigenvalues(self) -> Tensor:
        lam = self.kappa ** torch.linspace(1, 0, self.d, dtype=torch.float64) if self.d > 1 else torch.ones(1, dtype=torch.float64)
        return lam / lam.mean()

    def draw(self, shape, gen: torch.Generator, dtype=torch.float32) -> Tensor:
        if shape[-1] != self.d:
            raise ValueError(f"IllConditioned has d={self.d} but samples need dimension {shape[-1]}")
        B, out = shape[0], dtype
        dtype = torch.float64 if _FLOAT64_DRAWS[0] else dtype
        z = torch.randn(shape, generator=gen, dtype=dtype, device=gen.device).reshape(B, -1, self.d)  # (B, m, d)
        # Haar rotation per sequence: QR of a Gaussian matrix, signs fixed by R's diagonal.
        G = torch.randn(B, self.d, self.d, generator=gen, dtype=dtype, device=gen.device)
        U, R = torch.linalg.qr(G)
        U = U * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]  # (B, d, d)
        root = U * self.eigenvalues().sqrt().to(dtype=dtype, device=gen.device)  # (B, d, d): U diag(sqrt(lam))
        return (z @ root.mT).reshape(shape).to(out)


def _support_min(dist) -> float:
    if isinstance(dist, Uniform):
        return dist.low
    if isinstance(dist, Choice):
        return min(dist.values)
    return float("-inf")


# --- the task ----------------------------------------------------------------------------------


@dataclass
class RegressionBatch:
    """One batch of in-context regression sequences (B sequences, n context points, dimension d)."""

    xs: Tensor  # (B, n, d) context inputs
    ys: Tensor  # (B, n)    context targets (noisy)
    x_query: Tensor  # (B, d) query input
    y_query: Tensor  # (B,)   noise-free query target
    w: Tensor  # (B, d)    the sequence's true weights
    sigma: Tensor  # (B,)   the sequence's noise level

    def to(self, device=None, dtype=None) -> "RegressionBatch":
        return RegressionBatch(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.xs, self.ys, self.x_query, self.y_query, self.w, self.sigma)

    def __len__(self) -> int:
        return self.xs.shape[0]


@dataclass(frozen=True)
class RegressionTask:
    """Noisy linear regression in context.

    Args:
        d: input dimension.
        n_ctx: number of context pairs per sequence.
        inputs: distribution of every ``x`` (context and query).
        weights: distribution of ``w`` (one per sequence).
        noise: label-noise standard deviation: a number, or a distribution drawing one
            ``sigma`` per sequence (``Uniform(0, 5)``, ``Choice((1.0, 3.0))``).

    >>> task = RegressionTask(d=3, n_ctx=5)
    >>> batch = task.sample(4, generator(0))
    >>> tuple(batch.xs.shape), tuple(batch.ys.shape), tuple(batch.x_query.shape)
    ((4, 5, 3), (4, 5), (4, 3))
    """

    d: int
    n_ctx: int
    inputs: Uniform | Gaussian = field(default_factory=Uniform)
    weights: Gaussian = field(default_factory=Gaussian)
    noise: float | Uniform | Choice = 0.0

    def __post_init__(self):
        if not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"d must be an integer >= 1, got {self.d!r}")
        if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be an integer >= 1, got {self.n_ctx!r}")
        for name in ("inputs", "weights"):
            if not callable(getattr(getattr(self, name), "draw", None)):
                raise TypeError(f"{name} must be a distribution such as Uniform() or Gaussian(), got {getattr(self, name)!r}")
            dim = getattr(getattr(self, name), "dim", None)
            if dim is not None and dim != self.d:
                raise ValueError(f"{name} covariance is {dim}x{dim} but d={self.d}")
        if not callable(getattr(self.noise, "draw", None)):
            require_finite("noise", self.noise, at_least=0)
        elif _support_min(self.noise) < 0:
            raise ValueError(f"noise levels must be >= 0, got {self.noise}")

    def sample(self, batch_size: int, gen: torch.Generator, device=None, dtype=torch.float32) -> RegressionBatch:
        """Draw ``batch_size`` fresh sequences in ``dtype`` (on ``gen``'s device, then moved to ``device``)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
        B, n, d = batch_size, self.n_ctx, self.d
        x_all = self.inputs.draw((B, n + 1, d), gen, dtype)  # (B, n+1, d): context, then query
        w = self.weights.draw((B, d), gen, dtype)  # (B, d)
        if not callable(getattr(self.noise, "draw", None)):
            sigma = torch.full((B,), float(self.noise), dtype=dtype, device=gen.device)
        else:
            sigma = self.noise.draw((B,), gen, dtype)
        eps = sigma[:, None] * torch.randn((B, n), generator=gen, dtype=dtype, device=gen.device)  # (B, n)
        y_all = torch.einsum("bnd,bd->bn", x_all, w)  # (B, n+1)
        batch = RegressionBatch(
            xs=x_all[:, :n], ys=y_all[:, :n] + eps, x_query=x_all[:, n], y_query=y_all[:, n], w=w, sigma=sigma
        )
        return batch.to(device=device)

    def loss(self, model, batch: RegressionBatch) -> Tensor:
        """The training objective: 0.5 * mean squared error of the model's query prediction."""
        return mse_loss(model.predict(batch.xs, batch.ys, batch.x_query), batch.y_query)
