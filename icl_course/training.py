"""Training a model on a stream of fresh tasks: ``train(model, task, config) -> History``.

Each step draws a new batch from ``task`` (seeded by ``config.seed``), computes ``task.loss(model,
batch)`` and takes one Adam step. The loop is quiet: it returns a history and calls an optional
``callback(step, loss)`` after every step, which is where a progress bar plugs in
(:class:`icl_course.progress.ProgressBar`).

Any task with ``sample(batch_size, generator, device=...)`` and ``loss(model, batch)`` trains here,
so later chapters reuse this loop for other tasks and models.

**Divergence.** ``train`` raises :class:`TrainingDiverged` when the loss is NaN or infinite (saying
whether the batch or the learning rate is at fault), and when it blows up while still finite: the
median loss of the last :data:`DIVERGENCE_WINDOW` steps above :data:`DIVERGENCE_FACTOR` times the
loss of the untrained model at step 0. Training should bring the loss down from its start; a
sustained loss a hundred times above it is a run that has left the basin (the course's runs stay
below 1.6x their start after the first step, ``tests/test_training.py``). The median ignores a few
spiky steps, and a model whose first loss is 0 or negative is not checked this way.

**Checkpoints.** ``train(..., checkpoint=PATH, checkpoint_every=N)`` writes the model, the
optimizer, the data stream's generator, the task's counters (plain numbers in its ``__dict__``, such
as a curriculum's step) and the history to ``PATH`` every ``N`` steps and at the end, atomically;
the same call again resumes from it, and on one device gives bit for bit the run that was never
interrupted. A checkpoint written by another model, task or config is refused (``ValueError``).
Randomness must come from the generator ``train`` passes to ``task.sample`` (as everywhere in
the package). Under ``with checkpointing(folder):`` every ``train`` call checkpoints into
``folder/<Model>-<key>.pt``, the key a hash of the initial weights and settings of the model, the
task and the config; the folder is passed on in the environment, so worker processes started inside
the block use it too. Calls with a callback that may record what it sees (anything but ``None``,
a :class:`~icl_course.progress.ProgressBar`, or a callable with ``resumable = True``) train as
usual there, since a resumed run would not show it the steps before the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .runtime import get_device, require_finite
from .tasks import generator

__all__ = ["TrainConfig", "History", "TrainingDiverged", "train", "checkpointing"]

DIVERGENCE_WINDOW = 20  # steps whose median loss is compared with the loss at step 0
DIVERGENCE_FACTOR = 100.0  # ... and found diverged above this many times it
CHECKPOINT_ENV = "ICL_COURSE_CHECKPOINTS"  # set by checkpointing(): the folder every train call checkpoints into
CHECKPOINT_EVERY_ENV = "ICL_COURSE_CHECKPOINT_EVERY"  # ... every this many steps
_FORMAT = 1  # of the checkpoint files

_ADVICE = ("Try a smaller TrainConfig.lr (e.g. a third of it), a longer warmup, a tighter grad_clip or a "
           "smaller initialisation; for deep linear transformers, a token clamp (linear_transformer(..., clamp=10)).")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or rose far above its value at the start."""


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        require_finite("TrainConfig.lr", self.lr, above=0)
        if self.grad_clip is not None:
            require_finite("TrainConfig.grad_clip (or None)", self.grad_clip, above=0)
        require_finite("TrainConfig.warmup", self.warmup, at_least=0, below=1)
        require_finite("TrainConfig.weight_decay", self.weight_decay, at_least=0)
        require_finite("TrainConfig.min_lr_frac", self.min_lr_frac, at_least=0, at_most=1)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            require_finite(f"TrainConfig.betas[{i}]", beta, at_least=0, below=1)
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
    seconds: float = 0.0  # wall-clock time of the whole run (with the parts before a resume)


