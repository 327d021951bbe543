"""In-context regression as a token sequence, predicted at every position (for causal sequence models).

Each sequence has its own ``w ~ N(0, I_d / d)``; inputs ``x_i ~ N(0, I_d)`` and targets
``y_i = <w, x_i> + eps_i``, ``eps_i ~ N(0, sigma^2)``, so ``var(y) = 1 + sigma^2``. The pairs are
interleaved as ``2 n`` tokens of dimension ``d + 2``::

    x-token  (x_i, 0,   0)      y-token  (0, y_i, 1)

and a causal model predicts ``y_i`` from its output at the x-token of pair ``i``, having seen pairs
``1..i-1`` and ``x_i``. The loss is 0.5·MSE over all positions, so the model is trained to learn
from every prefix of the context. The sampling reuses :class:`icl_course.tasks.RegressionTask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from icl_course.metrics import mse_loss
from icl_course.runtime import require_finite
from icl_course.tasks import Gaussian, RegressionBatch, RegressionTask

__all__ = ["SequenceRegressionTask", "ridge_by_position"]


@dataclass(frozen=True)
class SequenceRegressionTask:
    """Noisy linear regression, ``n_points`` interleaved (x, y) pairs in dimension ``d``.

    >>> from icl_course import generator
    >>> task = SequenceRegressionTask(d=4, n_points=8)
    >>> tuple(task.tokens(task.sample(2, generator(0))).shape)
    (2, 16, 6)
    """

    d: int = 16
    n_points: int = 64
    noise: float = 0.1

    def __post_init__(self):
        if not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"d must be an integer >= 1, got {self.d!r}")
        if not isinstance(self.n_points, int) or self.n_points < 1:
            raise ValueError(f"n_points must be an integer >= 1, got {self.n_points!r}")
        require_finite("noise", self.noise, at_least=0)

    @property
    def token_dim(self) -> int:
        return self.d + 2

    @property
    def y_variance(self) -> float:
        """``var(y) = E||w||^2 + sigma^2 = 1 + sigma^2``: the error of predicting 0."""
        return 1.0 + self.noise**2

    def regression_task(self) -> RegressionTask:
        return RegressionTask(d=self.d, n_ctx=self.n_points, inputs=Gaussian(), weights=Gaussian(std=self.d**-0.5),
                              noise=self.noise)

    def sample(self, batch_size: int, gen: torch.Generator, device=None, dtype=torch.float32) -> RegressionBatch:
        """``batch_size`` fresh sequences (drawn on the CPU with ``gen``; the query is not used)."""
        return self.regression_task().sample(batch_size, gen, device=device, dtype=dtype)

    def tokens(self, batch: RegressionBatch) -> Tensor:
        """Interleaved tokens: (B, n, d), (B, n) -> (B, 2n, d + 2)."""
        B, n, d = batch.xs.shape
        x_tok = torch.cat([batch.xs, batch.xs.new_zeros(B, n, 2)], dim=-1)  # (B, n, d+2)
        y_tok = torch.cat([batch.xs.new_zeros(B, n, d), batch.ys[..., None], batch.xs.new_ones(B, n, 1)], dim=-1)
        return torch.stack([x_tok, y_tok], dim=2).reshape(B, 2 * n, d + 2)  # x_1, y_1, x_2, y_2, ...

    def predict(self, model, batch: RegressionBatch) -> Tensor:
        """The model's prediction of every ``y_i``, read at the x-tokens: (B, n)."""
        return model(self.tokens(batch))[:, 0::2, 0]  # (B, 2n, 1) -> (B, n)

    def loss(self, model, batch: RegressionBatch) -> Tensor:
        """Training objective: 0.5·MSE over all positions."""
        return mse_loss(self.predict(model, batch), batch.ys)

    @torch.no_grad()
    def squared_errors(self, model, batch: RegressionBatch) -> Tensor:
        """Squared error (not halved) of the prediction of every ``y_i`` of every sequence: (B, n)."""
        return (self.predict(model, batch) - batch.ys) ** 2

    def error_by_position(self, model, batch: RegressionBatch) -> Tensor:
        """Mean squared error (not halved) of the prediction of ``y_i``, for each position: (n,)."""
        return self.squared_errors(model, batch).mean(0)


@torch.no_grad()
def ridge_by_position(task: SequenceRegressionTask, batch: RegressionBatch) -> Tensor:
    """MSE of the Bayes-optimal predictor (ridge with ``lambda = sigma^2 d``) of ``y_i`` from pairs ``< i``: (n,)."""
    xs, ys = batch.xs.double(), batch.ys.double()  # (B, n, d), (B, n)
    B, n, d = xs.shape
    lam = task.noise**2 * d if task.noise > 0 else 1e-8
    errors = []
    for i in range(n):
        X, y = xs[:, :i], ys[:, :i]  # the i pairs seen before x_i
        A = X.mT @ X + lam * torch.eye(d, dtype=xs.dtype)  # [B,d,i] @ [B,i,d] -> [B,d,d]
        w = torch.linalg.solve(A, (X.mT @ y[..., None]))[..., 0]  # (B, d)
        errors.append(((xs[:, i] * w).sum(-1) - ys[:, i]).pow(2).mean())
    return torch.stack(errors).float()
