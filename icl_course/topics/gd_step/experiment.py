"""Chapter 1's experiment: one trained linear-attention layer against one step of gradient descent.

von Oswald et al. 2023 (arXiv 2212.07677), with the data of their reference code: d = n = 10,
``x ~ U(-0.5, 0.5)^d``, ``w ~ N(0, I)``, no noise, loss 0.5·MSE.

``run(profile)`` trains a one-layer, one-head linear self-attention model (FULL matrices) on fresh
tasks, finds the best one-step GD learner by line search, and compares the two on held-out tasks:
loss, prediction distance, and the implicit models ``d y_hat / d x_q``. With ``config.recurrent``
and ``config.softmax`` it also compares recurrent LSA with multi-step GD and GD++
(:mod:`.recurrent`) and softmax attention with one GD step (:mod:`.softmax`). The notebook, the command
line (``icl-course reproduce gd-step``) and the tests all call this one function.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from icl_course import plots
from icl_course.linear_transformer import (
    FullAttention,
    LinearTransformer,
    gd_transformer,
    linear_transformer,
    rescaled_like_gd,
)
from icl_course.metrics import (
    evaluate,
    model_cosine,
    model_distance,
    per_sequence_losses,
    prediction_distance,
    standard_error,
)
from icl_course.results import Lookup
from icl_course.runtime import get_device, get_profile
from icl_course.solvers import GradientDescent, tune_step_size
from icl_course.tasks import RegressionTask, Uniform, generator
from icl_course.training import History, TrainConfig, train

from .recurrent import COLOURS, RecurrentConfig, RecurrentResult, run_recurrent
from .softmax import SoftmaxConfig, run_softmax

__all__ = ["GDStepConfig", "GDStepResult", "CONFIGS", "run", "best_one_step", "train_lsa", "out_of_distribution",
           "interpolation", "make_task", "interpolate"]


@dataclass(frozen=True)
class GDStepConfig:
    d: int = 10  # input dimension
    n_ctx: int = 10  # context pairs per sequence
    input_range: float = 0.5  # x ~ U(-input_range, input_range); the paper's text uses 1.0
    train: TrainConfig = field(default_factory=TrainConfig)
    init_std: float = 1e-3  # std of the initial Q and P entries
    n_eval: int = 10_000  # held-out sequences behind every reported metric
    n_track: int = 20  # how many times alignment is measured during training
    ood_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)  # test-time input-range multipliers
    seed: int = 0  # model init; the data streams use seed + 1 (train), seed + 2 (held out), seed + 4 (GD's step tuned)
    # The whole experiment again at each of these seeds (model, training and held-out data all change),
    # for the spread of the training numbers; figures and the headline numbers come from ``seed``.
    spread_seeds: tuple[int, ...] = ()
    # Recurrent (weight-tied) LSA against multi-step GD and GD++ (``recurrent.py``), and one softmax
    # attention layer against one GD step (``softmax.py``); None leaves them out.
    recurrent: RecurrentConfig | None = None
    softmax: SoftmaxConfig | None = None


CONFIGS = {
    # seconds: enough for the shapes and the pipeline, not for the claim
    "smoke": GDStepConfig(train=TrainConfig(steps=60, batch_size=256, lr=1e-2), n_eval=1000, n_track=3,
                          recurrent=RecurrentConfig(n_ctxs=(10,), seeds=(0,), gdpp_n_ctxs=(10,), n_eval=1000,
                                                    n_tune=1000),
                          softmax=SoftmaxConfig(seeds=(0,))),
    # a laptop CPU in well under a minute; the claim (within 2% of GD, cosine >= 0.99) holds here.
    # The recurrent and softmax models are the shipped ones (icl_course/weights/gd_step), re-measured.
    "quick": GDStepConfig(train=TrainConfig(steps=1500, batch_size=2048, lr=3e-3), spread_seeds=(1, 2),
                          recurrent=RecurrentConfig(), softmax=SoftmaxConfig()),
    # the reference code's settings; every recurrent and softmax model trained here (~30 min on a CPU core)
    "full": GDStepConfig(train=TrainConfig(steps=5000, batch_size=2048, lr=1e-3), spread_seeds=(1, 2, 3, 4),
                         recurrent=RecurrentConfig(source="train"), softmax=SoftmaxConfig(source="train")),
}


def make_task(config: GDStepConfig, input_scale: float = 1.0) -> RegressionTask:
    r = config.input_range * input_scale
    return RegressionTask(d=config.d, n_ctx=config.n_ctx, inputs=Uniform(-r, r))


@dataclass
class GDStepResult:
    config: GDStepConfig
    model: LinearTransformer  # the trained one-layer LSA (on the CPU)
    gd: GradientDescent  # one step of GD with the best step size
    history: History
    tracking: dict[str, list[float]]  # step, lsa_loss, model_cosine, prediction_distance during training
    eta_grid: list[float]  # GD step sizes ...
    gd_losses: list[float]  # ... and their held-out losses
    ood: dict[str, list[float]]  # scale, lsa_loss, gd_loss with test inputs scaled
    interpolation: dict[str, list[float]]  # alpha, loss along construction -> trained weights
    metrics: dict[str, float | str]
    recurrent: RecurrentResult | None = None  # recurrent LSA vs GD and GD++ (config.recurrent)

    def figures(self) -> dict:
        """Every figure of the chapter, by name (what ``icl-course reproduce`` saves)."""
        Q, P = self.model.layers[0].matrices()
        Q_gd, P_gd = gd_transformer(self.config.d, self.gd.eta).layers[0].matrices()
        extra = {}
        if self.recurrent is not None:
            one_layer = {"lsa": self.metrics["lsa_loss"], "gd": self.metrics["best_gd_loss"]}
            extra["recurrent"] = self.recurrent.figure(one_layer if self.config.n_ctx == 10 else None)
        return {
            **extra,
            "loss_curve": plots.recolour(
                plots.loss_curve(self.history, {"best one-step GD": self.metrics["best_gd_loss"]}),
                {"training loss": COLOURS["trained LSA"], "best one-step GD": COLOURS["GD"]},
            ),
            "alignment": plots.curves(
                self.tracking["step"],
                {k: self.tracking[k] for k in ("model_cosine", "prediction_distance")},
                xlabel="training step",
                title="trained LSA vs one GD step (held-out tasks)",
            ),
            "matrices": plots.matrices(
                {"trained $Q$ (papers' $Q^\\top$)": Q[0], "trained $P$": P[0],
                 "GD construction: $Q$": Q_gd[0], "GD construction: $P$": P_gd[0]},
                ncols=2,
            ),
            "step_size": self.step_size_figure(),
            "out_of_distribution": self.out_of_distribution_figure(),
            "interpolation": self.interpolation_figure(),
        }

    def step_size_figure(self, eta: float | None = None):
        """Held-out loss of one GD step against its step size, with the trained layer's loss (and ``eta``)."""
        fig = plots.step_size(self.eta_grid, self.gd_losses, self.gd.eta, self.metrics["lsa_loss"], eta=eta)
        return plots.recolour(fig, {"one GD step": COLOURS["GD"], "best eta": COLOURS["GD"],
                              "trained LSA": COLOURS["trained LSA"]})

    def out_of_distribution_figure(self):
        """Both learners' losses on scaled test inputs (left) and their ratio, 1 when equal (right)."""
        scale, lsa, gd = self.ood["scale"], self.ood["lsa_loss"], self.ood["gd_loss"]
        fig, (ax, bx) = plots.figure(ncols=2, width=3.7)
        ax.plot(scale, gd, "o-", ms=6, color=COLOURS["GD"], label="one GD step")
        ax.plot(scale, lsa, "^--", ms=4, color=COLOURS["trained LSA"], label="trained LSA")
        ax.set(xlabel="test input range / training range", ylabel="held-out 0.5·MSE", yscale="log",
               title="loss on scaled test inputs")
        ax.legend(fontsize=8)
        bx.plot(scale, [a / b for a, b in zip(lsa, gd)], "o-", ms=4, color=COLOURS["trained LSA"])
        bx.axhline(1.0, color="k", ls=":", lw=1)
        bx.set(xlabel="test input range / training range", ylabel="LSA loss / GD loss",
               title="ratio (1: equal losses)")
        low, high = bx.get_ylim()  # at least 0.9-1.1, so that noise is not magnified into a trend
        bx.set_ylim(min(low, 0.9), max(high, 1.1))
        return fig

    def interpolation_figure(self):
        """The loss along the path from the construction to the trained weights, on the scale from 0 to
        the loss of predicting 0, with the best GD step's loss for reference."""
        m = self.metrics
        fig, (ax,) = plots.figure()
        ax.plot(self.interpolation["alpha"], self.interpolation["loss"], "o-", ms=3, color=COLOURS["trained LSA"],
                label="interpolated weights")
        ax.axhline(m["best_gd_loss"], color=COLOURS["GD"], ls="--", label="best one GD step")
        ax.axhline(m["zero_predictor_loss"], color=COLOURS["predicting 0"], ls=":", label="predicting 0")
        ax.set(xlabel=r"$\alpha$ (0: GD construction, 1: trained)", ylabel="held-out 0.5·MSE",
               title="straight path: construction to trained weights")
        ax.set_ylim(0, 1.15 * max(m["zero_predictor_loss"], *self.interpolation["loss"]))
        ax.legend(fontsize=8, loc="lower right")
        return fig


