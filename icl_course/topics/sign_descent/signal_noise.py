"""Signal-plus-noise classification with a two-layer softmax-attention transformer.

The data model and the network of Li et al. 2024 (arXiv 2410.04870, Sec. 3), used to ask how the
*outer* optimizer (GD, sign descent, Adam) shapes what a transformer learns.

**Data.** A label ``y`` in {-1, +1} and two patches: the signal patch ``x1 = y * mu`` with
``mu = ||mu|| e_1`` the same for every sample, and the noise patch ``x2 = xi``, a sparse Gaussian
vector: ``s`` coordinates (never the signal's), drawn afresh for every sample, each ``N(0, sigma_p^2)``.
We fix the noise size ``sigma_p sqrt(s)`` (``noise_norm``) and set the signal size through the
signal-to-noise ratio ``snr = ||mu|| / (sigma_p sqrt(s))``. With ``d >> n`` the noise patches of
different samples barely overlap, so a network can fit the labels by memorising each sample's noise.

**Model.** Softmax attention with trainable query, key and value weights, then a fixed linear layer
(the paper's eq. 3.1)::

    F_j(X) = (1/m_v) sum_l 1^T W_{V,j} X softmax(X^T W_K^T W_Q x_l),    f(X) = F_{+1}(X) - F_{-1}(X)

with ``W_Q, W_K`` of shape ``(m_k, d)`` and one value matrix ``W_{V,j}`` of shape ``(m_v, d)`` per
output sign ``j``. The loss is logistic, ``mean log(1 + exp(-y f(X)))``, on a fixed training set.

:func:`stage_quantities` measures the inner products the paper's four-stage analysis tracks, and
:func:`signal_votes` the query/key signal terms against majority votes of their noise terms (stage III).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from icl_course.runtime import generator

__all__ = [
    "SignalNoiseTask",
    "SignalNoiseBatch",
    "SoftmaxAttentionClassifier",
    "logistic_loss",
    "accuracy",
    "value_noise",
    "value_signal",
    "stage_quantities",
    "signal_votes",
    "STAGE_QUANTITIES",
]


@dataclass
class SignalNoiseBatch:
    """``n`` samples: patches ``X (n, 2, d)`` (signal first), labels ``y (n,)``, noise ``xi (n, d)``, signal ``mu (d,)``."""

    X: Tensor
    y: Tensor
    xi: Tensor
    mu: Tensor

    def to(self, device=None, dtype=None) -> "SignalNoiseBatch":
        return SignalNoiseBatch(*(t.to(device=device, dtype=dtype) for t in (self.X, self.y, self.xi, self.mu)))

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass(frozen=True)
class SignalNoiseTask:
    """The data model: ``d`` dimensions, noise on ``sparsity`` coordinates, ``snr = ||mu|| / noise_norm``.

    >>> batch = SignalNoiseTask(d=100, snr=0.5, sparsity=5).sample(8, generator(0))
    >>> tuple(batch.X.shape), int((batch.xi != 0).sum(dim=1).max())
    ((8, 2, 100), 5)
    """

    d: int = 2000  # dimension of every patch
    snr: float = 0.5  # ||mu|| / (sigma_p sqrt(s))
    sparsity: int = 40  # s: non-zero coordinates of each noise patch
    noise_norm: float = 1.0  # sigma_p sqrt(s), the typical size of a noise patch

    def __post_init__(self):
        if not isinstance(self.d, int) or self.d < 2:
            raise ValueError(f"d must be an integer >= 2, got {self.d!r}")
        if not isinstance(self.sparsity, int) or not 1 <= self.sparsity <= self.d - 1:
            raise ValueError(f"sparsity must be an integer in [1, d - 1], got {self.sparsity!r}")
        if not (self.snr >= 0 and math.isfinite(self.snr)):
            raise ValueError(f"snr must be a finite number >= 0, got {self.snr!r}")
        if not (self.noise_norm > 0 and math.isfinite(self.noise_norm)):
            raise ValueError(f"noise_norm must be a finite number > 0, got {self.noise_norm!r}")

    @property
    def sigma_p(self) -> float:
        return self.noise_norm / math.sqrt(self.sparsity)

    @property
    def mu(self) -> Tensor:
        mu = torch.zeros(self.d, dtype=torch.float64)
        mu[0] = self.snr * self.noise_norm
        return mu

    def sample(self, batch_size: int, gen: torch.Generator, device=None, dtype=torch.float32) -> SignalNoiseBatch:
        """``batch_size`` fresh samples, drawn with ``gen`` on its device (in float64) and moved to ``device``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        n, d, s = batch_size, self.d, self.sparsity
        on = gen.device
        y = 2.0 * torch.randint(2, (n,), generator=gen, dtype=torch.float64, device=on) - 1  # (n,) in {-1, +1}
        support = torch.rand(n, d - 1, generator=gen, device=on).argsort(dim=1)[:, :s] + 1  # (n, s), never coordinate 0
        values = self.sigma_p * torch.randn(n, s, generator=gen, dtype=torch.float64, device=on)  # (n, s)
        xi = torch.zeros(n, d, dtype=torch.float64, device=on).scatter_(1, support, values)  # (n, d)
        mu = self.mu.to(on)
        X = torch.stack([y[:, None] * mu, xi], dim=1)  # (n, 2, d): signal patch, noise patch
        return SignalNoiseBatch(X, y, xi, mu).to(device=device, dtype=dtype)

    def loss(self, model: nn.Module, batch: SignalNoiseBatch) -> Tensor:
        """The training objective: the logistic loss of the model's logits."""
        return logistic_loss(model(batch.X), batch.y)


