"""Back to in-context learning: does the outer optimizer change the algorithm a transformer learns?

Chapter 1 trains a one-layer linear self-attention (LSA) layer on fresh linear-regression tasks
(d = 10, n = 10, von Oswald et al. 2023) with Adam and finds one step of gradient descent in its
weights. Here the same layer is trained with sign descent, Adam and GD as outer optimizers (the
update rules of :mod:`.optimizers`), and each trained layer is read the way chapter 1 reads it: the
implicit GD step size ``eta = -P[y, y]`` after :func:`~icl_course.linear_transformer.rescaled_like_gd`,
the cosine between its implicit linear model and that of the best one-step GD learner, and its
held-out loss against that learner's.

Each optimizer's learning rate is chosen from ``config.lr_grid`` by the loss on *validation* tasks
(never the held-out ones the numbers are reported on), at run index 0; a rate whose training
diverges scores an infinite loss. The chosen rate then trains ``config.seeds`` runs (new initial
weights and data stream each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from icl_course.linear_transformer import linear_transformer, rescaled_like_gd
from icl_course.metrics import model_cosine, per_sequence_losses, standard_error
from icl_course.results import over_seeds
from icl_course.solvers import GradientDescent, tune_step_size
from icl_course.tasks import RegressionTask, Uniform, generator
from icl_course.training import TrainConfig, TrainingDiverged, train

from .optimizers import RuleOptimizer, adam, gd, sign_descent

__all__ = ["InContextConfig", "in_context_run", "in_context_figure", "ICL_RULES", "ICL_KEYS"]

ICL_RULES = {"sign descent": sign_descent, "Adam": adam, "GD": gd}  # name -> rule(lr), the chapter's order
ICL_KEYS = ("held_out_loss", "held_out_loss_se", "relative_gap_to_gd", "implied_eta", "model_cosine")


@dataclass(frozen=True)
class InContextConfig:
    d: int = 10  # chapter 1's task: x ~ U(-0.5, 0.5)^d, w ~ N(0, I), no noise, n = 10 context pairs
    n_ctx: int = 10
    input_range: float = 0.5
    steps: int = 500  # outer-optimizer steps, each on a fresh batch of tasks (chapter 1 trains 1500)
    batch_size: int = 512
    init_std: float = 1e-3  # chapter 1's initial std of the Q and P entries
    lr_grid: dict = field(default_factory=lambda: {
        "sign descent": (3e-3, 1e-2, 3e-2), "Adam": (3e-3, 1e-2, 3e-2), "GD": (1.0, 3.0, 10.0)})
    seeds: int = 3  # run k: model seed seed + 100 k, data stream seed + 100 k + 1
    n_eval: int = 4000  # held-out tasks (seed + 2), validation tasks (seed + 5), GD's step tuned on seed + 4
    seed: int = 0

    def __post_init__(self):
        for name in ("d", "n_ctx", "steps", "batch_size", "seeds", "n_eval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InContextConfig.{name} must be an integer >= 1, got {value!r}")
        if set(self.lr_grid) != set(ICL_RULES) or not all(len(g) > 0 and min(g) > 0 for g in self.lr_grid.values()):
            raise ValueError(f"InContextConfig.lr_grid must give a non-empty tuple of rates > 0 for each of "
                             f"{list(ICL_RULES)}, got {self.lr_grid!r}")

    def task(self) -> RegressionTask:
        return RegressionTask(d=self.d, n_ctx=self.n_ctx, inputs=Uniform(-self.input_range, self.input_range))


def _train(config: InContextConfig, name: str, lr: float, k: int, device):
    """One LSA layer trained with ``name`` at ``lr`` (run index ``k``); None if it diverged."""
    model = linear_transformer(config.d, n_layers=1, n_heads=1, init_std=config.init_std, seed=config.seed + 100 * k)
    train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, grad_clip=None,
                               seed=config.seed + 100 * k + 1, log_every=config.steps)
    try:
        train(model, config.task(), train_config, device=device,
              optimizer=RuleOptimizer(model.parameters(), ICL_RULES[name](lr)))
    except TrainingDiverged:
        return None
    return model.eval()


def _loss(model, batch) -> float:
    return math.inf if model is None else per_sequence_losses(model, batch).mean().item()


def in_context_run(config: InContextConfig, device=None) -> dict:
    """Train the LSA layer with every outer optimizer; return the metrics (JSON-ready).

    ``{"gd_eta", "gd_loss", "gd_loss_se", "lr": {name: chosen rate}, "validation_loss": {name: [per
    rate]}, "by_seed": {name: {key: [per seed]}}, "over_seeds": {name: {key: mean/std}}}`` with the
    keys of :data:`ICL_KEYS` (``relative_gap_to_gd`` is ``held_out_loss / gd_loss - 1``).
    """
    task = config.task()
    held_out = task.sample(config.n_eval, generator(config.seed + 2), device=device)
    validation = task.sample(config.n_eval, generator(config.seed + 5), device=device)
    tune = task.sample(config.n_eval, generator(config.seed + 4), device=device)
    eta, _ = tune_step_size(tune, n_steps=1)
    gd_learner = GradientDescent(eta)
    gd_losses = per_sequence_losses(gd_learner, held_out)
    gd_loss = gd_losses.mean().item()
    out = {"gd_eta": eta, "gd_loss": gd_loss, "gd_loss_se": standard_error(gd_losses), "lr": {},
           "validation_loss": {}, "by_seed": {}, "over_seeds": {}, "steps": config.steps,
           "batch_size": config.batch_size, "seeds": config.seeds, "n_eval": config.n_eval}
    for name in ICL_RULES:
        grid = list(config.lr_grid[name])
        first = [_train(config, name, lr, 0, device) for lr in grid]
        val = [_loss(m, validation) for m in first]
        best = min(range(len(grid)), key=lambda i: val[i])
        if not math.isfinite(val[best]):
            raise TrainingDiverged(f"{name} diverged at every rate of lr_grid {grid}: give it smaller rates")
        lr = grid[best]
        models = [first[best]] + [_train(config, name, lr, k, device) for k in range(1, config.seeds)]
        by_seed = {key: [] for key in ICL_KEYS}
        for model in models:
            if model is None:  # diverged at a later seed: recorded as missing
                for key in ICL_KEYS:
                    by_seed[key].append(None)
                continue
            losses = per_sequence_losses(model, held_out)
            _, P = rescaled_like_gd(model.layers[0])
            by_seed["held_out_loss"].append(losses.mean().item())
            by_seed["held_out_loss_se"].append(standard_error(losses))
            by_seed["relative_gap_to_gd"].append(losses.mean().item() / gd_loss - 1)
            by_seed["implied_eta"].append(-P[config.d, config.d].item())
            by_seed["model_cosine"].append(model_cosine(model, gd_learner, held_out))
        out["lr"][name] = lr
        out["validation_loss"][name] = [v if math.isfinite(v) else None for v in val]  # None: diverged
        out["by_seed"][name] = by_seed
        out["over_seeds"][name] = over_seeds(by_seed)
    return out


def in_context_figure(metrics: dict):
    """Per optimizer and seed: the implicit step size against the tuned GD step, and the held-out loss
    against one GD step's (``metrics`` is :func:`in_context_run`'s result)."""
    from icl_course import plots

    from .experiment import COLOURS  # here: experiment imports this module

    fig, axes = plots.figure(ncols=2, width=4.0)
    names = list(ICL_RULES)
    for ax, key, ref, title in ((axes[0], "implied_eta", metrics["gd_eta"], "implicit GD step size $-P_{yy}$"),
                                (axes[1], "held_out_loss", metrics["gd_loss"], "held-out loss (0.5·MSE)")):
        for i, name in enumerate(names):
            values = [v for v in metrics["by_seed"][name][key] if v is not None]
            ax.plot([i] * len(values), values, "o", color=COLOURS[name], label=f"{name} (lr {metrics['lr'][name]:g})")
        ax.axhline(ref, color="black", ls="--", lw=1, label="best one GD step")
        ax.set_xticks(range(len(names)), names)
        ax.set(title=title, xlim=(-0.5, len(names) - 0.5))
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, ncols=4, loc="outside lower center")
    return fig
