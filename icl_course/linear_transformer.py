"""Linear self-attention (LSA) layers and the stacks built from them.

One layer updates every token ``z_i`` (rows of ``Z``, shape ``(B, n+1, D)`` with ``D = d+1``) by

    z_i <- z_i + (1/n) sum_h sum_{j <= n} (z_i^T Q_h c_j) P_h c_j ,

where ``c_j`` are the n *context* tokens: the query is masked out as a key and value, so it never
influences the others (von Oswald et al. 2023, eq. 3; Vladymyrov et al. 2024, eq. 2). ``Q_h`` stands
for the merged ``W_K^T W_Q`` and ``P_h`` for ``W_P W_V``; only these products matter.

The three parameterizations of Vladymyrov et al. differ only in which ``(Q_h, P_h)`` they allow:

- ``FullAttention``: any matrices.
- ``DiagAttention``: ``Q_h = diag(q_x I_d, q_y)`` and ``P_h = diag(p_x I_d, p_y)``, four scalars a
  head. Written per token, a head adds
  ``dx_i = w_xx (1/n) X^T X x_i + w_xy (1/n) y_i X^T y`` and
  ``dy_i = w_yx (1/n) x_i^T X^T y + w_yy (1/n) y_i ||y||^2``
  with ``w_xx = p_x q_x``, ``w_xy = p_x q_y``, ``w_yx = p_y q_x``, ``w_yy = p_y q_y``.
- ``GDPPAttention``: DIAG with ``q_y = 0``, so only ``w_xx`` (input preconditioning) and ``w_yx``
  (the GD step) survive: GD++.

Every stack is a predictor with the package's shared call ``predict(xs, ys, x_query) -> y_hat``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .runtime import generator, require_finite
from .tokens import check_shapes, make_tokens, read_prediction

__all__ = [
    "LinearSelfAttention",
    "FullAttention",
    "DiagAttention",
    "GDPPAttention",
    "LinearTransformer",
    "RecurrentLinearTransformer",
    "linear_transformer",
    "recurrent_transformer",
    "read_gdpp",
    "rescaled_like_gd",
    "gd_transformer",
    "gdpp_transformer",
]


class LinearSelfAttention(nn.Module):
    """The shared forward pass; subclasses say how ``(Q, P)`` are parameterized."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an integer >= 1, got {d!r}")
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads must be an integer >= 1, got {n_heads!r}")
        self.d, self.n_heads = d, n_heads

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(Q, P)``, each of shape ``(H, d+1, d+1)``."""
        raise NotImplementedError

    def forward(self, Z: Tensor) -> Tensor:
        if Z.ndim != 3 or Z.shape[-1] != self.d + 1 or Z.shape[1] < 2:
            raise ValueError(f"Z must have shape (B, n+1, {self.d + 1}) with n >= 1, got {tuple(Z.shape)}")
        n = Z.shape[1] - 1
        C = Z[:, :n]  # (B, n, D): the context tokens are the keys and the values
        Q, P = self.matrices()  # (H, D, D) each
        # sum_j (z_t^T Q c_j) P c_j = P (sum_j c_j c_j^T) Q^T z_t, so the layer only needs the
        # context's second-moment matrix S = (1/n) C^T C: O(B n D^2) instead of building the
        # (B, H, n+1, n) score tensor. tests/test_linear_transformer.py checks this against the
        # scores-times-values form written out.
        S = C.transpose(1, 2) @ C / n  # (B, D, D)
        # The update is Z M with M = sum_h Q_h S P_h^T. Two orders, the one with fewer multiplications
        # (per sequence): M first, 2 H D^3 + (n+1) D^2; or left to right, Z Q_h, then S, then P_h,
        # 3 H (n+1) D^2. M first is much faster with heads or long contexts (benchmarks/speed.py: 4
        # heads, 50k sequences, n=20: ~6x); left to right wins slightly when n+1 <= D with one head.
        H, T, D = Q.shape[0], Z.shape[1], Z.shape[2]
        if 3 * H * T > 2 * H * D + T:
            M = torch.einsum("hde,bef,hgf->bdg", Q, S, P)  # (B, D, D)
            return Z + torch.bmm(Z, M)  # (B, n+1, D)
        return Z + torch.einsum("btd,hde,bef,hgf->btg", Z, Q, S, P)


class FullAttention(LinearSelfAttention):
    """Unconstrained ``Q_h`` and ``P_h``."""

    def __init__(self, d: int, n_heads: int = 1, init_std: float = 1e-3, gen: torch.Generator | None = None):
        super().__init__(d, n_heads)
        require_finite("init_std", init_std, at_least=0)
        D = d + 1
        self.Q = nn.Parameter(init_std * torch.randn(n_heads, D, D, generator=gen))
        self.P = nn.Parameter(init_std * torch.randn(n_heads, D, D, generator=gen))

    def matrices(self):
        return self.Q, self.P


class DiagAttention(LinearSelfAttention):
    """``Q_h = diag(q_x I, q_y)``, ``P_h = diag(p_x I, p_y)``: four scalars a head."""

    def __init__(self, d: int, n_heads: int = 1, init_std: float = 1e-3, gen: torch.Generator | None = None):
        super().__init__(d, n_heads)
        require_finite("init_std", init_std, at_least=0)
        self.q_x, self.q_y, self.p_x, self.p_y = (
            nn.Parameter(init_std * torch.randn(n_heads, generator=gen)) for _ in range(4)
        )

    def matrices(self):
        ones = torch.ones(self.d, dtype=self.q_x.dtype, device=self.q_x.device)

        def block_diag(a: Tensor, b: Tensor) -> Tensor:  # (H,), (H,) -> (H, D, D)
            return torch.diag_embed(torch.cat([a[:, None] * ones, b[:, None]], dim=-1))

        return block_diag(self.q_x, self.q_y), block_diag(self.p_x, self.p_y)

    def coefficients(self) -> dict[str, Tensor]:
        """The per-head scalars ``w_xx, w_xy, w_yx, w_yy`` of the token update (module docstring)."""
        return {
            "w_xx": self.p_x * self.q_x,
            "w_xy": self.p_x * self.q_y,
            "w_yx": self.p_y * self.q_x,
            "w_yy": self.p_y * self.q_y,
        }


class GDPPAttention(DiagAttention):
    """GD++: DIAG with the y -> query path off (``q_y = 0``): only ``w_xx`` and ``w_yx`` remain."""

    def __init__(self, d: int, n_heads: int = 1, init_std: float = 1e-3, gen: torch.Generator | None = None):
        super().__init__(d, n_heads, init_std, gen)
        del self.q_y
        self.register_buffer("q_y", torch.zeros(n_heads))


ATTENTIONS = {"full": FullAttention, "diag": DiagAttention, "gdpp": GDPPAttention}


class LinearTransformer(nn.Module):
    """A stack of linear self-attention layers with the minus-y-slot read-out.

    Args:
        layers: the attention layers, applied in order (residual updates).
        clamp: if given, token values are clipped to ``[-clamp, clamp]`` after every layer, which
            keeps deep stacks finite early in training (a trick of the reference code).
        layer_norm: if true, every layer reads LayerNorm-ed tokens (a learned gain and bias per layer)
            and adds its update to the un-normalized ones: ``Z <- Z + update(LN(Z))`` ("pre-LN").
            Chapter 4 compares it with the plain stack, as Giannou et al. 2024 do.
    """

    def __init__(self, layers: list[LinearSelfAttention], clamp: float | None = None, layer_norm: bool = False):
        super().__init__()
        if len(layers) == 0:
            raise ValueError("layers must hold at least one layer")
        if clamp is not None:
            require_finite("clamp", clamp, above=0)
        if not isinstance(layer_norm, bool):
            raise ValueError(f"layer_norm must be True or False, got {layer_norm!r}")
        self.layers = nn.ModuleList(layers)
        self.clamp = clamp
        self.d = layers[0].d
        self.norms = nn.ModuleList([nn.LayerNorm(self.d + 1) for _ in layers]) if layer_norm else None

    @property
    def args(self) -> dict:
        """The arguments of :func:`linear_transformer` that rebuild this stack (all but its initialisation)."""
        layer = self.layers[0]
        attention = {cls: name for name, cls in ATTENTIONS.items()}[type(layer)]
        return {"d": self.d, "n_layers": len(self.layers), "n_heads": layer.n_heads, "attention": attention,
                "clamp": self.clamp,
                # named only when on, so that records written before the option existed still load
                **({"layer_norm": True} if self.norms is not None else {})}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters: inputs must have it (``model.double()`` to run in float64)."""
        return next(self.parameters()).dtype

    def check_inputs(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> None:
        """``check_shapes`` against this model: ``xs`` of dimension ``d`` and the parameters' dtype."""
        if torch.is_tensor(xs) and (xs.ndim != 3 or xs.shape[-1] != self.d):
            raise ValueError(f"xs must have shape (B, n, d={self.d}), got {tuple(xs.shape)}")
        check_shapes(xs, ys, x_query, dtype=self.dtype)

    def forward(self, Z: Tensor, return_all: bool = False) -> Tensor | list[Tensor]:
        """``Z`` after the last layer, or (``return_all``) the list ``[Z_0, Z_1, ..., Z_L]``."""
        if not torch.is_tensor(Z) or Z.dtype != self.dtype:
            raise ValueError(f"Z must be a {self.dtype} tensor (the model's dtype), got {getattr(Z, 'dtype', type(Z).__name__)}")
        states = [Z]
        for i, layer in enumerate(self.layers):
            if self.norms is None:
                Z = layer(Z)
            else:
                normed = self.norms[i](Z)
                Z = Z + (layer(normed) - normed)  # the layer returns its input plus its update
            if self.clamp is not None:
                Z = Z.clamp(-self.clamp, self.clamp)
            states.append(Z)
        return states if return_all else Z

    def predict(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        """The shared predictor call: ``(B, n, d), (B, n), (B, d) -> (B,)``."""
        self.check_inputs(xs, ys, x_query)
        return read_prediction(self(make_tokens(xs, ys, x_query)))

    def predict_per_layer(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        """Predictions read out after each layer: ``(L, B)`` (row ``l`` is after layer ``l+1``)."""
        self.check_inputs(xs, ys, x_query)
        states = self(make_tokens(xs, ys, x_query), return_all=True)
        return torch.stack([read_prediction(Z) for Z in states[1:]])


class RecurrentLinearTransformer(LinearTransformer):
    """One attention layer applied ``n_loops`` times: a weight-tied (recurrent) stack.

    von Oswald et al. 2023 (Sec. 4) train such models and find that they run GD++ with one step
    size and one input-preconditioning rate shared by all steps. The loops share one set of
    parameters (``model.layer``), so ``parameters()`` holds it once; ``layers`` lists it
    ``n_loops`` times, which keeps the forward pass, ``predict_per_layer`` and the metrics of
    :class:`LinearTransformer` unchanged.
    """

    def __init__(self, layer: LinearSelfAttention, n_loops: int, clamp: float | None = None):
        if not isinstance(layer, LinearSelfAttention):
            raise ValueError(f"layer must be a LinearSelfAttention layer, got {type(layer).__name__}")
        if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be an integer >= 1, got {n_loops!r}")
        super().__init__([layer] * n_loops, clamp=clamp)
        self.n_loops = n_loops

    @property
    def layer(self) -> LinearSelfAttention:
        """The one layer every loop applies."""
        return self.layers[0]

    @property
    def args(self) -> dict:
        """The arguments of :func:`recurrent_transformer` that rebuild this model."""
        args = super().args
        del args["n_layers"]
        return {**args, "n_loops": self.n_loops}


def rescaled_like_gd(layer: LinearSelfAttention) -> tuple[Tensor, Tensor]:
    """A one-head layer's ``(Q, P)`` with the scale moved into ``P``: ``(Q / s, s P)``.

    Only the products of ``Q`` and ``P`` matter, so ``(Q / s, s P)`` is the same layer for any ``s``.
    With ``s`` the mean diagonal of Q's x-block, Q's x-block becomes ~I as in ``gd_transformer`` and
    ``gdpp_transformer``, and ``-P[y, y]`` becomes the implied GD step size.
    """
    if not isinstance(layer, LinearSelfAttention):
        raise ValueError(f"layer must be a LinearSelfAttention layer, got {type(layer).__name__}")
    if layer.n_heads != 1:
        raise ValueError(f"layer must have one head, got n_heads={layer.n_heads}")
    Q, P = (m[0].detach() for m in layer.matrices())  # (D, D) each
    s = Q[: layer.d, : layer.d].diagonal().mean()
    if s == 0:
        raise ValueError("layer's Q has a zero x-block diagonal: it implements no GD step to read")
    return Q / s, P * s


def read_gdpp(layer: LinearSelfAttention) -> tuple[float, float]:
    """The GD++ step size and input-preconditioning rate ``(eta, gamma)`` a one-head layer implements.

    After :func:`rescaled_like_gd`, ``eta = -P[y, y]`` (the GD step on the y-slots) and
    ``gamma = -mean diag P[x, x]`` (each input moves by ``-gamma S x`` with ``S = (1/n) sum_j x_j x_j^T``).
    ``gdpp_transformer``'s layers give their ``(eta, gamma)`` back exactly. For a trained FULL layer this
    reads the part of the weights that GD++ has; how much else there is shows in how well the model
    matches GD++.

    Convention: this package's layers divide by ``n``; von Oswald et al. write GD++ as
    ``x <- (I - gamma' X X^T) x`` without ``1/n``, so their ``gamma' = gamma / n``.
    """
    _, P = rescaled_like_gd(layer)
    d = layer.d
    return -P[d, d].item(), -P[:d, :d].diagonal().mean().item()


def linear_transformer(
    d: int,
    n_layers: int = 1,
    n_heads: int = 1,
    attention: str = "full",
    init_std: float = 1e-3,
    clamp: float | None = None,
    seed: int = 0,
    layer_norm: bool = False,
) -> LinearTransformer:
    """A freshly initialised stack: ``n_layers`` layers of ``attention`` in {'full', 'diag', 'gdpp'}.

    >>> model = linear_transformer(d=3, n_layers=2, attention="diag")
    >>> [type(layer).__name__ for layer in model.layers]
    ['DiagAttention', 'DiagAttention']
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    require_finite("init_std", init_std, at_least=0)
    gen = generator(seed)
    cls = ATTENTIONS[attention]
    return LinearTransformer([cls(d, n_heads, init_std, gen) for _ in range(n_layers)], clamp=clamp,
                             layer_norm=layer_norm)


def recurrent_transformer(
    d: int,
    n_loops: int = 2,
    n_heads: int = 1,
    attention: str = "full",
    init_std: float = 1e-3,
    clamp: float | None = None,
    seed: int = 0,
) -> RecurrentLinearTransformer:
    """A freshly initialised weight-tied stack: one ``attention`` layer applied ``n_loops`` times.

    >>> model = recurrent_transformer(d=3, n_loops=4)
    >>> len(model.layers), sum(p.numel() for p in model.parameters()) == 2 * 4 * 4
    (4, True)
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
    require_finite("init_std", init_std, at_least=0)
    layer = ATTENTIONS[attention](d, n_heads, init_std, generator(seed))
    return RecurrentLinearTransformer(layer, n_loops, clamp=clamp)


def gd_transformer(
    d: int, eta: float, n_steps: int = 1, preconditioner: Tensor | None = None, dtype=torch.float32
) -> LinearTransformer:
    """The exact weights of ``n_steps`` steps of (preconditioned) gradient descent from ``w = 0``.

    GD on ``L(w) = 1/(2n) ||X w - y||^2`` takes ``w <- w - eta * Gamma * (1/n) X^T (X w - y)``.
    Each layer has one head with ``Q = [[Gamma, 0], [0, 0]]`` and ``P = -eta e_y e_y^T``: the
    context y-slots then hold the residuals ``y_i - <w, x_i>`` and the query's y-slot holds
    ``-<w, x_q>``, so after layer k the read-out equals the k-step GD prediction
    (von Oswald et al. 2023, Prop. 1, with ``W_0 = 0``).
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    require_finite("eta", eta)
    gamma = torch.eye(d, dtype=dtype) if preconditioner is None else torch.as_tensor(preconditioner, dtype=dtype)
    if tuple(gamma.shape) != (d, d):
        raise ValueError(f"preconditioner must have shape ({d}, {d}), got {tuple(gamma.shape)}")
    require_finite("preconditioner", gamma)
    layers = []
    for _ in range(n_steps):
        layer = FullAttention(d, n_heads=1, init_std=0.0).to(dtype)
        with torch.no_grad():
            # the score x_i^T Gamma x_j moves the y-slot of token i by -x_i^T (Gamma g), g the gradient step
            layer.Q[0, :d, :d] = gamma
            layer.P[0, d, d] = -eta
        layers.append(layer)
    return LinearTransformer(layers)


def gdpp_transformer(d: int, eta: float, gamma: float, n_steps: int = 1, dtype=torch.float32) -> LinearTransformer:
    """The exact weights of ``n_steps`` steps of GD++ (``icl_course.solvers.GDPlusPlus``).

    Each layer is one ``GDPPAttention`` head with ``q_x = 1``, ``p_x = -gamma`` and ``p_y = -eta``,
    so ``w_xx = -gamma`` moves every input by ``-gamma S x`` and ``w_yx = -eta`` takes a GD step on the
    y-slots (module docstring), both from the same tokens, as GD++ does (von Oswald et al. 2023, Sec. 4).
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    require_finite("eta", eta)
    require_finite("gamma", gamma)
    layers = []
    for _ in range(n_steps):
        layer = GDPPAttention(d, n_heads=1, init_std=0.0).to(dtype)
        with torch.no_grad():
            layer.q_x.fill_(1.0)
            layer.p_x.fill_(-gamma)
            layer.p_y.fill_(-eta)
        layers.append(layer)
    return LinearTransformer(layers)