def train(model: torch.nn.Module, task, config: TrainConfig, callback=None, device=None,
          checkpoint: str | Path | None = None, checkpoint_every: int = 100) -> History:
    """Train ``model`` in place on fresh batches of ``task``; return the loss history.

    Raises :class:`TrainingDiverged` with advice if the loss stops being finite or blows up (see
    the module's docstring). With ``checkpoint``, saves the run there every ``checkpoint_every``
    steps and at the end, and resumes from it if it exists; ``callback`` then sees only the steps
    this call runs. Under :func:`checkpointing`, ``checkpoint`` defaults to a file in its folder.
    """
    device = device or get_device()
    model.to(device)
    gen = generator(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    history, window, recent, first, start_step, seconds = History(), [], deque(maxlen=DIVERGENCE_WINDOW), None, 0, 0.0
    if checkpoint is None and os.environ.get(CHECKPOINT_ENV) and _resumable(callback):  # under checkpointing()
        fingerprint = _fingerprint(model, task, config)
        key = hashlib.sha256(fingerprint.encode()).hexdigest()[:20]
        checkpoint = Path(os.environ[CHECKPOINT_ENV]) / f"{type(model).__name__}-{key}.pt"
        checkpoint_every = int(os.environ.get(CHECKPOINT_EVERY_ENV, checkpoint_every))
    elif checkpoint is not None:
        fingerprint = _fingerprint(model, task, config)
    if checkpoint is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        checkpoint = Path(checkpoint)
        if checkpoint.exists():
            state = _load(checkpoint, fingerprint)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            for name, value in state["task"].items():
                if getattr(task, name, None) != value:
                    object.__setattr__(task, name, value)  # a counter (also on a frozen dataclass)
            history = History(list(state["history"]["steps"]), list(state["history"]["losses"]))
            window, first, start_step, seconds = list(state["window"]), state["first"], state["step"], state["seconds"]
            recent.extend(state["recent"])
            _skip_progress(callback, start_step)
    start = time.perf_counter()
    for step in range(start_step, config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        batch = task.sample(config.batch_size, gen, device=device)
        loss = task.loss(model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise _non_finite(value, step, task, batch, config)
        first = value if first is None else first
        recent.append(value)
        if len(recent) == DIVERGENCE_WINDOW and first > 0 and statistics.median(recent) > DIVERGENCE_FACTOR * first:
            raise TrainingDiverged(
                f"the training loss blew up: its median over steps {step - DIVERGENCE_WINDOW + 1}-{step} is "
                f"{statistics.median(recent):.3g}, over {DIVERGENCE_FACTOR:g}x its {first:.3g} at step 0 "
                f"(lr={config.lr_at(step):.2g}). {_ADVICE}"
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
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step == config.steps - 1):
            _save(checkpoint, {
                "format": _FORMAT, "fingerprint": fingerprint, "step": step + 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "generator": gen.get_state(), "task": _task_counters(task),
                "history": {"steps": history.steps, "losses": history.losses}, "window": window,
                "recent": list(recent), "first": first, "seconds": seconds + time.perf_counter() - start,
            })
        if callback is not None:
            callback(step, value)
    history.seconds = seconds + time.perf_counter() - start
    return history


@contextmanager
def checkpointing(folder: str | Path, every: int = 100):
    """Within the block, every :func:`train` call checkpoints into ``folder`` every ``every`` steps
    and resumes from a checkpoint left there by the same call (same initial model, task and config).

    The checkpoint of a finished run stays, so running the same code again under the same folder
    loads each finished model instead of training it. The folder is made at the first checkpoint.
    It reaches worker processes through the environment (``$ICL_COURSE_CHECKPOINTS``), which the
    block sets and then restores.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpointing: every must be an integer >= 1, got {every!r}")
    saved = {name: os.environ.get(name) for name in (CHECKPOINT_ENV, CHECKPOINT_EVERY_ENV)}
    os.environ[CHECKPOINT_ENV], os.environ[CHECKPOINT_EVERY_ENV] = os.path.abspath(folder), str(every)
    try:
        yield Path(os.environ[CHECKPOINT_ENV])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- helpers ---------------------------------------------------------------------------------------


def _non_finite(value: float, step: int, task, batch, config: TrainConfig) -> TrainingDiverged:
    """The error for a NaN or infinite loss: the data's fault if the batch holds such values, else the rate's."""
    where = _non_finite_part(batch, "batch")
    if where is not None:
        return TrainingDiverged(
            f"the training loss became {value} at step {step} because the data is not finite: {where} of the "
            f"batch drawn from {_short(repr(task))} holds NaN or infinite values. The learning rate is not at "
            "fault; check the task's settings (its distributions, noise and scales)."
        )
    return TrainingDiverged(f"the training loss became {value} at step {step} (lr={config.lr_at(step):.2g}). {_ADVICE}")


def _non_finite_part(batch, name: str) -> str | None:
    """The name of the first floating tensor of ``batch`` (tensors, dataclasses, lists, dicts) with a NaN or inf."""
    if torch.is_tensor(batch):
        return name if (batch.is_floating_point() or batch.is_complex()) and not bool(torch.isfinite(batch).all()) else None
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = ((f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch))
    elif isinstance(batch, dict):
        items = batch.items()
    elif isinstance(batch, (list, tuple)):
        items = ((f"[{i}]", value) for i, value in enumerate(batch))
    else:
        return None
    for key, value in items:
        found = _non_finite_part(value, f"{name}{key}" if str(key).startswith("[") else f"{name}.{key}")
        if found is not None:
            return found
    return None


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resumable(callback) -> bool:
    """Whether a resumed run may skip ``callback``'s earlier steps: it records nothing that matters."""
    from .progress import ProgressBar

    return callback is None or isinstance(callback, ProgressBar) or getattr(callback, "resumable", False) is True


def _skip_progress(callback, steps: int) -> None:
    """Advance a progress bar over the steps a checkpoint already holds."""
    from .progress import ProgressBar

    if isinstance(callback, ProgressBar) and steps:
        callback.bar.update(steps)
        if steps >= callback.total:
            callback.bar.close()


_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def _task_counters(task) -> dict:
    """The plain numbers of the task's ``__dict__`` (a curriculum's counter, its fixed settings)."""
    return {k: v for k, v in getattr(task, "__dict__", {}).items() if type(v) in (bool, int, float)}


def _fingerprint(model: torch.nn.Module, task, config: TrainConfig) -> str:
    """What a checkpoint must match (JSON): the model's initial weights and settings, the task, the config."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {name or "model": [type(m).__qualname__, {k: v for k, v in sorted(vars(m).items())
                                                         if not k.startswith("_") and _plain(v)}]
                for name, m in model.named_modules()}
    return json.dumps({
        "model": f"{type(model).__qualname__} with initial weights sha256 {digest.hexdigest()[:16]}",
        "model settings": settings,
        "task": f"{type(task).__qualname__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', repr(task))}",
        "config": dataclasses.asdict(config),
    }, sort_keys=True, default=repr)


def _load(path: Path, fingerprint: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {_short(str(err))}); "
                         "delete it to train from the start") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"checkpoint {path} is not a training checkpoint of this version; delete it to train from the start")
    if state["fingerprint"] != fingerprint:
        ours, theirs = json.loads(fingerprint), json.loads(state["fingerprint"])
        differ = [k for k in ours if ours[k] != theirs.get(k)]
        if "config" in differ:
            differ[differ.index("config")] = "config (" + ", ".join(
                f"{k}: {theirs['config'].get(k)!r} there, {v!r} here" for k, v in ours["config"].items()
                if theirs["config"].get(k) != v) + ")"
        raise ValueError(f"checkpoint {path} was written by another run, which differs in its {'; '.join(differ)}: "
                         "it is not resumed. Delete it, or pass another checkpoint path, to train this run.")
    return state


def _save(path: Path, state: dict) -> None:
    """``torch.save`` into a temporary file beside ``path``, then rename it over ``path``: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
