"""Small causal sequence models whose token mixer is swappable: the outer loop of test-time training.

A :class:`SequenceModel` is a pre-LayerNorm residual stack, ``x <- x + mixer(LN(x))`` then
``x <- x + MLP(LN(x))``, between a linear embedding and a linear read-out. Every mixer has the same
contract, ``mixer(x: (B, T, D)) -> (B, T, D)``, and the same front end (:class:`Views`): the outer
loop's projections ``theta_Q, theta_K, theta_V`` after a short causal convolution (a width-4
depthwise filter over time, which lets a y-token see the x-token before it; it helps every mixer).

Mixers (the names used in the chapter and in ``metrics.json``):

- ``linear-attention``: ``z_t = sum_{i <= t} (q_t . k_i) v_i`` (L2-normalised q, k);
- ``delta-rule``: online GD (``b = 1``) on a linear inner model from ``W0 = 0``, no inner LayerNorm (DeltaNet);
- ``ttt-linear-ln`` / ``ttt-mlp-ln``: the TTT layer of Sun et al. 2024, inner model ``f(x) = x + LN(f_res(x))``;
- ``ttt-linear`` / ``ttt-mlp``: the same layer with the bare inner model ``f = f_res`` (no LayerNorm, no
  residual, no bias). On in-context regression the inner LayerNorm throws away the scale of the
  values, which is where ``y`` lives, and the LN versions learn far more slowly (chapter 5);
- ``softmax``: causal softmax attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icl_course import pretrained
from icl_course.runtime import require_finite

from . import layers as ttt


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

__all__ = ["Views", "LinearAttention", "DeltaRule", "SoftmaxAttention", "TTTMixer", "SequenceModel", "make_mixer", "MIXERS"]


class Views(nn.Module):
    """The outer loop's views of a token: ``q, k, v`` per head, each (B, H, T, f)."""

    def __init__(self, width: int, n_heads: int, conv: int = 4):
        super().__init__()
        _check_counts(width=width, n_heads=n_heads, conv=conv)
        if width % n_heads:
            raise ValueError(f"width ({width}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.conv = n_heads, conv
        self.proj = nn.Linear(width, 3 * width, bias=False)  # theta_Q, theta_K, theta_V stacked
        self.filter = nn.Conv1d(3 * width, 3 * width, conv, groups=3 * width) if conv > 1 else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, D = x.shape
        h = self.proj(x)  # (B, T, 3D)
        if self.filter is not None:
            h = self.filter(F.pad(h.transpose(1, 2), (self.conv - 1, 0))).transpose(1, 2)  # causal: (B, T, 3D)
        q, k, v = h.view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, f)
        return q, k, v


def _merge(z: Tensor) -> Tensor:
    B, H, T, f = z.shape
    return z.transpose(1, 2).reshape(B, T, H * f)  # (B, H, T, f) -> (B, T, D)


