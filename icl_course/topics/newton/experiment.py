"""Chapter 4's experiment: transformers and Newton's method (Giannou et al. 2024; Fu et al. 2024).

``run(profile)`` does five things, each feeding a section of the chapter:

1. **Newton-Schulz against GD** on matrices of growing condition number: iterations to reach
   ``||I - A X||_2 <= 1e-8`` (``icl_course.topics.newton.matrix_inverse``).
2. **The attention construction**: the stack of ``newton_transformer`` against ``IterativeNewton`` in
   float64, per Newton step, and one step applied to tokens carrying an arbitrary iterate.
3. **A trained linear transformer against Newton and GD** (Fu et al.): a FULL linear-attention stack
   trained on ill-conditioned in-context regression; for every layer, the Newton iteration count and
   the GD step count whose predictions are closest to the layer's (mean squared difference on held-out
   sequences), and, as a second notion, the fewest iterations that reach the layer's error.
4. **Logistic regression**: Newton (IRLS) and GD on the regularized logistic loss, and a trained stack
   of (linear attention, ReLU MLP) blocks, each scored by its distance to the optimum's query logit.
5. **Giannou et al.'s own logistic setup** (``logistic_depth``): one shipped model per depth against
   damped Newton, one step per layer (``icl_course.topics.newton.logistic_depth``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from icl_course import plots
from icl_course.linear_transformer import LinearTransformer, linear_transformer
from icl_course.metrics import mse_loss, standard_error
from icl_course.results import Lookup
from icl_course.runtime import get_device, get_profile
from icl_course.tasks import IllConditioned, RegressionTask, generator
from icl_course.tokens import make_tokens
from icl_course.training import History, TrainConfig, train

from .logistic import (
    AttentionMLPTransformer,
    LogisticGD,
    LogisticNewton,
    LogisticTask,
    attention_mlp_transformer,
    expected_cross_entropy,
    regularized_loss,
)
from .logistic_depth import DepthConfig, DepthResult, run_depths
from .matrix_inverse import (
    IterativeNewton,
    iterations_to_tolerance,
    newton_schulz,
    newton_step_weights,
    newton_tokens,
    effective_orders,
    newton_order_predictions,
    newton_transformer,
    read_iterate,
    spectral_gd_predictions,
)

__all__ = [
    "NewtonConfig", "NewtonResult", "CONFIGS", "run", "conditioned_matrix", "inverse_convergence",
    "convergence_figure", "construction_errors", "match_layers", "train_and_match", "iteration_counts",
    "construction", "logistic_regression", "query_states", "probe_predictions", "error_cosines",
    "COLOURS", "step_weights_figure",
]

# One colour per method in every figure of the chapter.
COLOURS = {
    "Newton": "C0",  # Newton-Schulz, Iterative Newton, Newton (IRLS), its higher orders in gray
    "GD": "C1",
    "trained": "C3",  # a trained transformer
    "trained, LayerNorm": "C4",
}


@dataclass(frozen=True)
class NewtonConfig:
    # 1. matrix inversion
    matrix_dim: int = 10  # size of the matrices inverted by Newton-Schulz and GD
    kappas: tuple[float, ...] = (2.0, 5.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # their condition numbers
    tol: float = 1e-8  # target ||I - A X||_2
    # 2. and 3. in-context regression
    d: int = 5  # input dimension
    n_ctx: int = 20  # context pairs per sequence
    kappa: float = 10.0  # condition number of every sequence's input covariance (random eigenbasis)
    construction_steps: int = 20  # Newton steps of the exact construction that are checked
    construction_alpha: float = 0.02  # its fixed M_0 = alpha S (must stay below 2 / ||S||^2)
    n_layers: int = 6  # trained linear-attention layers
    n_heads: int = 2
    init_std: float = 1e-3
    clamp: float = 10.0  # token values clipped to [-clamp, clamp] after every layer
    train: TrainConfig = field(  # cosine decay: with a constant rate the last layer can end up worse than the one before
        default_factory=lambda: TrainConfig(steps=800, batch_size=512, lr=1e-2, warmup=0.02, schedule="cosine"))
    newton_max: int = 25  # Newton iteration counts searched when matching layers
    gd_max: int = 30_000  # GD step counts searched (on a log grid of gd_grid points)
    gd_grid: int = 300
    n_eval: int = 4000  # held-out sequences behind every reported number
    orders: tuple[int, ...] = (2, 3, 4, 5)  # Newton-type iterations set against the layers (Giannou et al. eq. 3.4)
    layer_norm_variant: bool = True  # also train the same stack with pre-LayerNorm (Giannou et al.'s comparison)
    n_probe: int = 4000  # sequences (of their own) that fit Fu et al.'s per-layer linear read-out
    kappa_high: float | None = 100.0  # train and match again at this condition number (Fu et al.'s second)
    variant_spread_seeds: tuple[int, ...] | None = None  # the LayerNorm and kappa_high runs' other seeds (None: spread_seeds)
    # 4. logistic regression
    mu: float = 0.1  # regularization of the logistic loss
    logistic_blocks: int = 3  # (attention, MLP) blocks of the trained model
    mlp_width: int = 32
    logistic_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=512, lr=5e-3))
    logistic_newton_iters: int = 8
    logistic_gd_steps: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
    # 5. Giannou et al.'s own logistic setup, one shipped model per depth (None: skipped)
    logistic_depth: DepthConfig | None = field(default_factory=DepthConfig)
    seed: int = 0  # model inits; data streams use seed + 1 (training) and seed + 2 (held out)
    # Part 3 again at each of these seeds (init, training and held-out data), for the spread of the
    # matches; the figures and the headline numbers come from ``seed``.
    spread_seeds: tuple[int, ...] = ()


CONFIGS = {
    # seconds: the pipeline and the shapes, not the claims
    "smoke": NewtonConfig(
        kappas=(10.0, 100.0), n_layers=3, train=TrainConfig(steps=20, batch_size=128, lr=5e-3),
        logistic_blocks=2, logistic_train=TrainConfig(steps=10, batch_size=128, lr=5e-3), n_eval=500,
        gd_grid=60, logistic_depth=DepthConfig(n_eval=200),
    ),
    # ~2.5 minutes on a 2-core laptop CPU (more when it is loaded): the Fu et al. picture at 6 layers
    # (the LayerNorm and condition-number-100 stacks at two seeds: three would add ~30 s for little)
    "quick": NewtonConfig(spread_seeds=(1, 2), variant_spread_seeds=(1,)),
    # a GPU: deeper, longer, more heads (not run by the authors of this chapter; see the chapter)
    "full": NewtonConfig(
        n_layers=8, n_heads=4, train=TrainConfig(steps=10_000, batch_size=2048, lr=2e-3, warmup=0.02, schedule="cosine"),
        logistic_blocks=6, logistic_train=TrainConfig(steps=10_000, batch_size=2048, lr=2e-3, warmup=0.02, schedule="cosine"),
        newton_max=40, gd_max=1_000_000, n_eval=20_000, spread_seeds=(1, 2, 3, 4),
    ),
}


# --- 1. matrix inversion --------------------------------------------------------------------------


def conditioned_matrix(dim: int, kappa: float, gen: torch.Generator) -> torch.Tensor:
    """``U diag(s) V^T`` in float64 with random orthogonal ``U, V`` and ``s`` geometric from 1 to ``1/kappa``."""
    if not kappa >= 1:
        raise ValueError(f"kappa (condition number) must be >= 1, got {kappa}")
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    s = kappa ** -torch.linspace(0, 1, dim, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


def inverse_convergence(A: torch.Tensor, newton_iters: int, gd_steps: list[int]) -> dict[str, list[float]]:
    """Residuals ``||I - A X||_2``: Newton-Schulz by iterating, GD by its closed form.

    GD on ``1/2 ||A X - I||^2`` from 0 with step ``1 / ||A||^2`` leaves the residual
    ``(I - A A^T / ||A||^2)^k``, whose norm is ``max_i (1 - s_i^2 / s_max^2)^k`` (``s_i`` the singular
    values); the tests check it against ``gd_inverse``. The closed form reaches 10^6 steps at no cost.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    ns = [torch.linalg.matrix_norm(eye - A @ X, ord=2).item() for X in newton_schulz(A, newton_iters)]
    s2 = torch.linalg.svdvals(A) ** 2
    rho = (1 - s2 / s2.max()).max().item()
    return {"newton_iter": list(range(newton_iters + 1)), "newton": ns, "gd_step": list(gd_steps),
            "gd": [rho**k for k in gd_steps]}


