"""Giannou et al.'s logistic-regression experiment: one trained model per depth against damped Newton.

Giannou et al. 2024 (arXiv 2403.03183) train a transformer of 1, 6, 12 and 20 layers on in-context
logistic regression and plot the regularized loss of the weights each model outputs beside the loss
of Newton's iterates, one Newton step per layer (their public code, ``Leiay/icl_newton``:
``plot_logistic_regression.py``). Their task, as that code sets it up:

- d = 5, 26 labelled points per sequence, inputs ``N(0, I)`` (condition number 1);
- clean labels ``y_i = sign(<w, x_i>)``, ``w ~ N(0, I)``;
- the mu-regularized loss ``L`` of :mod:`.logistic` with ``mu = 0.01``;
- the training target is the optimum ``w*`` of ``L``, found by *damped* Newton (step shortened by
  ``2 sqrt(mu) / (2 sqrt(mu) + lambda)``, ``lambda`` the Newton decrement), and a model outputs a
  weight vector;
- each depth is a separately trained model.

This module keeps all of that and names what differs: their model is a GPT-2-style encoder (softmax
attention, MLPs, width 256); ours is the (linear attention, ReLU MLP) block stack of
:func:`~.logistic.attention_mlp_transformer`, the architecture of their construction, of width 32. Our
model outputs the weights through d basis-vector queries (:func:`~.logistic.predicted_weights`)
instead of a read-out head. Their damped Newton starts from a small random ``w_0``; ours from 0.

Training takes minutes, so the models ship with the package (``icl_course/weights/newton/``); the
chapter loads and re-measures them. ``python -m icl_course.topics.newton.logistic_depth`` retrains
them and rewrites the shipped files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from icl_course import plots, pretrained
from icl_course.metrics import standard_error
from icl_course.results import mean_std
from icl_course.tasks import generator
from icl_course.training import TrainConfig, train

from .logistic import (
    AttentionMLPTransformer,
    LogisticNewton,
    LogisticTask,
    attention_mlp_transformer,
    predicted_weights,
    regularized_loss,
)

__all__ = ["MU", "DEPTHS", "DepthSpec", "DepthConfig", "DepthResult", "make_task", "train_depth", "run_depths",
           "write_weights"]

D, N_CTX, MU = 5, 26, 0.01  # Giannou et al.'s configs/logistic_regression.yaml and script (mu = 0.01)
DEPTHS = (1, 6, 12, 20)  # the depths their figure plots
WIDTH = 32  # hidden units of each block's MLP
NEWTON_TARGET_STEPS = 40  # damped Newton reaches float64 precision in ~20 steps on this task
TRAIN = TrainConfig(steps=1500, batch_size=512, lr=5e-3, warmup=0.02, schedule="cosine")


def make_task(deep_supervision: bool = False) -> LogisticTask:
    """Their task in this package's terms: sign labels, basis-vector queries, damped-Newton target."""
    return LogisticTask(d=D, n_ctx=N_CTX, mu=MU, labels="sign", query="basis", damped=True,
                        newton_steps=NEWTON_TARGET_STEPS, deep_supervision=deep_supervision)


def held_out(size: int, seed: int = 400):
    """Sequences every learner is scored on (seed 400; seed 500 is the models' validation set)."""
    return make_task().sample(size, generator(seed), dtype=torch.float64)


@dataclass(frozen=True)
class DepthSpec:
    """One trained model: its number of (attention, MLP) blocks and its seed."""

    n_blocks: int
    seed: int

    @property
    def name(self) -> str:
        """Its shipped weights: ``newton/logistic-6blocks-seed0``."""
        return f"newton/logistic-{self.n_blocks}blocks-seed{self.seed}"

    @property
    def train_config(self) -> TrainConfig:
        return replace(TRAIN, seed=100 + self.seed)  # init from seed, data from 100 + seed


def _scores(model, batch, w_star) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the loss ``L`` of the model's weights and their squared distance to ``w*`` (per coordinate)."""
    model = model.to(dtype=torch.float64).eval()
    with torch.no_grad():
        w = predicted_weights(model, batch.xs, batch.ys)
    return regularized_loss(batch.xs, batch.ys, w, MU), ((w - w_star) ** 2).mean(-1)