def interpolate(model: LinearTransformer, gd_model: LinearTransformer, alpha: float) -> LinearTransformer:
    """One-layer model with weights ``(1 - alpha) * construction + alpha * trained (rescaled)``."""
    Q_t, P_t = rescaled_like_gd(model.layers[0])
    Q_g, P_g = (m[0].detach() for m in gd_model.layers[0].matrices())
    layer = FullAttention(model.d, n_heads=1, init_std=0.0).to(Q_t)
    with torch.no_grad():
        layer.Q[0] = (1 - alpha) * Q_g.to(Q_t) + alpha * Q_t
        layer.P[0] = (1 - alpha) * P_g.to(P_t) + alpha * P_t
    return LinearTransformer([layer])


SPREAD_KEYS = ("lsa_loss", "best_gd_loss", "relative_gap", "model_cosine", "prediction_distance", "implied_eta")


def best_one_step(tune, held_out) -> tuple[GradientDescent, float, list[float], list[float]]:
    """The best one-step GD learner by line search on the ``tune`` tasks, its loss on the held-out
    ones, and the held-out loss along a grid of step sizes: ``(gd, loss, eta_grid, grid_losses)``."""
    eta, _ = tune_step_size(tune, n_steps=1)
    eta_grid = torch.logspace(-1, 1.5, 60).tolist()
    gd = GradientDescent(eta)
    return gd, evaluate(gd, held_out), eta_grid, [evaluate(GradientDescent(e), held_out) for e in eta_grid]