def convergence_figure(kappa: float, dim: int = 10, seed: int = 0, tol: float = 1e-8):
    """Residual against iterations (log-log) for Newton-Schulz and GD on one matrix of condition ``kappa``."""
    A = conditioned_matrix(dim, kappa, generator(seed))
    gd_needed = iterations_to_tolerance(A, tol, "gd", max_iters=10**9)
    steps = sorted({0, *(int(round(x)) for x in torch.logspace(0, math.log10(3 * gd_needed), 80).tolist())})
    curves = inverse_convergence(A, iterations_to_tolerance(A, tol, "newton") + 4, steps)
    fig, (ax,) = plots.figure(width=6.0)
    # iteration k is drawn at x = k + 1 so that the start (k = 0) fits on a log axis
    ax.plot([k + 1 for k in curves["gd_step"]], curves["gd"], color=COLOURS["GD"],
            label="gradient descent")
    ax.plot([k + 1 for k in curves["newton_iter"]], curves["newton"], "o-", ms=3,
            color=COLOURS["Newton"], label="Newton-Schulz")
    ax.axhline(tol, color="gray", ls=":", label=f"tolerance {tol:g}")
    ax.set(xscale="log", yscale="log", xlabel="iteration $k$ + 1", ylabel=r"$\|I - AX_k\|_2$",
           ylim=(1e-17, 3), title=rf"inverting a {dim}$\times${dim} matrix, $\kappa$ = {kappa:g}")
    ax.legend(fontsize=8)
    return fig


# --- 2. the construction ------------------------------------------------------------------------