def train_depth(spec: DepthSpec, device=None, progress: bool = False,
                steps: int | None = None) -> tuple[AttentionMLPTransformer, dict]:
    """Train ``spec``'s model on the final read-out: ``(model, provenance)``. ``steps`` shortens the run."""
    model = attention_mlp_transformer(D, spec.n_blocks, n_heads=1, width=WIDTH, init_std=1e-3, clamp=10.0,
                                      seed=spec.seed)
    config = spec.train_config if steps is None else replace(spec.train_config, steps=steps)
    history = train(model, make_task(), config, device=device,
                    progress=progress and f"logistic, {spec.n_blocks} blocks, seed {spec.seed}")
    model = model.cpu().eval()
    validation = held_out(2000, seed=500)
    losses, distances = _scores(model, validation, optimum(validation))
    model = model.float()
    record = {
        "task": {"d": D, "n_ctx": N_CTX, "mu": MU, "inputs": "N(0, I)", "weights": "N(0, I)",
                 "labels": "sign(<w, x>)", "target": f"w* by {NEWTON_TARGET_STEPS} damped Newton steps",
                 "query": "e_m (the model outputs w through d basis queries)"},
        "train": {**vars(config), "init_std": 1e-3, "init_seed": spec.seed, "width": WIDTH,
                  "seconds": history.seconds, "readout": "final block only"},
        "metrics": {"final_train_loss": history.losses[-1], "validation_loss": losses.mean().item(),
                    "validation_distance": distances.mean().item(), "validation": {"seed": 500, "size": 2000}},
        "selection": pretrained.one_run(spec.seed),
        "command": "python -m icl_course.topics.newton.logistic_depth",
    }
    return model, record


def optimum(batch) -> torch.Tensor:
    """``w*`` of every sequence of ``batch`` (damped Newton to float64 precision): ``(B, d)``."""
    return LogisticNewton(MU, NEWTON_TARGET_STEPS, damped=True).weights(batch.xs, batch.ys)


@dataclass(frozen=True)
class DepthConfig:
    depths: tuple[int, ...] = DEPTHS
    seeds: tuple[int, ...] = (0, 1, 2)
    source: str = "shipped"  # "shipped": load the package's weights; "train": train them here
    n_eval: int = 2000  # held-out sequences (each read out with d probes, in float64)
    newton_steps: int = 20  # Newton iterates scored (their figure's x-axis reaches 20)
    train_steps: int | None = None  # "train" only: shorter runs (the smoke profile)


@dataclass
class DepthResult:
    config: DepthConfig
    rows: list[dict] = field(default_factory=list)  # one per depth
    newton: dict = field(default_factory=dict)  # per-step losses of damped and full-step Newton
    metrics: dict = field(default_factory=dict)

    def figure(self):
        """Their figure, as the gap to the optimum: ``L(w) - L(w*)`` of each model's weights and of
        Newton's iterates against layers / steps, one step per layer; and the distance to ``w*``."""
        from .experiment import COLOURS  # here: experiment imports this module

        fig, (ax, bx) = plots.figure(ncols=2, width=4.8)
        k = list(range(len(self.newton["damped_loss"])))
        depths = [r["n_blocks"] for r in self.rows]
        optimum, floor = self.newton["optimum_loss"], 1e-5  # below the floor: only float64 rounding

        def gap(values):
            return [max(v - optimum, floor) for v in values]

        newton, trained = COLOURS["Newton"], COLOURS["trained"]
        ax.plot(k, gap(self.newton["damped_loss"]), "o--", ms=3, color=newton,
                label="damped Newton (theirs), per step")
        ax.plot(k, gap(self.newton["full_loss"]), "o:", ms=3, color=newton, alpha=0.5,
                label="Newton, full step")
        ax.errorbar(depths, gap([r["loss"]["mean"] for r in self.rows]),
                    yerr=[r["loss"]["std"] or 0 for r in self.rows],
                    fmt="s-", ms=5, capsize=3, color=trained, label="trained model, one per depth")
        ax.set(xlabel="layers (blocks) / Newton steps", ylabel=r"$L(w) - L(w^*)$, floored at $10^{-5}$",
               yscale="log", title=rf"regularized logistic loss, $\mu$ = {MU}")
        ax.legend(fontsize=8)
        floor = 1e-6
        bx.plot(k, [max(v, floor) for v in self.newton["damped_distance"]], "o--", ms=3, color=newton,
                label="damped Newton")
        bx.errorbar(depths, [r["distance"]["mean"] for r in self.rows],
                    yerr=[r["distance"]["std"] or 0 for r in self.rows],
                    fmt="s-", ms=5, capsize=3, color=trained, label="trained model")
        bx.set(xlabel="layers (blocks) / Newton steps", ylabel=r"mean $(w - w^*)^2$, floored at $10^{-6}$",
               yscale="log", title="distance to the optimum $w^*$")
        bx.legend(fontsize=8)
        return fig