class SoftmaxAttentionClassifier(nn.Module):
    """One softmax-attention layer (trainable ``W_Q, W_K, W_V``) and a fixed ``+-1/m_v`` output layer.

    ``W_V`` has shape ``(2, m_v, d)``: ``W_V[0]`` is the paper's ``W_{V,+1}``, ``W_V[1]`` its
    ``W_{V,-1}``. Every entry starts ``N(0, init_std^2)``, drawn on the CPU from ``seed``.

    >>> model = SoftmaxAttentionClassifier(d=6, width=3, seed=0)
    >>> X = torch.randn(4, 2, 6)
    >>> tuple(model(X).shape), tuple(model.attention(X).shape)
    ((4,), (4, 2, 2))
    """

    def __init__(self, d: int, width: int = 10, value_width: int | None = None, init_std: float = 0.1, seed: int = 0):
        super().__init__()
        value_width = width if value_width is None else value_width
        for name, value in (("d", d), ("width", width), ("value_width", value_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (init_std > 0 and math.isfinite(init_std)):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        gen = generator(seed)
        self.d = d
        self.W_Q = nn.Parameter(init_std * torch.randn(width, d, generator=gen))  # (m_k, d)
        self.W_K = nn.Parameter(init_std * torch.randn(width, d, generator=gen))  # (m_k, d)
        self.W_V = nn.Parameter(init_std * torch.randn(2, value_width, d, generator=gen))  # (2, m_v, d)

    def attention(self, X: Tensor) -> Tensor:
        """Softmax scores ``S[i, l, l'] = softmax_l'(<W_Q x_l, W_K x_l'>)``: ``(n, 2, 2)``, rows sum to 1."""
        if X.ndim != 3 or X.shape[-1] != self.d:
            raise ValueError(f"X must have shape (n, patches, {self.d}), got {tuple(X.shape)}")
        if X.dtype != self.W_Q.dtype:
            raise ValueError(f"X has dtype {X.dtype} but the model's parameters are {self.W_Q.dtype}: cast the batch "
                             f"(batch.to(dtype={self.W_Q.dtype})) or the model (model.double() / model.float())")
        q = X @ self.W_Q.T  # (n, L, d) @ (d, m_k) -> (n, L, m_k)
        k = X @ self.W_K.T  # (n, L, m_k)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (n, L_query, L_key)

    def forward(self, X: Tensor) -> Tensor:
        """The logit ``f(X)`` of every sample: ``(n,)``."""
        scores = self.attention(X)  # (n, L, L)
        values = X @ self.W_V.mean(dim=1).T  # (n, L, d) @ (d, 2) -> (n, L, 2): mean_r <w_{V,j,r}, x_l'>
        out = (scores @ values).sum(dim=1)  # (n, L, L) @ (n, L, 2) -> (n, L, 2), summed over query patches l
        return out[:, 0] - out[:, 1]  # F_{+1} - F_{-1}

    def predict(self, X: Tensor) -> Tensor:
        """Labels in {-1, +1} (0 only on an exact tie)."""
        return torch.sign(self(X))


def logistic_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``mean log(1 + exp(-y * logits))``, computed stably."""
    if logits.shape != y.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but y has shape {tuple(y.shape)}")
    return nn.functional.softplus(-y * logits).mean()


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of samples with ``sign(logit) == y``."""
    if logits.shape != y.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but y has shape {tuple(y.shape)}")
    return (torch.sign(logits) == y).float().mean().item()


# --- the quantities of the four-stage analysis (Li et al. 2024, Sec. 4) ----------------------------

STAGE_QUANTITIES = {
    "value_noise": "mean_{i,j} j <w_V,j, y_i xi_i>: how much the values fit each sample's own noise",
    "value_signal": "mean_j j <w_V,j, mu>: how much the values use the shared signal",
    "key_noise": "mean_{s,i} |<w_K,s, y_i xi_i>|",
    "query_noise": "mean_{s,i} |<w_Q,s, y_i xi_i>|",
    "attention_noise_to_signal": "mean_i S[i, noise, signal]: the noise patch's attention to the signal patch",
    "attention_signal_to_signal": "mean_i S[i, signal, signal]",
    "qk_noise_sign_agreement": "fraction of (s, i) with sign <w_Q,s, y_i xi_i> = sign <w_K,s, y_i xi_i>",
    # stage III: the signs of the query and key *signal* terms against a vote of each neuron's noise terms
    "query_signal_signs": "sign <w_Q,s, mu> for every neuron s (a list of m_k numbers in {-1, 0, 1})",
    "key_signal_signs": "sign <w_K,s, mu> for every neuron s",
    "query_signal_vote_agreement": "fraction of s with sign <w_Q,s, mu> = sign sum_i <w_Q,s, y_i xi_i> (vote by sum)",
    "key_signal_vote_agreement": "fraction of s with sign <w_K,s, mu> = sign sum_i <w_K,s, y_i xi_i> (vote by sum)",
    "query_signal_count_vote_agreement": "the same with the vote by count, sign sum_i sign <w_Q,s, y_i xi_i>",
    "key_signal_count_vote_agreement": "the same with the vote by count, sign sum_i sign <w_K,s, y_i xi_i>",
}


def _signed_mean_values(model: SoftmaxAttentionClassifier) -> Tensor:
    """``j * mean_r w_{V,j,r}`` for j = +1, -1: ``(2, d)``, the direction each half pushes ``f`` along."""
    sign_j = torch.tensor([1.0, -1.0], device=model.W_V.device, dtype=model.W_V.dtype)
    return sign_j[:, None] * model.W_V.mean(dim=1)  # (2, d)


@torch.no_grad()
def value_noise(model: SoftmaxAttentionClassifier, batch: SignalNoiseBatch) -> Tensor:
    """``mean_{j,r} j <w_{V,j,r}, y_i xi_i>`` for every sample ``i``: ``(n,)``.

    How far the values have moved toward each sample's *own* noise, in the direction that fits
    its label: noise memorisation.
    """
    y_xi = batch.y[:, None] * batch.xi  # (n, d)
    return (_signed_mean_values(model) @ y_xi.T).mean(dim=0)  # (2, d) @ (d, n) -> (2, n) -> (n,)


@torch.no_grad()
def value_signal(model: SoftmaxAttentionClassifier, batch: SignalNoiseBatch) -> float:
    """``mean_{j,r} j <w_{V,j,r}, mu>``: how far the values have moved toward the shared signal."""
    return (_signed_mean_values(model) @ batch.mu).mean().item()


@torch.no_grad()
def signal_votes(model: SoftmaxAttentionClassifier, batch: SignalNoiseBatch) -> dict[str, Tensor]:
    """Per query/key neuron ``s``: the signal term and two majority votes of its noise terms.

    ``{"query_signal", "key_signal"}``: ``<w_Q,s, mu>`` and ``<w_K,s, mu>``, ``(m_k,)``;
    ``{"query_vote", "key_vote"}``: ``sign sum_i <w_., s, y_i xi_i>`` (the vote by sum);
    ``{"query_count_vote", "key_count_vote"}``: ``sign sum_i sign <w_., s, y_i xi_i>`` (one vote per sample).
    """
    y_xi = batch.y[:, None] * batch.xi  # (n, d)
    out = {}
    for name, W in (("query", model.W_Q), ("key", model.W_K)):
        noise = W @ y_xi.T  # (m_k, n)
        out[f"{name}_signal"] = W @ batch.mu  # (m_k,)
        out[f"{name}_vote"] = torch.sign(noise.sum(dim=1))
        out[f"{name}_count_vote"] = torch.sign(torch.sign(noise).sum(dim=1))
    return out


@torch.no_grad()
def stage_quantities(model: SoftmaxAttentionClassifier, batch: SignalNoiseBatch) -> dict[str, float]:
    """The inner products of :data:`STAGE_QUANTITIES` on ``batch`` (the training set)."""
    y_xi = batch.y[:, None] * batch.xi  # (n, d)
    query_noise = model.W_Q @ y_xi.T  # (m_k, n)
    key_noise = model.W_K @ y_xi.T  # (m_k, n)
    scores = model.attention(batch.X)  # (n, 2, 2); patch 0 is the signal
    votes = signal_votes(model, batch)
    signs = {name: torch.sign(votes[f"{name}_signal"]) for name in ("query", "key")}
    agree = lambda a, b: (a == b).float().mean().item()  # noqa: E731
    return {
        "value_noise": value_noise(model, batch).mean().item(),
        "value_signal": value_signal(model, batch),
        "key_noise": key_noise.abs().mean().item(),
        "query_noise": query_noise.abs().mean().item(),
        "attention_noise_to_signal": scores[:, 1, 0].mean().item(),
        "attention_signal_to_signal": scores[:, 0, 0].mean().item(),
        "qk_noise_sign_agreement": (torch.sign(query_noise) == torch.sign(key_noise)).float().mean().item(),
        "query_signal_signs": signs["query"].tolist(),
        "key_signal_signs": signs["key"].tolist(),
        **{f"{name}_signal_vote_agreement": agree(signs[name], votes[f"{name}_vote"]) for name in ("query", "key")},
        **{f"{name}_signal_count_vote_agreement": agree(signs[name], votes[f"{name}_count_vote"]) for name in ("query", "key")},
    }