def construction_errors(batch, n_steps: int, alpha: float) -> dict[str, float]:
    """Max |difference| between the construction and the closed form, in float64.

    ``prediction``: ``newton_transformer(k)`` against ``IterativeNewton(k)`` for k = 0..n_steps.
    ``one_step``: the two step layers applied to tokens whose u-slots hold ``M x`` for a random
    (not even symmetric) ``M``, against ``(2M - M S M) x`` for every data token and the query.
    """
    b = batch.to(dtype=torch.float64)
    B, n, d = b.xs.shape
    exact = IterativeNewton(n_steps, alpha).predict_all(b.xs, b.ys, b.x_query)  # (n_steps + 1, B)
    with torch.no_grad():
        pred_err = max(
            (newton_transformer(d, n, k, alpha).predict(b.xs, b.ys, b.x_query) - exact[k]).abs().max().item()
            for k in range(n_steps + 1)
        )
        M = torch.randn(B, d, d, generator=generator(0), dtype=torch.float64)
        Z = newton_tokens(b.xs, b.ys, b.x_query)
        inputs = torch.cat([b.xs, b.x_query[:, None]], dim=1)  # (B, n+1, d): data tokens and query
        rows = [*range(n), n + d]  # their positions among the tokens (basis tokens in between)
        Z[:, rows, d : 2 * d] = torch.einsum("bij,bnj->bni", M, inputs)
        double, correct = newton_step_weights(d, n)
        S = b.xs.mT @ b.xs / n
        want = torch.einsum("bij,bnj->bni", 2 * M - M @ S @ M, inputs)
        step_err = (read_iterate(correct(double(Z)), d)[:, rows] - want).abs().max().item()
    return {"prediction": pred_err, "one_step": step_err}


# --- 3. matching layers to iterations -------------------------------------------------------------


def match_layers(layer_preds: torch.Tensor, algo_preds: torch.Tensor, counts: list[int], y: torch.Tensor) -> dict:
    """For every layer, the algorithm's count that best matches it, two ways.

    ``by_prediction``: the count whose predictions have the smallest mean squared difference to the
    layer's (Fu et al.'s notion). ``by_error``: the fewest iterations whose 0.5·MSE is at most the
    layer's (None if none reaches it). Arguments: ``(L, B)`` layer predictions, ``(K, B)`` algorithm
    predictions at the iteration ``counts``, ``(B,)`` targets.
    """
    if algo_preds.shape[0] != len(counts):
        raise ValueError(f"algo_preds has {algo_preds.shape[0]} rows but counts has {len(counts)} entries")
    algo_err = [mse_loss(p, y).item() for p in algo_preds]
    by_pred, by_err, gaps = [], [], []
    for pred in layer_preds:
        msd = ((algo_preds - pred) ** 2).mean(dim=1)  # (K,)
        k = int(msd.argmin())
        by_pred.append(counts[k])
        gaps.append(msd[k].item())
        err = mse_loss(pred, y).item()
        by_err.append(next((c for c, e in zip(counts, algo_err) if e <= err), None))
    return {"by_prediction": by_pred, "by_error": by_err, "msd": gaps, "algo_err": algo_err}


# --- the experiment -----------------------------------------------------------------------------


@dataclass
class NewtonResult:
    config: NewtonConfig
    model: LinearTransformer  # trained linear-attention stack (CPU)
    logistic_model: AttentionMLPTransformer  # trained (attention, MLP) stack (CPU)
    history: History
    logistic_history: History
    curves: dict  # data behind the figures
    metrics: dict
    logistic_depth: DepthResult | None = None  # Giannou et al.'s setup, one model per depth

    def figures(self) -> dict:
        m, c = self.metrics, self.curves
        layers = list(range(1, self.config.n_layers + 1))
        kappas = self.config.kappas
        iters_title = rf"iterations to $\|I - AX\|_2 \leq$ {self.config.tol:g}"
        bound = r"$2\log_2\kappa + 6$"
        fig_iters = plots.panels(
            {iters_title: {
                "gradient descent": [m["gd_iters_to_tol"][str(k)] for k in kappas],
                "Newton-Schulz": [m["newton_schulz_iters_to_tol"][str(k)] for k in kappas],
                bound: [2 * math.log2(k) + 6 for k in kappas],
            }},
            x=list(kappas), xlabel=r"condition number $\kappa$", logy=(iters_title,), logx=True,
            width=5.0, marker="o",
            styles={bound: {"ls": "--", "color": "gray"}, "gradient descent": {"color": COLOURS["GD"]},
                    "Newton-Schulz": {"color": COLOURS["Newton"]}},
        )
        fig_match = _matching_figure(m, layers)
        newton_k = list(range(len(m["newton_loss"])))
        fig_errors = plots.panels(
            {"trained model: held-out 0.5·MSE": {"per layer": m["model_layer_loss"]},
             "Iterative Newton: held-out 0.5·MSE": {"per iteration": m["newton_loss"]}},
            x={"trained model: held-out 0.5·MSE": layers, "Iterative Newton: held-out 0.5·MSE": newton_k},
            xlabel="layer / iteration",
            logy=("trained model: held-out 0.5·MSE", "Iterative Newton: held-out 0.5·MSE"), marker="o",
            width=4.2, styles={"per layer": {"color": COLOURS["trained"]},
                               "per iteration": {"color": COLOURS["Newton"]}},
        )
        fig_logistic = _logistic_figure(m, c, self.config.logistic_gd_steps)
        extra = {"orders": _orders_figure(m, layers)}
        if "by_seed_kappa_high" in m:
            extra["kappa_matching"] = _kappa_figure(m, layers)
        if self.logistic_depth is not None:
            extra["logistic_depth"] = self.logistic_depth.figure()
        return {
            **extra,
            "inverse_convergence": convergence_figure(100.0, self.config.matrix_dim, self.config.seed, self.config.tol),
            "iterations_vs_kappa": fig_iters,
            "construction": _construction_figure(c["construction_newton"]),
            "loss_curves": plots.loss_curve(self.history, {"Newton, 3 iterations": m["newton_loss"][3]},
                                            title="training the linear transformer"),
            "layer_errors": fig_errors,
            "matching": fig_match,
            "logistic": fig_logistic,
        }