def _model(spec: DepthSpec, config: DepthConfig, device, progress: bool):
    if config.source == "shipped":
        return pretrained.load(spec.name)
    if config.source == "train":
        return train_depth(spec, device=device, progress=progress, steps=config.train_steps)[0]
    raise ValueError(f"source must be 'shipped' or 'train', got {config.source!r}")


def newton_steps_beaten(loss: float, newton_losses: list[float]) -> int | None:
    """The most Newton steps ``k`` whose mean loss is still at least ``loss``: the model is as good as
    ``k`` steps or better (None: worse than the start, ``w = 0``)."""
    return max((k for k, v in enumerate(newton_losses) if v >= loss), default=None)


def run_depths(config: DepthConfig | None = None, device=None, progress: bool = False) -> DepthResult:
    """Load (or train) one model per depth and seed; score them and Newton's iterates on held-out sequences."""
    config = config or DepthConfig()
    batch = held_out(config.n_eval)
    w_star = optimum(batch)
    result = DepthResult(config)
    damped = LogisticNewton(MU, config.newton_steps, damped=True).iterates(batch.xs, batch.ys)
    full = LogisticNewton(MU, config.newton_steps).iterates(batch.xs, batch.ys)
    result.newton = {
        "damped_loss": [regularized_loss(batch.xs, batch.ys, w, MU).mean().item() for w in damped],
        "full_loss": [regularized_loss(batch.xs, batch.ys, w, MU).mean().item() for w in full],
        "damped_distance": [((w - w_star) ** 2).mean().item() for w in damped],
        "optimum_loss": regularized_loss(batch.xs, batch.ys, w_star, MU).mean().item(),
    }
    for depth in config.depths:
        losses, ses, distances = [], [], []
        for seed in config.seeds:
            loss, distance = _scores(_model(DepthSpec(depth, seed), config, device, progress), batch, w_star)
            losses.append(loss.mean().item())
            ses.append(standard_error(loss))
            distances.append(distance.mean().item())
        result.rows.append({
            "n_blocks": depth, "loss": mean_std(losses), "loss_by_seed": losses, "loss_se": ses,
            "distance": mean_std(distances), "distance_by_seed": distances,
            "newton_beaten_by_seed": [newton_steps_beaten(v, result.newton["damped_loss"]) for v in losses],
        })
    result.metrics = {
        "logistic_depths": list(config.depths),
        "logistic_depth_seeds": list(config.seeds),
        "logistic_depth_loss": {str(r["n_blocks"]): r["loss"]["mean"] for r in result.rows},
        "logistic_depth_loss_std": {str(r["n_blocks"]): r["loss"]["std"] for r in result.rows},
        "logistic_depth_loss_by_seed": {str(r["n_blocks"]): r["loss_by_seed"] for r in result.rows},
        "logistic_depth_distance": {str(r["n_blocks"]): r["distance"]["mean"] for r in result.rows},
        "logistic_depth_newton_beaten": {str(r["n_blocks"]): r["newton_beaten_by_seed"] for r in result.rows},
        "logistic_damped_newton_loss": result.newton["damped_loss"],
        "logistic_full_newton_loss": result.newton["full_loss"],
        "logistic_optimum_loss": result.newton["optimum_loss"],
        "logistic_depth_source": config.source,
    }
    return result


def write_weights(specs: list[DepthSpec] | None = None, folder: Path | None = None, progress: bool = True) -> list[dict]:
    """Train the shipped models and save them (``folder=None``: into the package)."""
    records = []
    for spec in specs or [DepthSpec(L, s) for s in (0, 1, 2) for L in DEPTHS]:
        model, record = train_depth(spec, device="cpu", progress=progress)
        pretrained.save(spec.name, model, record, folder=folder)
        records.append(record)
    return records


if __name__ == "__main__":  # retrain the shipped weights: python -m icl_course.topics.newton.logistic_depth
    torch.set_num_threads(1)
    for spec in [DepthSpec(L, s) for s in (0, 1, 2) for L in DEPTHS]:
        print(spec.name, write_weights([spec], progress=False)[0]["metrics"], flush=True)
