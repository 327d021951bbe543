"""Training a model on a stream of fresh tasks: ``train(model, task, config) -> History``.

Each step draws a new batch from ``task`` on the training device (with ``generator(config.seed,
device)``, so a GPU draws its own data and nothing is copied), computes ``task.loss(model,
batch)`` and takes one optimizer step: AdamW with the config's rates and schedule, or any
``torch.optim.Optimizer`` passed as ``optimizer=`` (chapter 7's update rules, as
``RuleOptimizer``). A :class:`FullBatch` hands out one fixed training set instead of fresh batches.
This is the package's one training loop. It is quiet: it returns a history, measures the model with
``track=[(measure, every)]`` (kept in ``history.tracked``), calls an optional ``callback(step,
loss)`` after every step, and shows a bar only when asked (``progress=True`` or a description).

Any :class:`~icl_course.tasks.Task` (``sample(batch_size, gen, device=...)``, ``loss(model,
batch)``) trains here, so every chapter reuses this loop for its tasks and models.

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
the same call again resumes from it (the tracked measures too), and on one device gives bit for bit
the run that was never interrupted. A checkpoint written by another model, task or config is refused (``ValueError``).
Randomness must come from the generator ``train`` passes to ``task.sample``, drawn on its device
``gen.device`` (as everywhere in the package). Under ``with checkpointing(folder):`` every ``train`` call checkpoints into
``folder/<Model>-<key>.pt``, the key a hash of the initial weights and settings of the model, the
task and the config; the folder is passed on in the environment, so worker processes started inside
the block use it too. Calls with a callback that may record what it sees (anything but ``None``,
a :class:`~icl_course.progress.ProgressBar`, or a callable with ``resumable = True``) train as
usual there, since a resumed run would not show it the steps before the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
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

from .runtime import generator, get_device, require_finite

__all__ = ["TrainConfig", "History", "TrainingDiverged", "FullBatch", "train", "checkpointing"]

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
    tracked: list[dict[str, list]] = field(default_factory=list)  # per measure of train's track: step and its values


def train(model: torch.nn.Module, task, config: TrainConfig, callback=None, device=None,
          checkpoint: str | Path | None = None, checkpoint_every: int = 100, *, optimizer=None,
          progress: bool | str = False, track=()) -> History:
    """Train ``model`` in place on batches of ``task``; return the loss history.

    ``task`` is a :class:`~icl_course.tasks.Task` (fresh batches every step) or a
    :class:`FullBatch` (the same training set every step). ``optimizer`` is any
    ``torch.optim.Optimizer`` over the model's parameters, used as it is (its own rates; the
    config's ``lr``, ``betas``, ``weight_decay`` and schedule must stay at their defaults); None
    means AdamW with the config's rates and schedule. ``progress=True`` (or a description) shows a
    bar. ``track`` is a list of pairs ``(measure, every)``: ``measure(model) -> dict`` is called
    without gradients before the first step and after every ``every``-th step and the last, and
    ``history.tracked[i]`` holds the ``i``-th measure's values by key, with the steps taken under
    ``"step"``. A checkpoint keeps them, so a resumed run has them all.

    Raises :class:`TrainingDiverged` with advice if the loss stops being finite or blows up (see
    the module's docstring). With ``checkpoint``, saves the run there every ``checkpoint_every``
    steps and at the end, and resumes from it if it exists; ``callback`` then sees only the steps
    this call runs. Under :func:`checkpointing`, ``checkpoint`` defaults to a file in its folder.
    """
    track = _checked_track(track)
    device = device or get_device()
    model.to(device)
    scheduled = optimizer is None
    if scheduled:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    else:
        _require_default_rates(config)
    run = _Run(model, task, config, optimizer, generator(config.seed, device), track, scheduled)
    checkpoint, checkpoint_every = _checkpoint_file(run, checkpoint, checkpoint_every, callback)
    bar = _progress_bar(progress, config.steps)
    hooks = [h for h in (bar, callback) if h is not None]
    if checkpoint is not None and checkpoint.exists():
        run.resume(_load(checkpoint, run.fingerprint))
        for hook in hooks:
            _skip_progress(hook, run.step)
    else:
        run.record(0)
    start = time.perf_counter()
    for step in range(run.step, config.steps):
        if scheduled:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
        value = run.step_once(step, device)
        run.record(step + 1)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step == config.steps - 1):
            _save(checkpoint, run.state(seconds=run.seconds + time.perf_counter() - start))
        for hook in hooks:
            hook(step, value)
    run.history.seconds = run.seconds + time.perf_counter() - start
    return run.history


@dataclass(frozen=True)
class FullBatch:
    """The same ``size`` samples of ``task`` at every step, drawn once from ``generator(seed)``:
    full-batch training on a fixed training set (``TrainConfig.batch_size`` must be ``size``).

    >>> from icl_course.tasks import RegressionTask
    >>> full = FullBatch(RegressionTask(d=2, n_ctx=3), size=5, seed=1)
    >>> bool((full.sample(5, generator(0)).xs == full.sample(5, generator(9)).xs).all())
    True
    """

    task: object  # a Task: what the samples are and what the loss is
    size: int  # the number of training samples
    seed: int = 0  # the seed they are drawn with

    def sample(self, batch_size: int, gen: torch.Generator | None = None, device=None):
        """The training set on ``device`` (``gen`` is not used: the set is fixed)."""
        if batch_size != self.size:
            raise ValueError(f"batch_size must be the full batch's size {self.size}, got {batch_size!r}")
        return self._batch.to(device=device)

    def loss(self, model, batch) -> torch.Tensor:
        return self.task.loss(model, batch)

    @functools.cached_property
    def _batch(self):
        return self.task.sample(self.size, generator(self.seed))


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


class _Run:
    """One training run's moving parts: the step, the loss history, the divergence check, tracking, checkpoints."""

    def __init__(self, model, task, config: TrainConfig, optimizer, gen, track: list, scheduled: bool):
        self.model, self.task, self.config, self.optimizer, self.gen = model, task, config, optimizer, gen
        self.track, self.scheduled = track, scheduled
        self.history, self.window, self.recent = History(tracked=[{} for _ in track]), [], deque(maxlen=DIVERGENCE_WINDOW)
        self.first, self.step, self.seconds = None, 0, 0.0

    @functools.cached_property
    def fingerprint(self) -> str:  # of the initial model: _checkpoint_file asks for it before the first step
        extra = {} if self.scheduled else {"optimizer": repr(self.optimizer)}
        if self.track:
            extra["track"] = ", ".join(f"{getattr(f, '__qualname__', repr(f))} every {every}" for f, every in self.track)
        return _fingerprint(self.model, self.task, self.config, extra)

    def step_once(self, step: int, device) -> float:
        """Draw a batch, check its loss, take one optimizer step and log it; return the loss before the step."""
        config = self.config
        sample_at = getattr(self.task, "sample_at", None)  # a task whose data depend on the step (a curriculum)
        batch = (sample_at(step, config.batch_size, self.gen, device=device) if sample_at is not None
                 else self.task.sample(config.batch_size, self.gen, device=device))
        loss = self.task.loss(self.model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise _non_finite(value, step, self.task, batch, self._rate())
        self.first = value if self.first is None else self.first
        self.recent.append(value)
        recent = self.recent
        if len(recent) == DIVERGENCE_WINDOW and self.first > 0 and statistics.median(recent) > DIVERGENCE_FACTOR * self.first:
            raise TrainingDiverged(
                f"the training loss blew up: its median over steps {step - DIVERGENCE_WINDOW + 1}-{step} is "
                f"{statistics.median(recent):.3g}, over {DIVERGENCE_FACTOR:g}x its {self.first:.3g} at step 0 ({self._rate()}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.window.append(value)
        if len(self.window) == config.log_every or step == config.steps - 1:
            self.history.steps.append(step)
            self.history.losses.append(sum(self.window) / len(self.window))
            self.window = []
        self.step = step + 1
        return value

    def record(self, steps_taken: int) -> None:
        """Call every measure of ``track`` that is due after ``steps_taken`` steps, and keep what it returns."""
        for (measure, every), tracked in zip(self.track, self.history.tracked):
            if steps_taken % every and steps_taken != self.config.steps:
                continue
            with torch.no_grad():
                values = measure(self.model)
            tracked.setdefault("step", []).append(steps_taken)
            for key, value in values.items():
                tracked.setdefault(key, []).append(value)

    def _rate(self) -> str:
        """The learning rate and what to try, for an error message."""
        group = self.optimizer.param_groups[0]
        if not self.scheduled:
            rate = f"lr={group['lr']:.2g}" if "lr" in group else repr(self.optimizer)
            return f"{rate}). Try a smaller learning rate for the optimizer"
        return f"lr={group['lr']:.2g}). {_ADVICE}"

    def state(self, seconds: float) -> dict:
        h = self.history
        return {
            "format": _FORMAT, "fingerprint": self.fingerprint, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "generator": self.gen.get_state(),
            "task": _task_counters(self.task), "history": {"steps": h.steps, "losses": h.losses, "tracked": h.tracked},
            "window": self.window, "recent": list(self.recent), "first": self.first, "seconds": seconds,
        }

    def resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        for name, value in state["task"].items():
            if getattr(self.task, name, None) != value:
                object.__setattr__(self.task, name, value)  # a counter (also on a frozen dataclass)
        h = state["history"]
        self.history = History(list(h["steps"]), list(h["losses"]), tracked=[{k: list(v) for k, v in t.items()} for t in h["tracked"]])
        self.window, self.first, self.step, self.seconds = list(state["window"]), state["first"], state["step"], state["seconds"]
        self.recent.extend(state["recent"])


def _checked_track(track) -> list:
    """``track`` as a list of ``(measure, every)`` pairs, or a ValueError naming it."""
    pairs = list(track)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[0]) and isinstance(pair[1], int)
                and not isinstance(pair[1], bool) and pair[1] >= 1):
            raise ValueError(f"track must be a list of (measure, every) pairs with every >= 1, got {pair!r} in it")
    return pairs


def _checkpoint_file(run: _Run, checkpoint, every: int, callback) -> tuple[Path | None, int]:
    """Where this run checkpoints (None: nowhere) and how often; under :func:`checkpointing`, a file in its folder."""
    if checkpoint is None and os.environ.get(CHECKPOINT_ENV) and _resumable(callback):
        key = hashlib.sha256(run.fingerprint.encode()).hexdigest()[:20]
        checkpoint = Path(os.environ[CHECKPOINT_ENV]) / f"{type(run.model).__name__}-{key}.pt"
        every = int(os.environ.get(CHECKPOINT_EVERY_ENV, every))
    if checkpoint is None:
        return None, every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {every!r}")
    run.fingerprint  # noqa: B018 (of the initial weights: taken now, before the first step)
    return Path(checkpoint), every


_DEFAULT_RATES = ("lr", "betas", "weight_decay", "warmup", "schedule", "min_lr_frac")  # TrainConfig's AdamW settings


def _require_default_rates(config: TrainConfig) -> None:
    """With an optimizer of the caller's own, the config's AdamW settings would do nothing: refuse them."""
    defaults = TrainConfig()
    for name in _DEFAULT_RATES:
        if getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"TrainConfig.{name} is {getattr(config, name)!r}, but it sets train's default AdamW "
                             f"and an optimizer was passed: set the rate on that optimizer instead")