def _construction_figure(losses: list[float]):
    """Held-out error of the exact construction against its number of Newton steps."""
    fig, (ax,) = plots.figure()
    ax.plot(range(len(losses)), losses, "o-", ms=3, color=COLOURS["Newton"],
            label="Newton-Schulz via attention")
    ax.set(xlabel="Newton steps (2 layers each)", ylabel="held-out 0.5·MSE", yscale="log",
           title="the exact construction: least squares in context")
    ax.legend()
    return fig


def step_weights_figure(double, correct):
    """The ``Q`` and ``P`` of one Newton-Schulz step's two layers (:func:`newton_step_weights`), in a
    2x2 grid (a row per layer), rows and columns labelled by the token slots ``x, u, e, y``."""
    fig, axes = plots.figure(ncols=2, nrows=2, width=3.4, height=3.0)
    d = (double.Q.shape[-1] - 1) // 3
    ticks = [d / 2 - 0.5, 3 * d / 2 - 0.5, 5 * d / 2 - 0.5, 3 * d]  # the middle of each slot
    named = {"doubling: $Q$": double.Q[0], "doubling: $P$": double.P[0],
             "correction: $Q$": correct.Q[0], "correction: $P$": correct.P[0]}
    for ax, (name, w) in zip(axes, named.items()):
        w = w.detach().cpu().float()
        vmax = float(w.abs().max()) or 1.0
        im = ax.imshow(w.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for edge in (d - 0.5, 2 * d - 0.5, 3 * d - 0.5):  # slot boundaries
            ax.axhline(edge, color="gray", lw=0.5)
            ax.axvline(edge, color="gray", lw=0.5)
        ax.set_xticks(ticks, ["$x$", "$u$", "$e$", "$y$"])
        ax.set_yticks(ticks, ["$x$", "$u$", "$e$", "$y$"])
        ax.grid(False)
        ax.set_title(name)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _matching_figure(m: dict, layers: list[int]):
    """Matched Newton iterations and GD steps per layer, both notions (symlog axis: counts can be 0)."""
    fig, axes = plots.figure(ncols=2, width=4.4)
    panels = {
        "best match by predictions": ("matching_newton_steps", "matching_gd_steps"),
        "fewest reaching the layer's error": ("error_level_newton_steps", "error_level_gd_steps"),
    }
    for ax, (title, (newton_key, gd_key)) in zip(axes, panels.items()):
        for key, label, colour in ((newton_key, "Newton iterations", COLOURS["Newton"]),
                                   (gd_key, "GD steps", COLOURS["GD"])):
            counts = [float("nan") if v is None else v for v in m[key]]
            ax.plot(layers, counts, "o-", ms=4, color=colour, label=label)
        ax.set_yscale("symlog", linthresh=1)
        ax.set(xlabel="layer", ylabel="matching count (0, then log scale)", title=title, ylim=(0, None))
        ax.set_xticks(layers)
        ax.legend(fontsize=8)
    return fig


def _orders_figure(m: dict, layers: list[int]):
    """Held-out loss per layer against Newton-type iterations of each order (layer l beside iteration l)."""
    fig, (ax,) = plots.figure(width=6.0)
    for i, p in enumerate(m["newton_orders"]):
        losses = m["order_loss"][str(p)]
        ax.plot(range(len(losses)), losses, ls="--", color=_gray(i, len(m["newton_orders"])), marker=".",
                label=f"Newton, order {p}")
    ax.errorbar(layers, m["model_layer_loss"], yerr=m["model_layer_loss_se"], marker="o", ms=4, capsize=2,
                color=COLOURS["trained"], label="trained, plain")
    if "layer_norm_layer_loss_se" in m:
        ax.errorbar(layers, m["by_seed_layer_norm"]["layer_loss"][0], yerr=m["layer_norm_layer_loss_se"],
                    marker="s", ms=4, capsize=2, color=COLOURS["trained, LayerNorm"],
                    label="trained, pre-LayerNorm")
    ax.set(yscale="log", ylabel="held-out 0.5·MSE",
           xlabel=r"layer $\ell$ / Newton iteration $k$  ($k = 0$: $M_0 = S / \|S\|_2^2$)",
           title="trained layers against Newton of order $p$")
    ax.set_xticks([0, *layers])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _gray(i: int, n: int) -> str:
    """A gray level for the ``i``-th of ``n`` reference curves (darker = higher order)."""
    return str(0.75 - 0.55 * i / max(n - 1, 1))


def _kappa_figure(m: dict, layers: list[int]):
    """Matched Newton iterations and GD steps per layer (by predictions) at both condition numbers, every seed."""
    fig, axes = plots.figure(ncols=2, width=4.4)
    runs = {rf"$\kappa$ = {m['kappa']:g}": ("0.6", m["by_seed"]),  # gray: colours are for methods
            rf"$\kappa$ = {m['kappa_high']:g}": ("black", m["by_seed_kappa_high"])}
    for ax, (key, title) in zip(axes, (("matching_newton_steps", "Newton iterations"), ("matching_gd_steps", "GD steps"))):
        for label, (colour, b) in runs.items():
            for i, counts in enumerate(b[key]):  # one line per seed
                ax.plot(layers, counts, "o-", ms=3, color=colour, alpha=0.7, label=label if i == 0 else None)
        ax.set_yscale("symlog", linthresh=1)
        ax.set(xlabel="layer", ylabel="best match by predictions", title=title, ylim=(0, None))
        ax.set_xticks(layers)
        ax.legend(fontsize=8)
    return fig


LAYERS_PER_NEWTON_STEP = 13  # what Giannou et al.'s logistic construction spends on one Newton step


def _logistic_figure(m: dict, c: dict, gd_steps) -> object:
    fig, axes = plots.figure(ncols=2, width=4.6)
    newton_k = list(range(len(m["logistic_newton_loss"])))
    newton, gd, trained = COLOURS["Newton"], COLOURS["GD"], COLOURS["trained"]
    axes[0].plot(newton_k, c["logistic_newton_subopt"], "o-", ms=3, color=newton, label="Newton (IRLS)")
    axes[0].plot(list(gd_steps), c["logistic_gd_subopt"], "o-", ms=3, color=gd, label="GD")
    axes[0].set(yscale="log", xlabel="iteration", title="$L(w_k) - L(w^*)$, worst sequence")
    axes[1].plot(newton_k, m["logistic_newton_loss"], "o-", ms=3, color=newton,
                 label="Newton (IRLS), per iteration")
    axes[1].plot([LAYERS_PER_NEWTON_STEP * k for k in newton_k], m["logistic_newton_loss"], "o--", ms=3,
                 color=newton, alpha=0.6,
                 label=f"Newton, {LAYERS_PER_NEWTON_STEP} blocks per iteration (Giannou et al.'s axis)")
    axes[1].plot(list(gd_steps), m["logistic_gd_loss"], "o-", ms=3, color=gd, label="GD, per step")
    blocks = list(range(1, len(m["logistic_model_loss"]) + 1))
    axes[1].plot(blocks, m["logistic_model_loss"], "s-", ms=5, color=trained,
                 label="trained model, per block")
    axes[1].set(yscale="log", xlabel="iteration / step / block",
                title=r"$\frac{1}{2}\,\overline{(z - z^*)^2}$, query logit")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1)  # 0, then a log scale: GD runs to 100+ steps
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=1e-18)  # below float64 rounding nothing is meaningful
    axes[0].legend(fontsize=8)
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=8, ncols=2,
               loc="outside lower right")  # the right panel's curves, below it: off the data
    return fig