class LinearAttention(nn.Module):
    """Causal linear attention with L2-normalised queries and keys (a fixed (f x f) state per head)."""

    def __init__(self, width: int, n_heads: int, chunk: int = 64):
        super().__init__()
        _check_counts(chunk=chunk)
        self.views, self.out = Views(width, n_heads), nn.Linear(width, width, bias=False)
        self.chunk = chunk

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.views(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return self.out(_merge(ttt.linear_attention_chunked(q, k, v, self.chunk)[0]))


class SoftmaxAttention(nn.Module):
    """Causal softmax attention (its key-value cache grows with the sequence)."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.views, self.out = Views(width, n_heads), nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.views(x)
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class TTTMixer(nn.Module):
    """A TTT layer (Sun et al. 2024, Sec. 2): the hidden state is an inner model trained by GD on the sequence.

    Args:
        width, n_heads: model width ``D`` and heads; each head has ``f = D / n_heads`` features.
        inner: ``"linear"`` or ``"mlp"`` (two layers, hidden ``4 f``, GELU).
        mini_batch: inner mini-batch size ``b`` (gradients at the state of the previous mini-batch).
        inner_ln: ``f(x) = x + LN(f_res(x))`` when True (TTT-Linear/MLP), ``f = f_res`` otherwise.
        eta_base: the inner learning rate is ``eta_base * sigmoid(theta_lr . x) / f`` per token and head.
        normalize_qk: L2-normalise queries and keys (as DeltaNet does; keeps the inner loss well scaled).
        dual: run the dual form (fast) or the primal form (readable); both give the same output.
        inner_std: standard deviation of the initial inner weights ``W0`` (one per layer if a tuple; learned by the outer loop).
        inner_steps: GD steps on each mini-batch before the next one (MTTT's inner epochs; 1 in TTT-Linear).
        learn_w0: the outer loop learns ``W0`` (the paper); False keeps ``W0 = 0`` (and the biases 0) fixed.
    """

    def __init__(self, width: int, n_heads: int, inner: str = "linear", mini_batch: int = 16,
                 inner_ln: bool = True, eta_base: float = 1.0, normalize_qk: bool = True, dual: bool = True,
                 inner_std: float | tuple[float, ...] = 0.02, inner_steps: int = 1, learn_w0: bool = True):
        super().__init__()
        if not isinstance(mini_batch, int) or mini_batch < 1:
            raise ValueError(f"mini_batch must be an integer >= 1, got {mini_batch!r}")
        if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not isinstance(learn_w0, bool):
            raise ValueError(f"learn_w0 must be a bool, got {learn_w0!r}")
        require_finite("eta_base", eta_base, above=0)
        self.inner_steps = inner_steps
        self.views, self.out = Views(width, n_heads), nn.Linear(width, width, bias=False)
        self.n_heads, self.f = n_heads, width // n_heads
        self.mini_batch, self.eta_base, self.normalize_qk, self.dual = mini_batch, eta_base, normalize_qk, dual
        self.lr_gate = nn.Linear(width, n_heads)  # theta_lr: the learnable inner learning rate
        params = ttt.init_inner_params(self.f, n_heads, inner, std=inner_std, bias=inner_ln)
        if not learn_w0:  # W0 = 0, fixed: the inner model starts from scratch on every sequence
            params = [(torch.zeros_like(W), None if b is None else torch.zeros_like(b)) for W, b in params]
        self.W0 = nn.ParameterList([nn.Parameter(W, requires_grad=learn_w0) for W, _ in params])  # (H, f_in, f_out) each
        self.b0 = nn.ParameterList([nn.Parameter(b, requires_grad=learn_w0) for _, b in params if b is not None])
        if inner_ln:
            self.ln_weight = nn.Parameter(torch.ones(n_heads, self.f))  # (H, f)
            self.ln_bias = nn.Parameter(torch.zeros(n_heads, self.f))  # (H, f)
        self.inner_ln = inner_ln

    def inner_params(self) -> ttt.InnerParams:
        biases = list(self.b0) if len(self.b0) else [None] * len(self.W0)
        return list(zip(self.W0, biases))

    def eta(self, x: Tensor) -> Tensor:
        """Per-token, per-head inner learning rates: (B, T, D) -> (B, H, T)."""
        return (self.eta_base * torch.sigmoid(self.lr_gate(x)) / self.f).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.views(x)
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        ln = (self.ln_weight, self.ln_bias) if self.inner_ln else None
        layer = ttt.ttt_dual if self.dual else ttt.ttt_primal
        z, _ = layer(q, k, v, self.eta(x), self.inner_params(), self.mini_batch, ln=ln, residual=self.inner_ln,
                     inner_steps=self.inner_steps)
        return self.out(_merge(z))


class DeltaRule(nn.Module):
    """The delta rule (DeltaNet): online GD, ``b = 1``, on ``f(k) = k W`` from ``W0 = 0``, no inner LayerNorm.

    ``beta_t = sigmoid(theta_lr . x_t)`` per head is ``2 eta_t`` of the TTT layer (the identity the chapter
    checks); it runs in the chunkwise parallel form :func:`icl_course.topics.ttt.layers.delta_rule_chunked`.
    """

    def __init__(self, width: int, n_heads: int, chunk: int = 16):
        super().__init__()
        _check_counts(chunk=chunk)
        self.views, self.out = Views(width, n_heads), nn.Linear(width, width, bias=False)
        self.lr_gate, self.chunk = nn.Linear(width, n_heads), chunk

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.views(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.lr_gate(x)).transpose(1, 2)  # (B, T, H) -> (B, H, T)
        return self.out(_merge(ttt.delta_rule_chunked(q, k, v, beta, self.chunk)[0]))


def make_mixer(name: str, width: int, n_heads: int, mini_batch: int = 16, **kwargs) -> nn.Module:
    """A mixer by the chapter's name (``MIXERS``); ``mini_batch`` applies to ``ttt-*``; kwargs go to TTTMixer."""
    if name == "linear-attention":
        return LinearAttention(width, n_heads)
    if name == "softmax":
        return SoftmaxAttention(width, n_heads)
    if name == "delta-rule":
        return DeltaRule(width, n_heads)
    if name in ("ttt-linear", "ttt-mlp"):
        return TTTMixer(width, n_heads, name[4:], mini_batch=mini_batch, **{"inner_ln": False, **kwargs})
    if name in ("ttt-linear-ln", "ttt-mlp-ln"):
        return TTTMixer(width, n_heads, name[4:-3], mini_batch=mini_batch, **{"inner_ln": True, **kwargs})
    raise ValueError(f"mixer must be one of {MIXERS}, got {name!r}")


MIXERS = ("linear-attention", "delta-rule", "ttt-linear", "ttt-linear-ln", "ttt-mlp", "ttt-mlp-ln", "softmax")


class SequenceModel(nn.Module):
    """Embedding -> ``n_layers`` x [mixer, MLP] (pre-LN, residual) -> read-out: (B, T, d_in) -> (B, T, d_out)."""

    def __init__(self, d_in: int, d_out: int, mixer: str = "ttt-linear", width: int = 64, n_layers: int = 2,
                 n_heads: int = 4, mini_batch: int = 16, seed: int = 0, **mixer_kwargs):
        super().__init__()
        _check_counts(d_in=d_in, d_out=d_out, width=width, n_layers=n_layers, n_heads=n_heads)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.d_in = d_in
        self.mixer_name = mixer
        # the architecture (not the init) that rebuilds the model from shipped weights (icl_course.pretrained)
        self.args = {"d_in": d_in, "d_out": d_out, "mixer": mixer, "width": width, "n_layers": n_layers,
                     "n_heads": n_heads, "mini_batch": mini_batch,
                     **{k: list(v) if isinstance(v, tuple) else v for k, v in mixer_kwargs.items()}}
        with torch.random.fork_rng(devices=[]):  # the initialisation is a function of the seed alone
            torch.manual_seed(seed)
            self.embed = nn.Linear(d_in, width)
            self.mixers = nn.ModuleList([make_mixer(mixer, width, n_heads, mini_batch, **mixer_kwargs) for _ in range(n_layers)])
            self.mlps = nn.ModuleList(
                [nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(n_layers)]
            )
            self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(2 * n_layers + 1)])
            self.readout = nn.Linear(width, d_out)

    def forward(self, tokens: Tensor) -> Tensor:
        dtype = self.embed.weight.dtype
        if not torch.is_tensor(tokens) or tokens.ndim != 3 or tokens.shape[-1] != self.d_in or tokens.dtype != dtype:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if torch.is_tensor(tokens) else type(tokens).__name__
            raise ValueError(f"tokens must be a {dtype} tensor of shape (B, T, d_in={self.d_in}) (cast the batch, or the "
                             f"model with .double() / .float()), got {got}")
        h = self.embed(tokens)  # (B, T, D)
        for i, (mixer, mlp) in enumerate(zip(self.mixers, self.mlps)):
            h = h + mixer(self.norms[2 * i](h))  # (B, T, D)
            h = h + mlp(self.norms[2 * i + 1](h))  # (B, T, D)
        return self.readout(self.norms[-1](h))  # (B, T, d_out)


pretrained.register(SequenceModel)
