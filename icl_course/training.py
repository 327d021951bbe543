"""Training a model on a stream of fresh tasks: ``train(model, task, config) -> History``.

Each step draws a new batch from ``task`` (seeded by ``config.seed``), computes ``task.loss(model,
batch)`` and takes one Adam step. The loop is quiet: it returns a history and calls an optional
``callback(step, loss)`` after every step, which is where a progress bar plugs in
(:class:`icl_course.progress.ProgressBar`).

Any task with ``sample(batch_size, generator, device=...)`` and ``loss(model, batch)`` trains here,
so later chapters reuse this loop for other tasks and models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .runtime import get_device
from .tasks import generator

__all__ = ["TrainConfig", "History", "TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    steps: int = 5000  # optimizer steps, each on a freshly drawn batch
    batch_size: int = 2048  # sequences per step
    lr: float = 1e-3  # peak learning rate of Adam
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates
    weight_decay: float = 0.0  # decoupled weight decay (AdamW); 0 is plain Adam
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; None turns it off
    warmup: float = 0.0  # fraction of the steps over which the rate rises linearly from 0
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (down to min_lr_frac * lr)
    min_lr_frac: float = 0.01  # where the cosine schedule ends, relative to lr
    seed: int = 0  # seed of the data stream (the model's init has its own seed)
    log_every: int = 10  # record the mean loss of every this many steps in the history

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"TrainConfig.warmup must be in [0, 1), got {self.warmup}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate used at ``step`` (0-based)."""
        n_warm = int(self.warmup * self.steps)
        if step < n_warm:
            return self.lr * (step + 1) / n_warm
        if self.schedule == "constant":
            return self.lr
        progress = (step - n_warm) / max(1, self.steps - n_warm)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class History:
    steps: list[int] = field(default_factory=list)  # the last step of each logged window
    losses: list[float] = field(default_factory=list)  # mean training loss over that window
    seconds: float = 0.0  # wall-clock time of the whole run


def train(model: torch.nn.Module, task, config: TrainConfig, callback=None, device=None) -> History:
    """Train ``model`` in place on fresh batches of ``task``; return the loss history.

    Raises :class:`TrainingDiverged` with advice if the loss stops being finite.
    """
    device = device or get_device()
    model.to(device)
    gen = generator(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    history, window = History(), []
    start = time.perf_counter()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        batch = task.sample(config.batch_size, gen, device=device)
        loss = task.loss(model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the training loss became {value} at step {step} (lr={config.lr_at(step):.2g}). "
                "Try a smaller TrainConfig.lr (e.g. a third of it), a tighter grad_clip or a smaller "
                "initialisation; for deep linear transformers, a token clamp (linear_transformer(..., clamp=10))."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        window.append(value)
        if len(window) == config.log_every or step == config.steps - 1:
            history.steps.append(step)
            history.losses.append(sum(window) / len(window))
            window = []
        if callback is not None:
            callback(step, value)
    history.seconds = time.perf_counter() - start
    return history