def train_and_match(config: NewtonConfig, task, held_out, device, progress: bool = False, layer_norm: bool = False):
    """Train the linear transformer of ``config`` on ``task``; match its layers on ``held_out`` (float64).

    Returns ``(model, history, newton_match, gd_match, layer_preds)`` with the matches of
    ``match_layers`` against Iterative Newton (``M_0 = S / ||S||^2``, counts 0..newton_max) and GD
    (step ``1 / ||S||``, counts on a log grid up to gd_max). ``layer_norm`` trains the pre-LN stack.
    """
    model = linear_transformer(config.d, config.n_layers, config.n_heads, "full", config.init_std, config.clamp,
                               config.seed, layer_norm=layer_norm)
    train_config = TrainConfig(**{**asdict(config.train), "seed": config.seed + 1})
    label = "linear transformer" + (" (LayerNorm)" if layer_norm else "")
    history = train(model, task, train_config, device=device, progress=progress and label)
    model = model.cpu().double().eval()
    b = held_out.to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        layer_preds = model.predict_per_layer(b.xs, b.ys, b.x_query)  # (L, B)
    newton_preds = IterativeNewton(config.newton_max).predict_all(b.xs, b.ys, b.x_query)  # (newton_max + 1, B)
    gd_counts = _log_grid(config.gd_max, config.gd_grid)
    gd_preds = spectral_gd_predictions(b.xs, b.ys, b.x_query, gd_counts)  # (K, B)
    newton_match = match_layers(layer_preds, newton_preds, list(range(config.newton_max + 1)), b.y_query)
    gd_match = match_layers(layer_preds, gd_preds, gd_counts, b.y_query)
    return model, history, newton_match, gd_match, layer_preds