def _progress_bar(progress: bool | str, steps: int):
    """A bar over ``steps`` steps if ``progress`` asks for one (a string is its description)."""
    if not isinstance(progress, (bool, str)):
        raise ValueError(f"progress must be True, False or a description, got {progress!r}")
    if not progress:
        return None
    from .progress import ProgressBar

    return ProgressBar(steps, desc=progress if isinstance(progress, str) else "training")


def _non_finite(value: float, step: int, task, batch, rate: str) -> TrainingDiverged:
    """The error for a NaN or infinite loss: the data's fault if the batch holds such values, else the rate's."""
    where = _non_finite_part(batch, "batch")
    if where is not None:
        return TrainingDiverged(
            f"the training loss became {value} at step {step} because the data is not finite: {where} of the "
            f"batch drawn from {_short(repr(task))} holds NaN or infinite values. The learning rate is not at "
            "fault; check the task's settings (its distributions, noise and scales)."
        )
    return TrainingDiverged(f"the training loss became {value} at step {step} ({rate}")


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
        callback.skip(steps)


_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def _task_counters(task) -> dict:
    """The plain numbers of the task's ``__dict__`` (a curriculum's counter, its fixed settings)."""
    return {k: v for k, v in getattr(task, "__dict__", {}).items() if type(v) in (bool, int, float)}


def _fingerprint(model: torch.nn.Module, task, config: TrainConfig, extra: dict) -> str:
    """What a checkpoint must match (JSON): the model's initial weights and settings, the task, the config
    and ``extra`` (the optimizer and the tracking, where not the default)."""
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
        **{key: re.sub(r' at 0x[0-9a-fA-F]+', '', value) for key, value in extra.items()},
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
