"""Test-time training (TTT): a layer whose hidden state is a model, trained on the sequence itself.

Sun et al. 2024 (arXiv 2407.04620); the nested loops go back to Sun et al. 2023 (arXiv 2310.13807).
Per head, a token gives a key ``k_t``, a value ``v_t`` and a query ``q_t`` (the outer loop's views
``theta_K x``, ``theta_V x``, ``theta_Q x``). The *inner* model ``f(.; W)`` is trained on the sequence
by gradient descent on the self-supervised reconstruction loss (their Eq. 4)::

    l_t(W) = || f(k_t; W) - v_t ||^2,        f(x; W) = x + LN(f_res(x; W))   (or f = f_res)

and the layer outputs ``z_t = f(q_t; W_t)``. ``f_res`` is linear (TTT-Linear) or a two-layer MLP
with GELU (TTT-MLP). Tokens are processed in mini-batches of ``b``: inside a mini-batch every
gradient is taken at ``W_s``, the state after the previous mini-batch (their Sec. 2.5), so

    W_t = W_s - sum_{s < i <= t} eta_i grad l_i(W_s)         for t in the mini-batch.

Two forms compute the same thing:

- :func:`ttt_primal` materialises ``W_t`` for every token: readable, memory-hungry, slow;
- :func:`ttt_dual` never forms ``W_t``: it writes ``z_t`` with matrix products inside the mini-batch
  (their Sec. 2.7). The tests check that they agree to float tolerance.

The functions here are the closed forms the layer is compared with: (causal) linear attention,
the delta rule and Nadaraya-Watson kernel regression (softmax attention).

Shapes: ``B`` sequences, ``H`` heads, ``T`` tokens, ``f`` features per head; ``q, k, v`` are
``(B, H, T, f)`` and ``eta`` is ``(B, H, T)`` (one inner learning rate per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from icl_course.runtime import require_finite

__all__ = [
    "InnerParams",
    "init_inner_params",
    "ttt_primal",
    "ttt_dual",
    "inner_loss_grads",
    "one_gd_step_full_batch",
    "linear_attention",
    "linear_attention_chunked",
    "delta_rule",
    "delta_rule_chunked",
    "nadaraya_watson",
    "softmax_attention",
    "gelu",
    "gelu_grad",
]

# The inner model's parameters: one (W, b) pair per linear layer, W (.., f_in, f_out), b (.., f_out)
# or None (no bias). They broadcast against (B, H): the outer loop learns W0 of shape (H, f_in, f_out).
InnerParams = list[tuple[Tensor, Tensor]]

_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(z: Tensor) -> Tensor:
    """GELU, tanh approximation (its derivative has a closed form, needed by the dual form)."""
    return F.gelu(z, approximate="tanh")


def gelu_grad(z: Tensor) -> Tensor:
    """``d gelu(z) / dz`` for the tanh approximation."""
    u = _GELU_C * (z + 0.044715 * z**3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)


def init_inner_params(f: int, n_heads: int, kind: str = "linear", hidden_mult: int = 4,
                      std: float | tuple[float, ...] = 0.02, bias: bool = True,
                      gen: torch.Generator | None = None) -> InnerParams:
    """Initial inner weights ``W0`` for ``n_heads`` heads: ``kind="linear"`` or ``"mlp"``.

    Weights are ``N(0, std^2)`` (the paper's 0.02), or one std per layer if ``std`` is a tuple;
    biases 0; ``bias=False`` leaves them out.
    """
    if kind not in ("linear", "mlp"):
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
    if not isinstance(f, int) or f < 1:
        raise ValueError(f"f must be an integer >= 1, got {f!r}")
    for name, value in (("n_heads", n_heads), ("hidden_mult", hidden_mult)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    dims = [f, f] if kind == "linear" else [f, hidden_mult * f, f]
    stds = tuple(std) if isinstance(std, (tuple, list)) else (std,) * (len(dims) - 1)
    if len(stds) != len(dims) - 1:
        raise ValueError(f"std must be one number or one per layer ({len(dims) - 1}), got {std!r}")
    for s in stds:
        require_finite("std", s, at_least=0)
    params = []
    for f_in, f_out, s in zip(dims[:-1], dims[1:], stds):
        W = s * torch.randn(n_heads, f_in, f_out, generator=gen)  # (H, f_in, f_out)
        params.append((W, torch.zeros(n_heads, f_out) if bias else None))  # b: (H, f_out)
    return params


# --- the inner model and its gradient, by hand (the dual form needs the pieces) -----------------


def _layer_norm(h: Tensor, ln: tuple[Tensor, Tensor], eps: float = 1e-6):
    """Per-head LayerNorm over features; returns the output and what its backward pass needs."""
    gamma, beta = ln  # (H, f) each
    mu = h.mean(-1, keepdim=True)  # (B, H, n, 1)
    std = (h.var(-1, keepdim=True, unbiased=False) + eps).sqrt()  # (B, H, n, 1)
    h_hat = (h - mu) / std  # (B, H, n, f)
    return gamma[:, None, :] * h_hat + beta[:, None, :], h_hat, std


def _layer_norm_backward(grad_out: Tensor, h_hat: Tensor, std: Tensor, gamma: Tensor) -> Tensor:
    """``dl/dh`` from ``dl/dLN(h)``: the standard LayerNorm backward pass."""
    g = grad_out * gamma[:, None, :]  # (B, H, n, f): dl/dh_hat
    return (g - g.mean(-1, keepdim=True) - h_hat * (g * h_hat).mean(-1, keepdim=True)) / std


def _forward(x: Tensor, params: InnerParams) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``f_res(x)`` with the state shared by all n tokens; also every layer's input and pre-activation."""
    inputs, pre = [], []
    h = x  # (B, H, n, f)
    for layer, (W, b) in enumerate(params):
        inputs.append(h)
        z = h @ W  # [B,H,n,f_in] @ [B,H,f_in,f_out] -> [B,H,n,f_out]
        z = z if b is None else z + b[..., None, :]
        pre.append(z)
        h = gelu(z) if layer < len(params) - 1 else z
    return h, inputs, pre


def _head(x: Tensor, h: Tensor, ln, residual: bool):
    """The output ``f(x) = x + LN(h)`` (or without LN / residual) and LayerNorm's saved tensors."""
    saved = None
    if ln is not None:
        h, h_hat, std = _layer_norm(h, ln)
        saved = (h_hat, std)
    return (x + h if residual else h), saved


def inner_loss_grads(k: Tensor, v: Tensor, params: InnerParams, ln=None, residual: bool = False):
    """Per-token gradients of ``l_i(W) = ||f(k_i; W) - v_i||^2`` at the shared state ``params``.

    Returns ``(inputs, grads)``: for every linear layer, its input on each key ``x_i`` (B, H, n, f_in)
    and ``g_i = dl_i / d(pre-activation)`` (B, H, n, f_out). Then ``grad_W l_i = x_i^T g_i`` and
    ``grad_b l_i = g_i``: each token's gradient is an outer product, which the dual form exploits.
    """
    h, inputs, pre = _forward(k, params)
    out, saved = _head(k, h, ln, residual)
    g = 2 * (out - v)  # (B, H, n, f): dl/df
    if ln is not None:
        g = _layer_norm_backward(g, *saved, ln[0])
    grads = [g]
    for layer in range(len(params) - 1, 0, -1):  # back through the hidden layers
        W = params[layer][0]
        g = (g @ W.transpose(-1, -2)) * gelu_grad(pre[layer - 1])  # [B,H,n,f_out] @ [B,H,f_out,f_in]
        grads.insert(0, g)
    return inputs, grads


def _check(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, mini_batch: int, names=("eta", "mini_batch")) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape (B, H, T, f), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if eta.shape != q.shape[:3]:
        raise ValueError(f"{names[0]} must have shape (B, H, T) = {tuple(q.shape[:3])}, got {tuple(eta.shape)}")
    if not isinstance(mini_batch, int) or mini_batch < 1:
        raise ValueError(f"{names[1]} must be an integer >= 1, got {mini_batch!r}")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _expand(params: InnerParams, B: int) -> InnerParams:
    """Give the state a batch dimension: (H, ...) -> (B, H, ...); (B, H, ...) stays."""
    return [(W.expand(B, *W.shape[-3:]) if W.ndim == 3 else W,
             b.expand(B, *b.shape[-2:]) if b is not None and b.ndim == 2 else b) for W, b in params]


# --- the primal form: readable ------------------------------------------------------------------


def ttt_primal(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, params: InnerParams, mini_batch: int = 16,
               ln=None, residual: bool = False, inner_steps: int = 1) -> tuple[Tensor, InnerParams]:
    """The TTT layer, primal form: build every token's weights ``W_t`` and apply them to ``q_t``.

    Returns ``(z, final_params)`` with ``z`` (B, H, T, f). ``ln`` is ``(gamma, beta)`` (each (H, f))
    for ``f = x + LN(f_res)`` with ``residual=True``; ``ln=None, residual=False`` gives ``f = f_res``.
    ``inner_steps = E > 1`` takes ``E - 1`` more full-batch GD steps on each mini-batch before the next
    one starts (:func:`_more_steps`): ``E`` inner epochs, as MTTT's ``T`` (causal: the outputs of a
    mini-batch still come from its single step; only the later mini-batches see the extra steps).
    """
    _check(q, k, v, eta, mini_batch)
    _check_steps(inner_steps)
    B, H, T, f = q.shape
    params = _expand(params, B)
    outputs = []
    for s in range(0, T, mini_batch):
        sl = slice(s, min(s + mini_batch, T))
        inputs, grads = inner_loss_grads(k[:, :, sl], v[:, :, sl], params, ln, residual)  # at W_s
        e = eta[:, :, sl, None, None]  # (B, H, n, 1, 1)
        per_token = []
        for (W, b), x, g in zip(params, inputs, grads):
            grad_W = x[..., :, None] * g[..., None, :]  # (B, H, n, f_in, f_out): x_i^T g_i, one per token
            W_t = W[:, :, None] - torch.cumsum(e * grad_W, dim=2)  # (B, H, n, f_in, f_out)
            b_t = None if b is None else b[:, :, None] - torch.cumsum(e[..., 0] * g, dim=2)  # (B, H, n, f_out)
            per_token.append((W_t, b_t))
        h = q[:, :, sl]  # (B, H, n, f): each query meets its own token's weights
        for layer, (W_t, b_t) in enumerate(per_token):
            h = torch.einsum("bhni,bhnio->bhno", h, W_t)  # (B, H, n, f_out)
            h = h if b_t is None else h + b_t
            h = gelu(h) if layer < len(per_token) - 1 else h
        outputs.append(_head(q[:, :, sl], h, ln, residual)[0])
        params = [(W_t[:, :, -1], None if b_t is None else b_t[:, :, -1]) for W_t, b_t in per_token]  # at its end
        params = _more_steps(k[:, :, sl], v[:, :, sl], eta[:, :, sl], params, ln, residual, inner_steps - 1)
    return torch.cat(outputs, dim=2), params


def _check_steps(inner_steps) -> None:
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")


def _more_steps(k: Tensor, v: Tensor, eta: Tensor, params: InnerParams, ln, residual: bool, steps: int) -> InnerParams:
    """``steps`` more GD steps on one mini-batch's loss ``sum_i eta_i l_i(W)``, each at the current state."""
    for _ in range(steps):
        inputs, grads = inner_loss_grads(k, v, params, ln, residual)
        eg = [eta[..., None] * g for g in grads]  # (B, H, n, f_out)
        params = [(W - x.transpose(-1, -2) @ e, None if b is None else b - e.sum(2))
                  for (W, b), x, e in zip(params, inputs, eg)]
    return params


# --- the dual form: fast --------------------------------------------------------------------------


def ttt_dual(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, params: InnerParams, mini_batch: int = 16,
             ln=None, residual: bool = False, inner_steps: int = 1) -> tuple[Tensor, InnerParams]:
    """The TTT layer, dual form: the same output as :func:`ttt_primal` without forming any ``W_t``.

    With ``grad_W l_i = x_i^T g_i``, a layer's pre-activation on query ``t`` is
    ``x^q_t W_t + b_t = x^q_t W_s + b_s - sum_{i <= t} eta_i (x^q_t . x_i + 1) g_i``, i.e. per mini-batch
    ``Z = X^q W_s + b_s - (tril(X^q X^T + 1) * eta) G``: (b x b) matrices instead of b (f x f) ones.
    """
    _check(q, k, v, eta, mini_batch)
    _check_steps(inner_steps)
    B, H, T, f = q.shape
    params = _expand(params, B)
    outputs = []
    for s in range(0, T, mini_batch):
        sl = slice(s, min(s + mini_batch, T))
        n = sl.stop - sl.start
        inputs, grads = inner_loss_grads(k[:, :, sl], v[:, :, sl], params, ln, residual)  # at W_s
        e = eta[:, :, None, sl]  # (B, H, 1, n): eta_i scales column i
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # (n, n): i <= t
        h, new_params = q[:, :, sl], []
        for layer, ((W, b), x, g) in enumerate(zip(params, inputs, grads)):
            scores = h @ x.transpose(-1, -2)  # [B,H,n,f_in] @ [B,H,f_in,n] -> [B,H,n,n]: x^q_t . x_i
            scores = scores if b is None else scores + 1  # the bias's gradient is g_i itself
            A = (scores * e).masked_fill(~causal, 0)  # (B, H, n, n)
            z = h @ W - A @ g  # [B,H,n,f_in] @ [B,H,f_in,f_out] - [B,H,n,n] @ [B,H,n,f_out]
            z = z if b is None else z + b[..., None, :]
            h = gelu(z) if layer < len(params) - 1 else z
            eg = eta[:, :, sl, None] * g  # (B, H, n, f_out)
            W_new = W - x.transpose(-1, -2) @ eg  # [B,H,f_in,n] @ [B,H,n,f_out] -> [B,H,f_in,f_out]
            new_params.append((W_new, None if b is None else b - eg.sum(2)))
        outputs.append(_head(q[:, :, sl], h, ln, residual)[0])
        params = _more_steps(k[:, :, sl], v[:, :, sl], eta[:, :, sl], new_params, ln, residual, inner_steps - 1)
    return torch.cat(outputs, dim=2), params


# --- the closed forms the layer is compared with -------------------------------------------------


def one_gd_step_full_batch(q: Tensor, k: Tensor, v: Tensor, eta: float) -> Tensor:
    """Fit a linear ``f(x) = x W`` to all pairs ``(k_i, v_i)`` by one GD step from ``W0 = 0``; apply to q.

    The gradient of ``sum_i ||k_i W - v_i||^2`` is taken by autograd, so this is the definition, not
    a formula: with ``eta = 1/2`` the result is ``q K^T V``, unnormalised linear attention.
    """
    require_finite("eta", eta)
    W = torch.zeros(*q.shape[:-2], q.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device, requires_grad=True)
    loss = ((k @ W - v) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, W)
    return q @ (W - eta * grad).detach()  # [.., T, f] @ [.., f, f]


def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """Unnormalised linear attention ``z_t = sum_{i (<= t)} (q_t . k_i) v_i``."""
    scores = q @ k.transpose(-1, -2)  # [.., T, f] @ [.., f, T] -> [.., T, T]
    if causal:
        scores = scores.tril()
    return scores @ v  # [.., T, T] @ [.., T, f]


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Causal linear attention with a fixed-size state ``M = sum_i k_i^T v_i`` carried across chunks.

    Same output as ``linear_attention(q, k, v)``, at a cost linear in ``T``: per chunk
    ``Z = Q M + tril(Q K^T) V``, then ``M += K^T V``. Returns ``(z, M)``, M (B, H, f_k, f_v).
    """
    _check(q, k, v, q[..., 0], chunk, names=("q", "chunk"))
    B, H, T, f = q.shape
    M = q.new_zeros(B, H, f, v.shape[-1])  # (B, H, f_k, f_v)
    outputs = []
    for s in range(0, T, chunk):
        Q, K, V = q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk]  # (B, H, n, f)
        outputs.append(Q @ M + (Q @ K.transpose(-1, -2)).tril() @ V)  # [B,H,n,f]@[B,H,f,f] + [B,H,n,n]@[B,H,n,f]
        M = M + K.transpose(-1, -2) @ V  # [B,H,f,n] @ [B,H,n,f]
    return torch.cat(outputs, dim=2), M


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    """The delta rule (DeltaNet; Widrow-Hoff): ``S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T``, ``z_t = S_t q_t``.

    ``beta`` is (B, H, T). Written as the recurrence, one token at a time.
    """
    _check(q, k, v, beta, 1, names=("beta", "chunk"))
    B, H, T, f = q.shape
    S = q.new_zeros(B, H, v.shape[-1], f)  # (B, H, f_v, f_k): the fast-weight memory, S_0 = 0
    outputs = []
    for t in range(T):
        k_t, v_t, q_t = k[:, :, t], v[:, :, t], q[:, :, t]  # (B, H, f)
        error = v_t - (S @ k_t[..., None])[..., 0]  # (B, H, f_v): what the memory gets wrong
        S = S + beta[:, :, t, None, None] * error[..., :, None] * k_t[..., None, :]  # (B, H, f_v, f_k)
        outputs.append((S @ q_t[..., None])[..., 0])  # (B, H, f_v)
    return torch.stack(outputs, dim=2)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk: int = 16) -> tuple[Tensor, Tensor]:
    """The delta rule in parallel over chunks of tokens (the chunkwise form of DeltaNet, Yang et al. 2024).

    With ``S_t = S_0 + sum_{j <= t} u_j k_j^T`` inside a chunk, the corrections
    ``u_t = beta_t (v_t - S_0 k_t - sum_{j < t} (k_t . k_j) u_j)`` solve one unit lower-triangular
    system ``(I + diag(beta) stricttril(K K^T)) U = diag(beta) (V - K S_0^T)``, and
    ``Z = Q S_0^T + tril(Q K^T) U``: matrix products instead of a loop over tokens. Returns ``(z, S^T)``.
    """
    _check(q, k, v, beta, chunk, names=("beta", "chunk"))
    B, H, T, f = q.shape
    M = q.new_zeros(B, H, f, v.shape[-1])  # (B, H, f_k, f_v): S^T, the memory read as q M
    outputs = []
    for s in range(0, T, chunk):
        sl = slice(s, min(s + chunk, T))
        Q, K, V, b = q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl, None]  # (B, H, n, f), b (B, H, n, 1)
        n = K.shape[2]
        L = torch.eye(n, dtype=q.dtype, device=q.device) + b * (K @ K.transpose(-1, -2)).tril(-1)  # (B, H, n, n)
        U = torch.linalg.solve_triangular(L, b * (V - K @ M), upper=False, unitriangular=True)  # (B, H, n, f_v)
        outputs.append(Q @ M + (Q @ K.transpose(-1, -2)).tril() @ U)  # [B,H,n,f]@[B,H,f,f] + [B,H,n,n]@[B,H,n,f]
        M = M + K.transpose(-1, -2) @ U  # [B,H,f,n] @ [B,H,n,f_v]
    return torch.cat(outputs, dim=2), M


def nadaraya_watson(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, bandwidth: float = 1.0) -> Tensor:
    """Kernel regression with ``kappa(q, k) = exp(q . k / bandwidth)``: ``z_t = sum_i kappa_ti v_i / sum_i kappa_ti``.

    It is the inner model that minimises ``sum_i kappa(q_t, k_i) ||c - v_i||^2`` over a constant ``c``:
    weighted least squares, solved in closed form. Stabilised by subtracting the largest score.
    """
    require_finite("bandwidth", bandwidth, above=0)
    scores = q @ k.transpose(-1, -2) / bandwidth  # [.., T, f] @ [.., f, T] -> [.., T, T]
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    kappa = torch.exp(scores - scores.amax(-1, keepdim=True))  # (.., T, T), kernel weights up to a constant
    return (kappa @ v) / kappa.sum(-1, keepdim=True)  # weighted mean of the values


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float = 1.0) -> Tensor:
    """Softmax attention as transformers compute it (``scale`` multiplies ``q . k``)."""
    require_finite("scale", scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