def trained_at_seeds(config: NewtonConfig, task, device, progress: bool = False, layer_norm: bool = False):
    """``train_and_match`` at ``config.seed`` and every spread seed, each with held-out sequences of its
    own (``seed + 2``) and Fu et al.'s probes fitted on others (``seed + 5``).

    Returns ``(first, summaries)``: the outputs of ``train_and_match`` at ``config.seed`` and one
    ``_match_summary`` per seed (probe numbers included).
    """
    first, summaries = None, []
    for seed in (config.seed, *config.spread_seeds):
        held_out = task.sample(config.n_eval, generator(seed + 2), dtype=torch.float64)
        out = train_and_match(replace(config, seed=seed), task, held_out, device, progress, layer_norm)
        model, _, newton_match, gd_match, layer_preds = out
        summary = _match_summary(newton_match, gd_match, layer_preds, held_out)
        fit = task.sample(config.n_probe, generator(seed + 5), dtype=torch.float64)
        summary.update(_probe_summary(config, model, fit, held_out))
        summaries.append(summary)
        first = first or out
    return first, summaries


def _probe_summary(config: NewtonConfig, model, fit, held_out) -> dict:
    """Fu et al.'s probe per layer: its loss, and the Newton / GD counts whose errors point most alike."""
    probes = probe_predictions(model, fit, held_out)  # (L, B)
    y = held_out.y_query
    newton_counts = list(range(config.newton_max + 1))
    gd_counts = _log_grid(config.gd_max, config.gd_grid)
    out = {"probe_layer_loss": [mse_loss(p, y).item() for p in probes]}
    for name, counts, preds in (
        ("newton", newton_counts, IterativeNewton(config.newton_max).predict_all(held_out.xs, held_out.ys, held_out.x_query)),
        ("gd", gd_counts, spectral_gd_predictions(held_out.xs, held_out.ys, held_out.x_query, gd_counts)),
    ):
        cos = error_cosines(probes, preds, y)  # (L, K)
        best = cos.argmax(dim=1)
        out[f"probe_{name}_cosine"] = cos.max(dim=1).values.tolist()
        out[f"probe_matching_{name}_steps"] = [counts[int(k)] for k in best]
    return out


def _by_seed(config: NewtonConfig, summaries: list[dict]) -> dict:
    return {"seed": [config.seed, *config.spread_seeds], **{k: [r[k] for r in summaries] for k in summaries[0]}}


def _match_summary(newton_match: dict, gd_match: dict, layer_preds, held_out) -> dict:
    """What one trained model's matching says, for the spread over seeds."""
    return {
        "matching_newton_steps": newton_match["by_prediction"],
        "matching_gd_steps": gd_match["by_prediction"],
        "error_level_newton_steps": newton_match["by_error"],
        "error_level_gd_steps": gd_match["by_error"],
        "layer_loss": [mse_loss(p, held_out.y_query.to(p)).item() for p in layer_preds],
        "layers_gd_at_least_as_close": sum(g <= n for g, n in zip(gd_match["msd"], newton_match["msd"])),
        "effective_order": layer_orders(layer_preds, held_out),  # layer l against iteration l
        "effective_order_shifted": layer_orders(layer_preds, held_out, first_iteration=0),  # ... against l - 1
    }


def _log_grid(max_steps: int, points: int) -> list[int]:
    return sorted({0, *(int(round(x)) for x in torch.logspace(0, math.log10(max_steps), points).tolist())})


def query_states(model: LinearTransformer, batch) -> torch.Tensor:
    """The query token after every layer: ``(L, B, d + 1)`` (in the model's dtype and device)."""
    with torch.no_grad():
        states = model(make_tokens(batch.xs, batch.ys, batch.x_query).to(model.dtype), return_all=True)
    return torch.stack([Z[:, -1] for Z in states[1:]])


def probe_predictions(model: LinearTransformer, fit_batch, batch) -> torch.Tensor:
    """Fu et al.'s per-layer probe: a linear read-out (with bias) of the query token after each layer,
    fitted by least squares to ``y_query`` on ``fit_batch``, applied to ``batch``: ``(L, B)``.

    The model's own read-out (minus the y-slot) is one such map, so a probe is at least as good on
    ``fit_batch``; on ``batch`` it may be slightly worse (it is fitted on other sequences).
    """
    def features(states):  # (L, B, D) -> (L, B, D + 1)
        return torch.cat([states, torch.ones_like(states[..., :1])], dim=-1)

    fit = features(query_states(model, fit_batch).double())  # (L, B, D + 1)
    target = fit_batch.y_query.to(fit)
    # normal equations in float64 (the D + 1 features are few): unlike lstsq's LAPACK driver, the same
    # bits on every call, which checkpoint-resumed runs rely on; a tiny ridge keeps constant slots solvable
    gram = fit.mT @ fit
    ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype)
    coef = torch.linalg.solve(gram + ridge, fit.mT @ target[None, :, None])  # (L, D + 1, 1)
    return (features(query_states(model, batch).double()) @ coef)[..., 0]