def train_lsa(config: GDStepConfig, task, gd: GradientDescent, held_out, progress: bool, device):
    """Train the one-layer LSA, measuring its alignment with ``gd`` ``n_track`` times on the held-out
    tasks: ``(model, history, tracking)``."""
    model = linear_transformer(config.d, n_layers=1, n_heads=1, init_std=config.init_std, seed=config.seed)
    train_config = replace(config.train, seed=config.seed + 1)

    def alignment(model) -> dict:
        return {"lsa_loss": evaluate(model, held_out), "model_cosine": model_cosine(model, gd, held_out),
                "prediction_distance": prediction_distance(model, gd, held_out)}

    every = max(1, train_config.steps // config.n_track)
    history = train(model, task, train_config, device=device, progress=progress and "training LSA",
                    track=[(alignment, every)])
    return model.eval(), history, history.tracked[0]


def out_of_distribution(config: GDStepConfig, learners: dict, device) -> dict[str, list[float]]:
    """The learners' losses on inputs drawn from a wider or narrower range (``config.ood_scales``)."""
    ood = {"scale": list(config.ood_scales), **{f"{name}_loss": [] for name in learners}}
    for i, scale in enumerate(config.ood_scales):
        batch = make_task(config, scale).sample(config.n_eval, generator(config.seed + 10 + i), device=device)
        for name, learner in learners.items():
            ood[f"{name}_loss"].append(evaluate(learner, batch))
    return ood


def interpolation(model: LinearTransformer, eta: float, held_out, device) -> dict[str, list[float]]:
    """The loss along the straight path from the construction's weights to the trained ones (rescaled)."""
    gd_model = gd_transformer(model.d, eta).to(device)
    alphas = torch.linspace(0, 1, 11).tolist()
    return {"alpha": alphas, "loss": [evaluate(interpolate(model, gd_model, a), held_out) for a in alphas]}


def run(profile: str | None = None, progress: bool = False, config: GDStepConfig | None = None) -> GDStepResult:
    """Train the one-layer LSA and compare it with the best one-step GD learner on held-out tasks."""
    profile = get_profile(profile)
    config = config or CONFIGS[profile]
    device = get_device()
    task = make_task(config)
    held_out = task.sample(config.n_eval, generator(config.seed + 2), device=device)
    tune = task.sample(config.n_eval, generator(config.seed + 4), device=device)  # never the held-out tasks
    gd, gd_loss, eta_grid, gd_losses = best_one_step(tune, held_out)
    model, history, tracking = train_lsa(config, task, gd, held_out, progress, device)
    ood = out_of_distribution(config, {"lsa": model, "gd": gd}, device)
    interp = interpolation(model, gd.eta, held_out, device)
    # The paper's text's inputs, U(-1, 1): only the scale of the loss changes.
    paper_text_batch = make_task(config, 1.0 / config.input_range).sample(config.n_eval, generator(config.seed + 3))
    _, gd_loss_paper_text = tune_step_size(paper_text_batch.to(device), n_steps=1)
    _, P_scaled = rescaled_like_gd(model.layers[0])
    lsa_loss = evaluate(model, held_out)
    lsa_errors, gd_errors = per_sequence_losses(model, held_out), per_sequence_losses(gd, held_out)
    metrics = {
        "best_gd_loss": gd_loss,
        "best_gd_loss_se": standard_error(gd_errors),
        "best_gd_eta": gd.eta,
        "lsa_loss": lsa_loss,
        "lsa_loss_se": standard_error(lsa_errors),
        "zero_predictor_loss": 0.5 * held_out.y_query.pow(2).mean().item(),
        "relative_gap": lsa_loss / gd_loss - 1,
        "relative_gap_se": standard_error(lsa_errors - gd_errors) / gd_loss,  # paired: both on the same sequences
        "model_cosine": model_cosine(model, gd, held_out),
        "model_l2_distance": model_distance(model, gd, held_out),
        "prediction_distance": prediction_distance(model, gd, held_out),
        "implied_eta": -P_scaled[config.d, config.d].item(),
        "best_gd_loss_inputs_U(-1,1)": gd_loss_paper_text,
        "train_seconds": history.seconds,
        "train_steps": config.train.steps,
        "n_eval": config.n_eval,
        "profile": profile,
        "device": str(device),
    }
    recurrent = None
    if config.recurrent is not None:
        recurrent = run_recurrent(config.recurrent, device=device, progress=progress)
        metrics.update(recurrent.metrics)
    if config.softmax is not None:  # scored on the same held-out sequences as the one-layer LSA
        metrics.update(run_softmax(config.softmax, held_out, gd, device=device, progress=progress))
    spread = [run(profile, progress, replace(config, seed=s, spread_seeds=(), recurrent=None, softmax=None)).metrics
              for s in config.spread_seeds]
    metrics["by_seed"] = {"seed": [config.seed, *config.spread_seeds],
                          **{k: [r[k] for r in (metrics, *spread)] for k in SPREAD_KEYS}}
    return GDStepResult(
        config=config,
        model=model.cpu(),
        gd=gd,
        history=history,
        tracking=tracking,
        eta_grid=eta_grid,
        gd_losses=gd_losses,
        ood=ood,
        interpolation=interp,
        metrics=Lookup.deep(metrics),
        recurrent=recurrent,
    )