def error_cosines(layer_preds: torch.Tensor, algo_preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fu et al.'s similarity of errors: the cosine between a layer's errors and an algorithm's errors
    over the same sequences, ``(L, K)`` for ``(L, B)`` layer and ``(K, B)`` algorithm predictions."""
    a = layer_preds - y
    b = algo_preds - y
    return (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None]).clamp(min=torch.finfo(a.dtype).tiny)


def order_losses(config: NewtonConfig, held_out) -> dict[str, list[float]]:
    """0.5·MSE of the Newton-type iteration of each order after ``0..n_layers`` iterations (closed form)."""
    b = held_out.to(device="cpu", dtype=torch.float64)
    out = {}
    for p in config.orders:
        preds = newton_order_predictions(b.xs, b.ys, b.x_query, [float(p) ** k for k in range(config.n_layers + 1)])
        out[str(p)] = [mse_loss(pred, b.y_query).item() for pred in preds]
    return out


def layer_orders(layer_preds, held_out, first_iteration: int = 1) -> list[float | None]:
    """``effective_orders`` of a stack's per-layer predictions on ``held_out``."""
    b = held_out.to(device="cpu", dtype=torch.float64)
    losses = [mse_loss(p, b.y_query).item() for p in layer_preds]
    return effective_orders(losses, b.xs, b.ys, b.x_query, b.y_query, first_iteration)


def iteration_counts(config: NewtonConfig) -> dict:
    """1. Newton-Schulz against GD: iterations to ``config.tol`` for every condition number (closed
    forms, Newton's checked by iterating)."""
    ns_iters, gd_iters = {}, {}
    for i, kappa in enumerate(config.kappas):
        A = conditioned_matrix(config.matrix_dim, kappa, generator(config.seed + 100 + i))
        ns_iters[str(kappa)] = iterations_to_tolerance(A, config.tol, "newton", max_iters=10**9)
        gd_iters[str(kappa)] = iterations_to_tolerance(A, config.tol, "gd", max_iters=10**9)
        residual = torch.linalg.matrix_norm(torch.eye(config.matrix_dim, dtype=A.dtype) - A @ newton_schulz(A, ns_iters[str(kappa)])[-1], ord=2)
        if residual.item() > config.tol:
            raise RuntimeError(f"Newton-Schulz did not reach {config.tol} in the predicted iterations at kappa={kappa}")
    return {"newton_schulz_iters_to_tol": ns_iters, "gd_iters_to_tol": gd_iters, "tol": config.tol}


def construction(config: NewtonConfig, task, held_out) -> tuple[dict, list[float]]:
    """2. The construction in float64: its largest errors against Newton's iterates (on 500 other
    sequences), and its held-out loss after every layer."""
    small = task.sample(min(config.n_eval, 500), generator(config.seed + 3), dtype=torch.float64)
    errs = construction_errors(small, config.construction_steps, config.construction_alpha)
    with torch.no_grad():
        preds = IterativeNewton(config.construction_steps, config.construction_alpha).predict_all(
            held_out.xs, held_out.ys, held_out.x_query)
    metrics = {
        "newton_schulz_construction_max_abs_err": max(errs.values()),
        "construction_prediction_max_abs_err": errs["prediction"],
        "construction_one_step_max_abs_err": errs["one_step"],
        "construction_steps": config.construction_steps,
    }
    return metrics, [mse_loss(p, held_out.y_query).item() for p in preds]


def logistic_regression(config: NewtonConfig, progress: bool, device):
    """4. Logistic regression: Newton and GD on the context's regularized loss, and a trained
    attention + MLP model read out after every block: ``(model, history, metrics, curves)``."""
    logistic = LogisticTask(d=config.d, n_ctx=config.n_ctx, mu=config.mu)
    lheld = logistic.sample(config.n_eval, generator(config.seed + 2), dtype=torch.float64)
    newton_ws = LogisticNewton(config.mu, config.logistic_newton_iters).iterates(lheld.xs, lheld.ys)
    gd_ws = LogisticGD(config.mu, max(config.logistic_gd_steps)).iterates(lheld.xs, lheld.ys, config.logistic_gd_steps)
    best = regularized_loss(lheld.xs, lheld.ys, newton_ws[-1], config.mu)

    def logit_err(w):
        return 0.5 * ((torch.einsum("bd,bd->b", w, lheld.x_query) - lheld.z_star) ** 2).mean().item()

    def subopt(w):
        return (regularized_loss(lheld.xs, lheld.ys, w, config.mu) - best).max().clamp(min=1e-17).item()

    curves = {"logistic_newton_subopt": [subopt(w) for w in newton_ws],
              "logistic_gd_subopt": [subopt(gd_ws[k]) for k in config.logistic_gd_steps]}
    model = attention_mlp_transformer(config.d, config.logistic_blocks, config.n_heads, config.mlp_width,
                                      config.init_std, config.clamp, config.seed)
    train_config = TrainConfig(**{**asdict(config.logistic_train), "seed": config.seed + 1})
    history = train(model, logistic, train_config, device=device, progress=progress and "attention + MLP")
    model = model.cpu().double().eval()
    with torch.no_grad():
        block_logits = model.predict_per_layer(lheld.xs, lheld.ys, lheld.x_query)  # (blocks, B)
    metrics = {
        "logistic_newton_loss": [logit_err(w) for w in newton_ws],
        "logistic_gd_loss": [logit_err(gd_ws[k]) for k in config.logistic_gd_steps],
        "logistic_gd_steps": list(config.logistic_gd_steps),
        "logistic_model_loss": [0.5 * ((z - lheld.z_star) ** 2).mean().item() for z in block_logits],
        "logistic_ce_optimum": expected_cross_entropy(lheld.z_star, lheld.p_query).item(),
        "logistic_ce_model": expected_cross_entropy(block_logits[-1], lheld.p_query).item(),
        "logistic_ce_true_weights": expected_cross_entropy(
            torch.einsum("bd,bd->b", lheld.w, lheld.x_query), lheld.p_query).item(),
        "logistic_train_seconds": history.seconds,
        "logistic_train_steps": train_config.steps,
    }
    return model, history, metrics, curves


def run(profile: str | None = None, progress: bool = False, config: NewtonConfig | None = None) -> NewtonResult:
    """Run the four parts of the chapter's experiment (module docstring)."""
    profile = get_profile(profile)
    config = config or CONFIGS[profile]
    device = get_device()
    counts = iteration_counts(config)
    task = RegressionTask(d=config.d, n_ctx=config.n_ctx, inputs=IllConditioned(config.d, config.kappa))
    held_out = task.sample(config.n_eval, generator(config.seed + 2), dtype=torch.float64)
    built, construction_curve = construction(config, task, held_out)
    # 3. Train a linear transformer; match its layers to Newton iterations and GD steps (and Fu et
    # al.'s probes); the same with LayerNorm and at a higher condition number.
    (model, history, newton_match, gd_match, layer_preds), by_seed = trained_at_seeds(config, task, device, progress)
    variants = {}
    fewer = config if config.variant_spread_seeds is None else replace(config, spread_seeds=config.variant_spread_seeds)
    if config.layer_norm_variant:
        (_, _, _, _, ln_preds), ln_by_seed = trained_at_seeds(fewer, task, device, progress, layer_norm=True)
        variants["layer_norm"] = {
            "layer_norm_layer_loss_se": [standard_error((p - held_out.y_query) ** 2 / 2) for p in ln_preds],
            "by_seed_layer_norm": _by_seed(fewer, ln_by_seed),
        }
    if config.kappa_high is not None:
        task_high = RegressionTask(d=config.d, n_ctx=config.n_ctx, inputs=IllConditioned(config.d, config.kappa_high))
        _, high_by_seed = trained_at_seeds(replace(fewer, kappa=config.kappa_high), task_high, device, progress)
        variants["kappa_high"] = {"kappa_high": config.kappa_high, "by_seed_kappa_high": _by_seed(fewer, high_by_seed)}
    lmodel, lhistory, logistic_metrics, curves = logistic_regression(config, progress, device)
    depth = None if config.logistic_depth is None else run_depths(config.logistic_depth, device, progress)
    metrics = {
        **counts,
        **built,
        "model_layer_loss": [mse_loss(p, held_out.y_query).item() for p in layer_preds],
        # the standard error of each over the held-out sequences
        "model_layer_loss_se": [standard_error((p - held_out.y_query) ** 2 / 2) for p in layer_preds],
        "newton_loss": newton_match["algo_err"],
        "least_squares_loss": newton_match["algo_err"][-1],
        "matching_newton_steps": newton_match["by_prediction"],
        "matching_gd_steps": gd_match["by_prediction"],
        "matching_newton_msd": newton_match["msd"],
        "matching_gd_msd": gd_match["msd"],
        "error_level_newton_steps": newton_match["by_error"],
        "error_level_gd_steps": gd_match["by_error"],
        "gd_max_steps": config.gd_max,
        "newton_max_iters": config.newton_max,
        "train_seconds": history.seconds,
        "train_steps": config.train.steps,
        "final_train_loss": history.losses[-1],
        "by_seed": _by_seed(config, by_seed),
        "kappa": config.kappa,
        "newton_orders": list(config.orders),
        "order_loss": order_losses(config, held_out),  # order p after 0..L iterations
        "effective_order": by_seed[0]["effective_order"],
        **{k: by_seed[0][k] for k in by_seed[0] if k.startswith("probe_")},
        **{k: v for variant in variants.values() for k, v in variant.items()},
        **logistic_metrics,
        **(depth.metrics if depth is not None else {}),
        "n_eval": config.n_eval,
        "profile": profile,
        "device": str(device),
    }
    curves = {"construction_newton": construction_curve, **curves}
    return NewtonResult(config, model, lmodel, history, lhistory, curves, Lookup.deep(metrics), depth)
