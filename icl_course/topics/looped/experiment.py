"""Chapter 6's experiment: looped transformers generalize to longer inputs by looping longer.

Fan et al. 2024 (arXiv 2409.15647) train one decoder block, looped ``T(n)`` times for an input of
length ``n``, to emit the whole answer of parity, copy or addition, and find that it keeps working
on inputs longer than any seen in training if it is simply looped longer, where next-token
transformers of fixed depth fail. Their code is not public; the sizes here are ours
(``LoopedConfig``).

``run(profile)`` trains, on the same data stream,

- ``looped``: the paper's training, supervision after exactly ``T(n)`` loops;
- ``looped-fp``: the same model trained from scratch with supervision after ``T(n) + k`` loops,
  ``k ~ U{0..K}``, and a flat answer before loop ``T(n) - 1`` (our change: the answer becomes a fixed
  point of the loop, which stopping without the oracle needs);
- ``fixed-loop``: the looped block with one fixed loop count at every length;
- ``next-token``: four distinct blocks of half the width (the same parameter count), next-token trained;
- ``pause-tokens``: the same four blocks with blank pause tokens before the answer, as many as give
  them the looped model's compute at the longest training length (the paper's NTP-Pause);

and measures exact-answer accuracy at every test length, with the oracle ``T(n)`` and with three
stopping rules: maximum confidence (the paper's), "the answer stopped changing", and a *clock*, a
second looped model that only learns to count loops against the input length
(:class:`~icl_course.topics.looped.models.HaltingObjective`; five runs shipped as ``looped/parity-clock-seed*``). Where the
``quick`` budget is too small, the chapter also evaluates the shipped ``looped/*`` weights, trained
with the settings of :data:`SHIPPED` by ``icl-course reproduce looped --write-weights``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from icl_course import plots
from icl_course.pretrained import WEIGHTS_DIR, one_run, provenance
from icl_course.metrics import standard_error
from icl_course.progress import ProgressBar
from icl_course.results import Lookup
from icl_course.runtime import get_device, get_profile
from icl_course.tasks import generator
from icl_course.training import TrainConfig, train

from .models import (
    Clock,
    FullAnswerObjective,
    HaltingObjective,
    LoopedTransformer,
    NextTokenObjective,
    NextTokenTransformer,
    PauseTransformer,
    accuracy,
    equal_compute_pauses,
    answer_confidence,
    clock_stop,
    load,
    max_confidence_stop,
    max_confidence_stop_batch,
    save,
    stable_stop,
)
from .tasks import make_task

__all__ = [
    "LoopedConfig", "LoopedResult", "Family", "FAMILIES", "CONFIGS", "SHIPPED", "METHODS", "run", "train_models", "evaluate_looped", "accuracy_by_loop",
    "accuracy_figure", "clock_figure", "confidence_figure", "paper_lengths_figure", "loops_figure", "runs_figure", "ship", "write_weights",
    "shipped_name", "shipped_runs", "runs_table", "validation_score", "validation_length",
    "PAPER_LENGTHS", "PAPER_LENGTHS_NAME", "PAPER_LENGTHS_REPORTED", "paper_lengths_table", "write_paper_lengths",
    "TRIALS", "fits", "write_trial", "trial_record",
]

# Every method of the accuracy table, in the order of the figures.
METHODS = (
    "looped-oracle", "looped-adaptive", "looped-batch", "looped-stable",
    "looped-fp-oracle", "looped-fp-adaptive", "looped-fp-batch", "looped-fp-stable",
    "fixed-loop", "next-token", "pause-tokens",
)


@dataclass(frozen=True)
class LoopedConfig:
    tasks: tuple[str, ...] = ("parity",)  # which tasks to train and test (parity, copy, addition)
    train_lengths: dict = field(default_factory=lambda: {"parity": (1, 12), "copy": (1, 10), "addition": (1, 8)})
    test_factor: float = 2  # test lengths run from 1 to round(test_factor x the longest training length)
    width: int = 64  # the looped block's width ...
    n_heads: int = 4  # ... and heads
    baseline_width: int = 32  # next-token: n_layers blocks of this width (4 x 32^2 = 64^2 parameters)
    baseline_layers: int = 4
    steps: int = 600  # optimizer steps of each looped model
    baseline_steps: int = 600  # ... of the fixed-loop baseline
    next_token_steps: int = 1500  # ... of the next-token baseline (one pass per step: cheap)
    pause_steps: int = 800  # ... of the pause-token baseline (its long sequences cost about what a looped step does)
    batch_size: int = 64  # sequences per step, split into `groups` single-length groups
    groups: int = 4
    lr: float = 1e-3  # AdamW, 5% warm-up, then `schedule`
    schedule: str = "constant"  # or "cosine"
    weight_decay: float = 0.01
    extra_loops: int = 6  # K of the fixed-point training: supervise after T(n) + k, k ~ U{0..K}
    curriculum: int = 0  # looped, looped-fp: the longest training length grows to its final value over this many steps
    fp_steps: int = 600  # optimizer steps of the looped-fp model (trained from scratch)
    clock_steps: int = 2000  # optimizer steps of the clock (HaltingObjective; only shipped, see SHIPPED)
    unsure_weight: float = 1.0  # looped-fp also learns a flat answer before loop T(n) - 1 (0: off)
    extra_cap: int = 8  # stopping rules may run up to T(longest test length) + extra_cap loops
    patience: int = 2  # the stable rule stops when the answer is unchanged for this many loops ...
    min_confidence: float = math.log(0.9)  # ... with a confidence (mean log-prob) at least this
    train_fp: bool = True  # train looped-fp here (else only the shipped weights show it)
    train_pause: bool = True  # train the pause-token baseline here (else only the shipped weights show it)
    seeds: tuple[int, ...] = (0,)  # model seeds of the paper's looped model (figures use the first)
    workers: int = 1  # on a CPU, train this many models at once, one process (and thread) each
    n_eval: int = 256  # test sequences per length
    length_step: int = 1  # test every length_step-th length
    pretrained: bool = True  # also evaluate the shipped looped/* weights
    seed: int = 0  # data streams: seed + 1 (training), seed + 2 (test)

    def __post_init__(self):
        if isinstance(self.test_factor, bool) or not isinstance(self.test_factor, (int, float)) or not self.test_factor >= 1:
            raise ValueError(f"LoopedConfig.test_factor must be a number >= 1, got {self.test_factor!r}")
        for name in ("width", "n_heads", "baseline_width", "baseline_layers", "steps",
                     "baseline_steps", "next_token_steps", "pause_steps", "fp_steps", "clock_steps", "batch_size", "groups", "workers", "n_eval",
                     "length_step", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopedConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("extra_loops", "extra_cap", "curriculum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"LoopedConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.tasks or not self.seeds:
            raise ValueError("LoopedConfig.tasks and LoopedConfig.seeds must be non-empty")
        for name in self.tasks:
            if name not in self.train_lengths:
                raise ValueError(f"LoopedConfig.train_lengths has no entry for task {name!r}")
            self.task(name)  # validates the name and the lengths

    def task(self, name: str):
        lo, hi = tuple(self.train_lengths[name])
        return make_task(name, (lo, hi), (1, round(self.test_factor * hi)), groups=self.groups)

    def train_config(self, steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr, warmup=0.05, schedule=self.schedule,
                           weight_decay=self.weight_decay, seed=self.seed + 1, log_every=20)


CONFIGS = {
    # seconds: the pipeline and the shapes, not the claims (the shipped weights show them)
    "smoke": LoopedConfig(train_lengths={"parity": (1, 4)}, steps=10, baseline_steps=10, next_token_steps=10, pause_steps=10,
                          fp_steps=10, groups=2, n_eval=32, extra_cap=2, length_step=2),
    # a few CPU-minutes: the paper's looped model (three seeds) and both baselines on parity; looped-fp shipped
    "quick": LoopedConfig(steps=1200, curriculum=300, baseline_steps=400, next_token_steps=800, seeds=(0, 1, 2),
                          train_fp=False, train_pause=False, workers=2),
    # a GPU: longer training, copy and addition too, and parity at the paper's lengths: trained on 1-20,
    # tested to 45 (2.25x; copy to 22, addition to 18: their training length + 10 or more)
    "full": LoopedConfig(tasks=("parity", "copy", "addition"), test_factor=2.25,
                         train_lengths={"parity": (1, 20), "copy": (1, 10), "addition": (1, 8)}, steps=4000, curriculum=1000, baseline_steps=3000,
                         next_token_steps=6000, pause_steps=3000, seeds=(0, 1, 2, 3, 4), train_fp=False, n_eval=1000),
}

# The settings of the shipped ``looped/parity-*`` weights, one family each (``write_weights``). Their
# provenance files say where each was trained and how it was chosen. A family of several seeds ships
# every run (``looped/parity-looped-seed3``); the one the chapter uses as "the" model is chosen on
# validation inputs (:func:`validation_score`), never on the test lengths it is reported at.
SHIPPED = {
    # the paper's training (its length curriculum, here over the first quarter), longer than in the quick profile
    "looped": LoopedConfig(steps=4000, curriculum=1000, seeds=(0, 1, 2, 3, 4), seed=1, n_eval=1000, workers=2),
    # the fixed-point training from scratch: supervision at T(n) + k, flat before T(n) - 1, curriculum on the length
    "looped-fp": LoopedConfig(fp_steps=5000, batch_size=128, schedule="cosine", curriculum=2500, seeds=(0,), n_eval=1000),
    # the baselines, each trained until it fits its own training lengths (or as long as we could)
    "next-token": LoopedConfig(next_token_steps=6000, schedule="cosine", n_eval=1000),
    "pause-tokens": LoopedConfig(pause_steps=1500, schedule="cosine", n_eval=1000),
    "fixed-loop": LoopedConfig(baseline_steps=3000, schedule="cosine", n_eval=1000),
    # the clock: a second looped block that learns to count loops against the input length
    "clock": LoopedConfig(clock_steps=2000, seeds=(0, 1, 2, 3, 4), seed=1, n_eval=1000, workers=2),
}

# Parity at the paper's training lengths (1-20), tested to 45: the shipped paper-style recipe (4,000
# steps, curriculum over the first 1,000), one model seed (``looped/parity-looped-1to20``,
# :func:`write_paper_lengths`; about 10 CPU-minutes).
PAPER_LENGTHS = replace(SHIPPED["looped"], train_lengths={"parity": (1, 20)}, test_factor=2.25, seeds=(0,), workers=1)
PAPER_LENGTHS_NAME = "looped/parity-looped-1to20"

# Runs of one family are chosen at this multiple of the longest training length (18 for parity
# trained on 1-12), on inputs drawn from ``generator(seed + VALIDATION_OFFSET + 1000 n)``; the test
# inputs of every reported number come from ``generator(seed + 2 + 1000 n)``.
VALIDATION_FACTOR = 1.5
VALIDATION_OFFSET = 5


def _stem(task: str, family: str) -> str:
    return f"looped/{task}-{family.removeprefix('looped-')}"


def shipped_runs(task: str, family: str, folder: Path | None = None) -> dict[int, str]:
    """The shipped runs of a family of several seeds, ``{seed: name}`` (empty for a one-run family)."""
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    stem = _stem(task, family)
    runs = {}
    for path in (base / stem).parent.glob(f"{Path(stem).name}-seed*.pt"):
        tail = path.stem.rsplit("-seed", 1)[1]
        if tail.isdigit():
            runs[int(tail)] = f"{stem}-seed{tail}"
    return dict(sorted(runs.items()))


def shipped_name(task: str, family: str = "looped-fp", folder: Path | None = None) -> str:
    """The shipped model of a family: ``looped/parity-fp`` (one run), or for a family of several
    runs the one chosen on validation (``looped/parity-looped-seed3``, see its ``selection``)."""
    runs = shipped_runs(task, family, folder)
    if not runs:
        return _stem(task, family)
    selection = provenance(next(iter(runs.values())), folder).get("selection", {})
    chosen = selection.get("chosen")
    if chosen not in runs:
        raise FileNotFoundError(f"the shipped runs of {_stem(task, family)} ({sorted(runs)}) do not name a chosen "
                                f"run among them (selection.chosen = {chosen!r}); regenerate them with "
                                f"python -m icl_course.topics.looped.experiment --write-weights --families {family}")
    return runs[chosen]


@dataclass
class LoopedResult:
    config: LoopedConfig
    models: dict  # (method family, task) -> trained model (CPU)
    histories: dict  # (method family, task) -> History
    traces: dict  # task -> {"confidence": (T, B) list, "correct": ..., "n": int} for the confidence figure
    metrics: dict

    def accuracy(self, method: str, n: int, task: str = "parity") -> float:
        """Exact-answer accuracy of ``method`` (a key of ``metrics["accuracy"]``) at input length ``n``:
        NaN at a test length this profile skips (``length_step``). An unknown method or task raises
        a ``KeyError`` naming those there are; a length outside the test lengths a ``ValueError``."""
        return self._at(self.metrics["accuracy"][method][task], n, task)

    def seed_accuracy(self, seed: int, n: int, task: str = "parity") -> float:
        """The paper's looped model trained with ``seed``, stopped by the oracle, at length ``n``."""
        return self._at(self.metrics["oracle_accuracy_by_seed"][task][seed], n, task)

    def run_accuracy(self, family: str, seed: int, n: int, task: str = "parity") -> float:
        """A shipped run of ``family`` (``looped``: accuracy at T(n) loops; ``clock``: the fraction
        it stops at exactly T(n)) with ``seed``, at length ``n`` of the test inputs."""
        return self._at(self.metrics["shipped_runs"][task][family]["test"][seed], n, task)

    def clock_stops(self, n: int, task: str = "parity") -> tuple[float, float]:
        """Where the shipped clock stops at length ``n``: the fraction at exactly T(n), and the mean loop."""
        clock = self.metrics["clock"][task]
        return self._at(clock["exact"], n, task), self._at(clock["loops"], n, task)

    def _at(self, per_length: dict, n: int, task: str) -> float:
        lo, hi = self.metrics["test_lengths"][task]
        if not isinstance(n, int) or not lo <= n <= hi:
            raise ValueError(f"n must be a test length of {task!r} ({lo}-{hi}), got {n!r}")
        return per_length.get(str(n), math.nan)

    def figures(self) -> dict:
        """Every figure of the chapter, by name (what ``icl-course reproduce`` saves)."""
        figs = {}
        for task in self.config.tasks:
            figs[f"accuracy_{task}"] = accuracy_figure(self.metrics, task)
            if task in self.metrics["clock"]:
                figs[f"clock_{task}"] = clock_figure(self.metrics, task)
            if self.metrics["shipped_runs"].get(task):
                figs[f"runs_{task}"] = runs_figure(self.metrics, task)
        if self.metrics["paper_lengths"].get("parity"):
            figs["paper_lengths_parity"] = paper_lengths_figure(self.metrics)
        for key, trace in self.traces.items():
            figs[f"confidence_{key}"] = confidence_figure(trace, title=key)
        if self.histories:
            figs["loss_curves"] = loss_figure(self.histories, self.config.tasks)
        return {k: v for k, v in figs.items() if v is not None}


# --- evaluation --------------------------------------------------------------------------------------


def evaluate_looped(model: LoopedTransformer, batch, max_loops: int, patience: int = 2,
                    min_confidence: float = math.log(0.9), clock: LoopedTransformer | None = None) -> dict:
    """Accuracy of one looped model on one batch: oracle T(n), max-confidence stopping per sequence
    (``adaptive``) and per batch of one length (``batch``), stable stopping, and, given a ``clock``,
    stopping where the clock says "done".

    Also returns the mean loop count each rule chose (``*_loops``) and, with a clock, the fraction
    of inputs it stopped at exactly T(n) (``clock_exact``).
    """
    L_ans = batch.answer.shape[1]
    n_loops = max(max_loops, batch.steps)
    with torch.no_grad():
        logits = model.trajectory(batch.prompt(), n_loops, last=L_ans)  # (T, B, L_ans, V)
        clock_logits = None if clock is None else clock.trajectory(batch.prompt(), n_loops, last=1)
    adaptive, t_adaptive = max_confidence_stop(logits)
    per_batch, t_batch = max_confidence_stop_batch(logits)
    stable, t_stable = stable_stop(logits, patience, min_confidence)
    result = {
        "oracle": accuracy(logits[batch.steps - 1].argmax(-1), batch.answer),
        "adaptive": accuracy(adaptive, batch.answer),
        "batch": accuracy(per_batch, batch.answer),
        "stable": accuracy(stable, batch.answer),
        "adaptive_loops": t_adaptive.float().mean().item(),
        "batch_loops": t_batch.float().mean().item(),
        "stable_loops": t_stable.float().mean().item(),
    }
    if clock_logits is not None:
        clocked, t_clock = clock_stop(logits, clock_logits)
        result.update(clock=accuracy(clocked, batch.answer), clock_loops=t_clock.float().mean().item(),
                      clock_exact=(t_clock == batch.steps).float().mean().item())
    return result


def confidence_trace(model: LoopedTransformer, batch, max_loops: int, n_show: int = 8) -> dict:
    """Per-loop confidence and correctness of a few sequences (the confidence figure's data)."""
    L_ans = batch.answer.shape[1]
    with torch.no_grad():
        logits = model.trajectory(batch.prompt()[:n_show], max_loops, last=L_ans)
    answers, conf = answer_confidence(logits)
    correct = (answers == batch.answer[:n_show].unsqueeze(0)).all(-1)  # (T, B)
    return {"n": batch.n, "steps": batch.steps, "confidence": conf.T.tolist(), "correct": correct.T.tolist()}


def accuracy_by_loop(model: LoopedTransformer, batch, max_loops: int) -> list[float]:
    """Exact-answer accuracy after each loop count 1..max_loops (one trajectory, no retraining)."""
    L_ans = batch.answer.shape[1]
    with torch.no_grad():
        logits = model.trajectory(batch.prompt(), max_loops, last=L_ans)
    return [accuracy(step.argmax(-1), batch.answer) for step in logits]


def loops_figure(curves: dict[str, list[float]], steps: int, n: int):
    """Accuracy against the number of loops at one input length, T(n) marked."""
    fig, (ax,) = plots.figure(width=6.4, height=4.0)
    for name, accs in curves.items():
        ax.plot(range(1, len(accs) + 1), accs, marker="o", ms=3, label=name)
    ax.axvline(steps, color="k", ls="--", lw=1, label=f"T(n) = {steps}")
    ax.set(xlabel="loops", ylabel="exact-answer accuracy", ylim=(-0.03, 1.03), title=f"input length n = {n}")
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)  # below the axes, off the data
    return fig


def loss_figure(histories: dict, tasks) -> object:
    """Training loss against step, one panel per task, one curve per model family (own step counts)."""
    fig, axes = plots.figure(ncols=len(tasks), width=4.5)
    for ax, task in zip(axes, tasks):
        for (family, t), history in histories.items():
            if t == task:
                ax.plot([s + 1 for s in history.steps], history.losses, label=family)
        ax.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log", title=task)
        ax.legend(fontsize=8)
    return fig


# One colour per model across the chapter's figures (the loops figure's curves come in this order
# too: this run's model, the shipped one, the fixed-point one), one line style per stopping rule;
# shipped models get square markers.
MODEL_COLOURS = {"looped": "C0", "shipped-looped": "C1", "looped-fp": "C2", "fixed-loop": "C3",
                 "next-token": "C4", "pause-tokens": "C5"}
RULE_STYLES = {"oracle": "-", "adaptive": ":", "batch": (0, (3, 1, 1, 1)), "stable": (0, (6, 2)),
               "clock": "-."}


def method_style(method: str) -> dict:
    """``Axes.plot`` keywords for a method of ``metrics["accuracy"]``: colour by model, line by rule."""
    shipped = method.startswith("shipped-")
    name = method.removeprefix("shipped-")
    rule = next((r for r in RULE_STYLES if name.endswith("-" + r)), None)
    model = name[: -len(rule) - 1] if rule else name
    colour = MODEL_COLOURS.get(("shipped-" if shipped else "") + model, MODEL_COLOURS.get(model, "0.5"))
    return {"color": colour, "ls": RULE_STYLES[rule] if rule else "--", "marker": "s" if shipped else "o"}


def accuracy_figure(metrics: dict, task: str, methods=None, length: int | None = None):
    """Accuracy against input length, one curve per method, training lengths shaded; the legend sits
    below the axes, off the data."""
    fig, (ax,) = plots.figure(width=6.4, height=4.6)
    lo, hi = metrics["train_lengths"][task]
    ax.axvspan(lo - 0.5, hi + 0.5, color="0.85", label="training lengths")
    for method, per_task in metrics["accuracy"].items():
        if task not in per_task or (methods is not None and method not in methods):
            continue
        lengths = sorted(int(n) for n in per_task[task])
        ax.plot(lengths, [per_task[task][str(n)] for n in lengths], ms=3, label=method,
                **method_style(method))
    if length is not None:
        ax.axvline(length, color="k", lw=0.8)
    ax.set(xlabel="input length n", ylabel="exact-answer accuracy", ylim=(-0.03, 1.03), title=task)
    fig.legend(fontsize=7, loc="outside lower center", ncols=3)
    return fig


def runs_figure(metrics: dict, task: str):
    """Every shipped run against input length: the paper-style solvers' accuracy at T(n) loops and
    the clocks' fraction stopped at exactly T(n), one line per seed, the run chosen on validation bold."""
    runs = metrics["shipped_runs"][task]
    fig, axes = plots.figure(ncols=len(runs), width=4.2, height=3.8)
    lo, hi = metrics["train_lengths"][task]
    labels = {"looped": "accuracy at T(n) loops", "clock": "fraction stopped at exactly T(n)"}
    for ax, (family, record) in zip(axes, runs.items()):
        ax.axvspan(lo - 0.5, hi + 0.5, color="0.85")
        ax.axvline(record["validation_length"], color="k", lw=0.8, ls=":")
        for seed in sorted(record["test"], key=int):
            per_length = record["test"][seed]
            lengths = sorted(int(n) for n in per_length)
            chosen = int(seed) == record["chosen"]
            ax.plot(lengths, [per_length[str(n)] for n in lengths], lw=2.2 if chosen else 1, alpha=1 if chosen else 0.6,
                    color=f"C{int(seed) % 10}", label=f"seed {seed}")
        ax.set(xlabel="input length n", ylabel=labels.get(family, "accuracy"), ylim=(-0.03, 1.03),
               title=f"{task}: shipped {family} runs")
    # one colour per seed in every panel, so one legend below both (the bold line: the chosen run)
    from matplotlib.lines import Line2D

    seeds = sorted({int(s) for record in runs.values() for s in record["test"]})
    handles = [Line2D([], [], color=f"C{s % 10}", lw=1.5) for s in seeds]
    fig.legend(handles, [f"seed {s}" for s in seeds], fontsize=8, loc="outside lower center",
               ncols=len(seeds))
    return fig


def paper_lengths_figure(metrics: dict):
    """The parity model trained on lengths 1-20: accuracy at T(n) loops against length, with
    standard errors, beside the paper's claim (near-perfect beyond length 40)."""
    table = metrics["paper_lengths"]["parity"]
    lengths = sorted(int(n) for n in table["accuracy"])
    lo, hi = table["train_lengths"]
    fig, (ax,) = plots.figure(width=6.4, height=3.4)
    ax.axvspan(lo - 0.5, hi + 0.5, color="0.85", label="training lengths")
    ax.axvline(40, color="k", ls=":", lw=1, label="length 40 (the paper: near-perfect beyond it)")
    ax.errorbar(lengths, [table["accuracy"][str(n)] for n in lengths], yerr=[table["standard_error"][str(n)] for n in lengths],
                marker="o", ms=4, capsize=3, label=f"looped, oracle T(n) = n ({table['n_eval']} inputs per length)")
    ax.set(xlabel="input length n", ylabel="exact-answer accuracy", ylim=(-0.03, 1.03), title="parity, trained on lengths 1-20")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def clock_figure(metrics: dict, task: str):
    """Where the clock stops against input length (mean loop, and the fraction at exactly T(n))."""
    clock = metrics["clock"][task]
    lengths = sorted(int(n) for n in clock["loops"])
    lo, hi = metrics["train_lengths"][task]
    fig, (left, right) = plots.figure(ncols=2, width=4.2, height=3.4)
    for ax in (left, right):
        ax.axvspan(lo - 0.5, hi + 0.5, color="0.85", label="training lengths")
    left.plot(lengths, lengths, "k--", lw=1, label="T(n) = n")
    left.plot(lengths, [clock["loops"][str(n)] for n in lengths], marker="o", ms=4, ls="none", label="clock (mean)")
    left.set(xlabel="input length n", ylabel="loop where the clock stops", title=task)
    right.plot(lengths, [clock["exact"][str(n)] for n in lengths], marker="o", ms=3, color="C1")
    right.set(xlabel="input length n", ylabel="fraction stopped at exactly T(n)", ylim=(-0.03, 1.03), title=task)
    left.legend(fontsize=8, loc="upper left")
    return fig


def confidence_figure(trace: dict, title: str = ""):
    """Confidence against loop step for a few sequences; filled markers where the answer is right."""
    fig, (ax,) = plots.figure(width=6.4, height=3.4)
    for i, (conf, ok) in enumerate(zip(trace["confidence"], trace["correct"])):
        loops = range(1, len(conf) + 1)
        ax.plot(loops, conf, color=f"C{i}", lw=0.8)
        ax.scatter([t for t, c in zip(loops, ok) if c], [v for v, c in zip(conf, ok) if c], color=f"C{i}", s=10)
        ax.scatter([t for t, c in zip(loops, ok) if not c], [v for v, c in zip(conf, ok) if not c],
                   facecolors="none", edgecolors=f"C{i}", s=10)
    ax.axvline(trace["steps"], color="k", ls="--", lw=1, label=f"T(n) = {trace['steps']}")
    ax.set(xlabel="loop", ylabel="confidence (mean log-prob of the argmax)",
           title=f"{title}, n = {trace['n']} (filled: answer right)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _accuracy_table(config: LoopedConfig, task: str, predictors: dict, device, clock=None) -> dict:
    """``{method: {length: accuracy}}`` for the predictors of one task, on the same test batches
    (with a ``clock``, the looped models are also stopped by it: ``<family>-clock``)."""
    spec = config.task(task)
    cap = spec.steps(spec.test_lengths[1]) + config.extra_cap
    table = {}
    for n in range(1, spec.test_lengths[1] + 1, config.length_step):
        batch = spec.sample_length(n, config.n_eval, generator(config.seed + 2 + 1000 * n), device=device)
        for family, model in predictors.items():
            if isinstance(model, NextTokenTransformer):
                table.setdefault(family, {})[str(n)] = accuracy(model.predict(batch), batch.answer)
            elif family.removeprefix("shipped-") == "fixed-loop":
                table.setdefault(family, {})[str(n)] = accuracy(model.predict(batch, spec.steps(spec.train_lengths[1])), batch.answer)
            else:
                result = evaluate_looped(model, batch, cap, config.patience, config.min_confidence, clock)
                for rule in ("oracle", "adaptive", "batch", "stable") + (("clock",) if clock is not None else ()):
                    table.setdefault(f"{family}-{rule}", {})[str(n)] = result[rule]
    return table


def _train(model, objective, config: LoopedConfig, steps: int, device, progress: bool, desc: str):
    train_config = config.train_config(steps)
    history = train(model, objective, train_config, device=device, progress=progress and desc)
    return model.eval(), history


@contextmanager
def _one_cpu_thread(device):
    """Train with one torch thread on a CPU: the same seed then gives the same model whatever the
    machine's core count (torch's reductions depend on the thread count). These small models gain
    little from a second thread."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Family:
    """One model family of the chapter: a fresh model, its training objective and its budget, each
    read from the config (``model(config, task, seed)``, ``objective(config, task)``, ``budget(config)``)."""

    model: Callable[[LoopedConfig, object, int], torch.nn.Module]  # (config, task, seed)
    objective: Callable[[LoopedConfig, object], object]
    budget: Callable[[LoopedConfig], int]  # optimizer steps


def _looped(config: LoopedConfig, spec, seed: int) -> LoopedTransformer:
    return LoopedTransformer(config.width, config.n_heads, seed=seed)


FAMILIES = {
    # the paper's training: supervision after exactly T(n) loops
    "looped": Family(_looped, lambda c, spec: FullAnswerObjective(spec, curriculum=c.curriculum), lambda c: c.steps),
    # ours: supervision after T(n) + k loops, k ~ U{0..K}, and a flat answer before loop T(n) - 1
    "looped-fp": Family(_looped, lambda c, spec: FullAnswerObjective(
        spec, extra_loops=c.extra_loops, unsure_weight=c.unsure_weight, curriculum=c.curriculum), lambda c: c.fp_steps),
    # the same block with one loop count, T(longest training length), at every length
    "fixed-loop": Family(_looped, lambda c, spec: FullAnswerObjective(spec, fixed_loops=spec.steps(spec.train_lengths[1])),
                         lambda c: c.baseline_steps),
    # distinct blocks of the baseline's width, next-token trained
    "next-token": Family(lambda c, spec, seed: NextTokenTransformer(c.baseline_width, c.n_heads, c.baseline_layers, seed=seed),
                         lambda c, spec: NextTokenObjective(spec), lambda c: c.next_token_steps),
    # the same stack with blank pause tokens before the answer, as many as give it the looped model's
    # compute at the longest training length (the paper's NTP-Pause)
    "pause-tokens": Family(lambda c, spec, seed: PauseTransformer(c.baseline_width, c.n_heads, c.baseline_layers,
                                                                  equal_compute_pauses(spec), seed=seed),
                           lambda c, spec: NextTokenObjective(spec), lambda c: c.pause_steps),
    # a looped block that learns when T(n) loops are done
    "clock": Family(lambda c, spec, seed: Clock(c.width, c.n_heads, seed=seed), lambda c, spec: HaltingObjective(spec),
                    lambda c: c.clock_steps),
}


def train_models(config: LoopedConfig, task: str, device, progress: bool = False, seed: int | None = None,
                 families=("looped", "looped-fp", "fixed-loop", "next-token")) -> tuple[dict, dict]:
    """Train the requested model families (:data:`FAMILIES`) on ``task``; return ``(models, histories)``."""
    spec = config.task(task)
    seed = config.seeds[0] if seed is None else seed
    models, histories = {}, {}
    with _one_cpu_thread(device):
        for name in families:
            family = FAMILIES[name]
            models[name], histories[name] = _train(family.model(config, spec, seed), family.objective(config, spec), config,
                                                   family.budget(config), device, progress, f"{task}: {name} (seed {seed})")
    return models, histories


def _train_jobs(config: LoopedConfig, task: str, device, progress: bool, jobs: list) -> dict:
    """Train every ``(seed, family)`` of ``jobs``: ``{(seed, family): (model, history)}``.

    On a CPU with ``config.workers > 1`` the models train at once, one process each (same results as
    one after the other: each trains with one thread); the bar then counts finished models.
    """
    workers = min(config.workers, len(jobs), os.cpu_count() or 1)
    if torch.device(device).type != "cpu" or workers < 2:
        done = {}
        for seed, family in jobs:
            models, histories = train_models(config, task, device, progress, seed, (family,))
            done[(seed, family)] = models[family], histories[family]
        return done
    bar = ProgressBar(len(jobs), desc=f"{task}: {len(jobs)} models in {workers} processes", every=1) if progress else None
    done = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_models, config, task, "cpu", False, seed, (family,)): (seed, family)
                   for seed, family in jobs}
        for i, future in enumerate(as_completed(futures)):
            seed, family = futures[future]
            models, histories = future.result()
            done[(seed, family)] = models[family], histories[family]
            if bar is not None:
                bar(i, histories[family].losses[-1])
    return done


# --- the experiment ----------------------------------------------------------------------------------


@dataclass
class Trained:
    """What one task's training gives: every family's model and history (the first seed's), and the
    paper's looped model of every seed."""

    models: dict  # family -> model
    histories: dict  # family -> History
    by_seed: dict  # seed -> the looped model trained with it


@dataclass
class Shipped:
    """The shipped models of one task: the predictors (``shipped-<family>``), the clock and their records."""

    predictors: dict = field(default_factory=dict)
    clock: LoopedTransformer | None = None
    records: dict = field(default_factory=dict)  # family -> provenance


def train_task(config: LoopedConfig, task: str, device, progress: bool = False) -> Trained:
    """Train the paper's looped model with every seed and the other families with the first."""
    families = (["looped", "fixed-loop", "next-token"] + (["looped-fp"] if config.train_fp else [])
                + (["pause-tokens"] if config.train_pause else []))
    first = config.seeds[0]
    jobs = [(seed, "looped") for seed in config.seeds] + [(first, f) for f in families[1:]]
    done = _train_jobs(config, task, device, progress, jobs)
    return Trained(models={f: done[(first, f)][0] for f in families}, histories={f: done[(first, f)][1] for f in families},
                   by_seed={seed: done[(seed, "looped")][0] for seed in config.seeds})


def load_shipped(config: LoopedConfig, task: str, device) -> Shipped:
    """The shipped ``looped/<task>-*`` models there are (none unless ``config.pretrained``)."""
    shipped = Shipped()
    for family in SHIPPED if config.pretrained else ():
        if _has_shipped(task, family):
            model = load(shipped_name(task, family)).to(device)
            if family == "clock":
                shipped.clock = model
            else:
                shipped.predictors[f"shipped-{family}"] = model
            shipped.records[family] = _provenance(task, family)
    return shipped


def confidence_traces(config: LoopedConfig, task: str, trained: Trained, shipped: Shipped, device) -> dict:
    """The confidence traces behind the stopping rules: 8 test inputs of the longest training length."""
    spec = config.task(task)
    n_long = spec.train_lengths[1]
    batch = spec.sample_length(n_long, 8, generator(config.seed + 3), device=device)
    cap = spec.steps(n_long) + config.extra_cap
    traces = {f"{task}-looped": confidence_trace(trained.models["looped"].to(device), batch, cap)}
    fp = trained.models.get("looped-fp", shipped.predictors.get("shipped-looped-fp"))
    if fp is not None:
        traces[f"{task}-looped-fp"] = confidence_trace(fp.to(device), batch, cap)
    return traces


def runs_table(config: LoopedConfig, task: str, device) -> dict:
    """Every shipped run of the families shipped as sets (``looped``, ``clock``), measured here:
    ``{family: {"chosen": seed, "validation_length": n, "validation": {seed: score},
    "test": {seed: {length: value}}}}``, the value a solver's accuracy at T(n) loops or the fraction
    a clock stops at exactly T(n), on the test inputs of every length."""
    spec = config.task(task)
    table = {}
    for family in ("looped", "clock"):
        runs = shipped_runs(task, family) if config.pretrained else {}
        if not runs:
            continue
        models = {seed: load(name).to(device) for seed, name in runs.items()}
        record = {"chosen": provenance(shipped_name(task, family))["selection"]["chosen"],
                  "validation_length": validation_length(config, task),
                  "validation": {str(seed): validation_score(config, task, family, model, device) for seed, model in models.items()},
                  "test": {str(seed): {} for seed in models}}
        for n in range(1, spec.test_lengths[1] + 1, config.length_step):
            batch = spec.sample_length(n, config.n_eval, generator(config.seed + 2 + 1000 * n), device=device)
            for seed, model in models.items():
                record["test"][str(seed)][str(n)] = _run_value(config, spec, family, model, batch)
        table[family] = record
    return table


def seed_spread(config: LoopedConfig, task: str, trained: Trained, first: dict, device) -> dict:
    """The paper's looped model with the oracle, by seed (``first``: the first seed's, measured already)."""
    spread = {str(config.seeds[0]): first}
    for seed in config.seeds[1:]:
        spread[str(seed)] = _accuracy_table(config, task, {"looped": trained.by_seed[seed].to(device)}, device)["looped-oracle"]
    return spread


# The lengths the parity model trained on 1-20 is reported at: the longest training length, its
# 1.5x and 2x, and 45, "beyond 40" where the paper reports near-perfect parity.
PAPER_LENGTHS_REPORTED = (10, 20, 25, 30, 35, 40, 45)


@torch.no_grad()
def paper_lengths_table(config: LoopedConfig, device, lengths=PAPER_LENGTHS_REPORTED) -> dict:
    """The shipped parity model trained on lengths 1-20 (:data:`PAPER_LENGTHS_NAME`), run ``T(n) = n``
    loops on ``config.n_eval`` test inputs of each length: ``{"train_lengths", "n_eval", "accuracy":
    {n: fraction right}, "standard_error": {n: ...}, "trained": {seed, steps, train_seconds, device}}``
    (empty without the shipped weights)."""
    if not config.pretrained or not _has(PAPER_LENGTHS_NAME):
        return {}
    model, spec, record = load(PAPER_LENGTHS_NAME).to(device), PAPER_LENGTHS.task("parity"), provenance(PAPER_LENGTHS_NAME)
    table = {"train_lengths": list(spec.train_lengths), "n_eval": config.n_eval, "accuracy": {}, "standard_error": {},
             "trained": {key: record[key] for key in ("seed", "steps", "train_seconds", "device")}}
    for n in lengths:
        batch = spec.sample_length(n, config.n_eval, generator(config.seed + 2 + 1000 * n), device=device)
        right = (model.predict(batch, spec.steps(n)) == batch.answer).all(dim=1).float()  # (B,)
        table["accuracy"][str(n)], table["standard_error"][str(n)] = right.mean().item(), standard_error(right)
    return table


def run(profile: str | None = None, progress: bool = False, config: LoopedConfig | None = None) -> LoopedResult:
    """Train every method on every task of the profile and measure accuracy against length."""
    profile = get_profile(profile)
    config = config or CONFIGS[profile]
    device = get_device()
    start = time.perf_counter()
    accuracy_, models, histories, traces, seeds_, shipped_, clocks, runs = {}, {}, {}, {}, {}, {}, {}, {}
    for task in config.tasks:
        trained, shipped = train_task(config, task, device, progress), load_shipped(config, task, device)
        if shipped.records:
            shipped_[task] = shipped.records
        table = _accuracy_table(config, task, {**trained.models, **shipped.predictors}, device, shipped.clock)
        for method, per_length in table.items():
            accuracy_.setdefault(method, {})[task] = per_length
        if shipped.clock is not None:  # where the shipped clock stops (on the same test inputs; the solver is irrelevant)
            stops = _clock_table(config, task, shipped.clock, trained.models["looped"].to(device), device)
            clocks[task] = {"exact": stops["clock-exact"], "loops": stops["clock-loops"]}
        traces.update(confidence_traces(config, task, trained, shipped, device))
        seeds_[task] = seed_spread(config, task, trained, table["looped-oracle"], device)
        runs[task] = runs_table(config, task, device)
        for family, model in trained.models.items():
            models[(family, task)], histories[(family, task)] = model.cpu(), trained.histories[family]
    metrics = {
        "accuracy": accuracy_,
        "train_lengths": {task: list(config.task(task).train_lengths) for task in config.tasks},
        "test_lengths": {task: list(config.task(task).test_lengths) for task in config.tasks},
        "oracle_accuracy_by_seed": seeds_,
        "shipped": shipped_,
        "shipped_runs": runs,
        "clock": clocks,
        "paper_lengths": {"parity": paper_lengths_table(config, device)} if "parity" in config.tasks else {},
        "parameters": {family: sum(p.numel() for p in m.parameters()) for (family, _), m in models.items()},
        "steps": {family: FAMILIES[family].budget(config) for family in ("looped", "looped-fp", "fixed-loop", "next-token", "pause-tokens")},
        "pauses": {task: equal_compute_pauses(config.task(task)) for task in config.tasks},
        "train_seconds": {f"{fam}/{task}": h.seconds for (fam, task), h in histories.items()},
        "total_seconds": time.perf_counter() - start,
        "profile": profile,
        "device": str(device),
    }
    return LoopedResult(config=config, models=models, histories=histories, traces=traces, metrics=Lookup.deep(metrics))


def _has(name: str, folder: Path | None = None) -> bool:
    return ((Path(folder) if folder is not None else WEIGHTS_DIR) / f"{name}.pt").exists()


def _has_shipped(task: str, family: str = "looped-fp", folder: Path | None = None) -> bool:
    return _has(shipped_name(task, family, folder), folder)


def _provenance(task: str, family: str = "looped-fp") -> dict:
    return provenance(shipped_name(task, family))


# --- the shipped weights -----------------------------------------------------------------------------


def _measure(task: str, family: str, model, config: LoopedConfig, folder: Path | None = None) -> dict:
    """The provenance of ``model`` (trained with ``config.seeds[0]``), measured on the test inputs of
    every length (a clock by how it stops the shipped paper-style model in ``folder`` or the package)."""
    device = get_device()
    notes = {}
    if family == "clock":
        solver_folder = folder if _has_shipped(task, "looped", folder) else None
        solver_name = shipped_name(task, "looped", solver_folder)
        table = _clock_table(replace(config, length_step=1), task, model.to(device), load(solver_name, solver_folder).to(device), device)
        notes = {"solver": {"name": solver_name, "sha256": provenance(solver_name, solver_folder)["sha256"]}}
    else:
        table = _accuracy_table(replace(config, length_step=1), task, {family: model.to(device)}, device)
    seed = config.seeds[0]
    return {
        "task": task,
        "method": family,
        "train_lengths": list(config.task(task).train_lengths),
        "config": {k: v for k, v in asdict(config).items() if k not in ("tasks", "seeds", "train_lengths", "workers")},
        "seed": seed,
        "steps": FAMILIES[family].budget(config),
        "device": str(device),
        "torch": torch.__version__ + (", trained with one CPU thread" if device.type == "cpu" else ""),
        "metrics": {"n_eval": config.n_eval, "accuracy": table},
        "regenerate": f"python -m icl_course.topics.looped.experiment --write-weights --tasks {task} --families {family}",
        **notes,
    }


def ship(task: str, family: str, model, config: LoopedConfig, seconds: float, folder: Path | None = None,
         notes: dict | None = None, name: str | None = None) -> dict:
    """Measure ``model`` on fresh test inputs of every length and save it with its provenance as
    ``name`` (default ``looped/<task>-<family>``; ``notes`` adds or overrides fields)."""
    record = {**_measure(task, family, model, config, folder), "train_seconds": seconds, **(notes or {})}
    save(name or _stem(task, family), model.cpu(), record, folder)
    return record


def _clock_table(config: LoopedConfig, task: str, clock, solver, device) -> dict:
    """How a clock stops ``solver``: ``looped-clock`` (accuracy), ``clock-exact`` (fraction stopped
    at exactly T(n)) and ``clock-loops`` (mean loop count), by length."""
    spec = config.task(task)
    cap = spec.steps(spec.test_lengths[1]) + config.extra_cap
    table = {"looped-clock": {}, "clock-exact": {}, "clock-loops": {}}
    for n in range(1, spec.test_lengths[1] + 1, config.length_step):
        batch = spec.sample_length(n, config.n_eval, generator(config.seed + 2 + 1000 * n), device=device)
        result = evaluate_looped(solver, batch, cap, config.patience, config.min_confidence, clock)
        for key, rule in (("looped-clock", "clock"), ("clock-exact", "clock_exact"), ("clock-loops", "clock_loops")):
            table[key][str(n)] = result[rule]
    return table


def validation_length(config: LoopedConfig, task: str) -> int:
    return round(VALIDATION_FACTOR * config.task(task).train_lengths[1])


def validation_score(config: LoopedConfig, task: str, family: str, model, device) -> float:
    """What runs of one family are chosen by: on ``config.n_eval`` validation inputs of
    :func:`validation_length`, the oracle accuracy of a looped model, the fraction a clock stops at
    exactly T(n), or a baseline's accuracy."""
    spec = config.task(task)
    n = validation_length(config, task)
    batch = spec.sample_length(n, config.n_eval, generator(config.seed + VALIDATION_OFFSET + 1000 * n), device=device)
    return _run_value(config, spec, family, model.to(device), batch)


@torch.no_grad()
def _run_value(config: LoopedConfig, spec, family: str, model, batch) -> float:
    """One run's number on one batch: a clock's fraction stopped at exactly T(n), a baseline's
    accuracy, or a looped model's accuracy at T(n) loops."""
    if family == "clock":
        clock_logits = model.trajectory(batch.prompt(), batch.steps + config.extra_cap, last=1)
        return (clock_stop(clock_logits, clock_logits)[1] == batch.steps).float().mean().item()
    if isinstance(model, NextTokenTransformer):
        return accuracy(model.predict(batch), batch.answer)
    loops = spec.steps(spec.train_lengths[1]) if family == "fixed-loop" else batch.steps
    return accuracy(model.predict(batch, loops), batch.answer)


def _selection(config: LoopedConfig, task: str, family: str, scores: dict, tests: dict) -> dict:
    """The ``selection`` record every run of a family carries (the same in each)."""
    n_val, hi = validation_length(config, task), config.task(task).test_lengths[1]
    chosen = max(scores, key=lambda seed: (scores[seed], -seed))  # ties go to the lower seed
    what = {"clock": "fraction stopped at exactly T(n)", "looped": "accuracy at T(n) loops"}.get(family, "accuracy")
    return {
        "rule": (f"the run with the highest {what} at length {n_val} ({VALIDATION_FACTOR}x the longest training length) "
                 f"on {config.n_eval} validation inputs drawn apart from the test inputs; ties go to the lower seed"
                 if len(scores) > 1 else "the only run with these settings: nothing was chosen"),
        "validation": {"length": n_val, "n": config.n_eval, "generator": f"{config.seed} + {VALIDATION_OFFSET} + 1000 n"},
        "test": {"lengths": [1, hi], "n": config.n_eval, "generator": f"{config.seed} + 2 + 1000 n"},
        "runs": {str(seed): {"validation": scores[seed], f"test_at_{hi}": tests[seed]} for seed in scores},
        "chosen": chosen,
    }


def _test_at_longest(record: dict, family: str) -> float:
    table = record["metrics"]["accuracy"]
    key = {"clock": "clock-exact", "looped": "looped-oracle", "looped-fp": "looped-fp-oracle"}.get(family, family)
    per_length = table[key]
    return per_length[max(per_length, key=int)]


def write_weights(tasks=("parity",), folder: Path | None = None, progress: bool = True,
                  families=("looped", "looped-fp", "next-token", "fixed-loop", "clock"), seeds=None) -> list[dict]:
    """Train each task's models of ``families`` with the settings of :data:`SHIPPED` (``seeds``
    replaces the shipped seeds) and save them with provenance under ``looped/``.

    A family of several seeds ships every run as ``looped/<task>-<family>-seed<k>``, each with the
    same ``selection`` record: every run's validation score and test accuracy at the longest test
    length, and the run chosen by validation. The files are written only after every run is trained
    and measured, and runs of other seeds are then removed, so an interrupted call leaves the
    previous set as it was. ``icl-course reproduce looped --write-weights`` calls this with the defaults.
    """
    records = []
    device = get_device()
    for task in tasks:
        for family in families:
            config = SHIPPED[family] if seeds is None else replace(SHIPPED[family], seeds=tuple(seeds))
            done = _train_jobs(config, task, device, progress, [(seed, family) for seed in config.seeds])
            several = len(config.seeds) > 1
            scores = {seed: validation_score(config, task, family, model, device) for (seed, _), (model, _) in done.items()}
            measured = {}
            for (seed, _), (model, history) in done.items():  # measured (and saved below) on the test inputs
                name = f"{_stem(task, family)}-seed{seed}" if several else _stem(task, family)
                measured[seed] = (name, model, history, _measure(task, family, model, replace(config, seeds=(seed,)), folder))
            selection = _selection(config, task, family, scores,
                                   {seed: _test_at_longest(m[3], family) for seed, m in measured.items()})
            for seed, (name, model, history, record) in sorted(measured.items()):
                record.update(train_seconds=history.seconds, selection=selection)
                save(name, model.cpu(), record, folder)
                records.append(record)
            keep = {m[0] for m in measured.values()}
            stale = [n for n in shipped_runs(task, family, folder).values() if n not in keep]
            if several and (_has(_stem(task, family), folder)):
                stale.append(_stem(task, family))
            for name in stale:  # runs of an earlier set that this one replaces
                for suffix in (".pt", ".json"):
                    ((Path(folder) if folder is not None else WEIGHTS_DIR) / f"{name}{suffix}").unlink(missing_ok=True)
    return records


def write_paper_lengths(folder: Path | None = None, progress: bool = True) -> dict:
    """Train the paper-style looped model on parity lengths 1-20 with :data:`PAPER_LENGTHS` (one
    seed: nothing is chosen) and ship it as :data:`PAPER_LENGTHS_NAME`, measured at every length to 45."""
    config, device = PAPER_LENGTHS, get_device()
    (model, history), = _train_jobs(config, "parity", device, progress, [(config.seeds[0], "looped")]).values()
    return ship("parity", "looped", model, config, history.seconds, folder, name=PAPER_LENGTHS_NAME,
                notes={"selection": one_run(config.seeds[0]),
                       "regenerate": "python -m icl_course.topics.looped.experiment --write-weights --paper-lengths"})


# One CPU trial each of the paper-style looped model on copy and addition (the ``full`` profile's
# other tasks): the shipped parity recipe trained longer, with a cosine schedule and the length
# curriculum over the first half. A trial that fits its training lengths ships its weights
# (``looped/<task>-looped-trial``); every trial records what it measured in ``looped/trial-<task>.json``.
TRIALS = {
    "copy": replace(SHIPPED["looped"], tasks=("copy",), steps=12000, curriculum=6000, schedule="cosine", seeds=(0,), workers=1,
                    n_eval=500),
    "addition": replace(SHIPPED["looped"], tasks=("addition",), steps=9000, curriculum=4500, schedule="cosine", seeds=(0,),
                        workers=1, n_eval=500),
}


def fits(record: dict, at_least: float = 0.95) -> bool:
    """Whether a recorded looped model is right on at least ``at_least`` of the inputs of every
    training length, run T(n) loops (the oracle)."""
    lo, hi = record["train_lengths"]
    oracle = record["metrics"]["accuracy"]["looped-oracle"]
    return all(oracle[str(n)] >= at_least for n in range(lo, hi + 1))


def write_trial(task: str, folder: Path | None = None, progress: bool = True) -> dict:
    """Train the looped model on ``task`` with :data:`TRIALS` and record the result in
    ``looped/trial-<task>.json``; the weights ship (``looped/<task>-looped-trial``) only if it fits."""
    config, device = TRIALS[task], get_device()
    (model, history), = _train_jobs(config, task, device, progress, [(config.seeds[0], "looped")]).values()
    record = {**_measure(task, "looped", model, config, folder), "train_seconds": history.seconds,
              "selection": one_run(config.seeds[0]),
              "regenerate": f"python -m icl_course.topics.looped.experiment --write-weights --trial {task}"}
    record["fits"] = fits(record)
    if record["fits"]:
        save(f"looped/{task}-looped-trial", model.cpu(), record, folder)
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    (base / "looped").mkdir(parents=True, exist_ok=True)
    (base / "looped" / f"trial-{task}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def trial_record(task: str, folder: Path | None = None) -> dict | None:
    """The recorded trial on ``task`` (:func:`write_trial`), or None if there is none."""
    path = (Path(folder) if folder is not None else WEIGHTS_DIR) / "looped" / f"trial-{task}.json"
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":  # python -m icl_course.topics.looped.experiment --write-weights [--families looped] [--seeds 0 1 2]
    import argparse

    parser = argparse.ArgumentParser(prog="python -m icl_course.topics.looped.experiment")
    parser.add_argument("--write-weights", action="store_true", required=True)
    parser.add_argument("--tasks", nargs="+", default=["parity"])
    parser.add_argument("--families", nargs="+", default=list(SHIPPED), choices=list(SHIPPED))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--paper-lengths", action="store_true", help="only the parity model trained on lengths 1-20")
    parser.add_argument("--trial", choices=list(TRIALS), help="only the CPU trial of the looped model on this task")
    args = parser.parse_args()
    if args.trial:
        rec = write_trial(args.trial, args.folder)
        print(rec["train_seconds"], rec["fits"], {n: round(a, 3) for n, a in rec["metrics"]["accuracy"]["looped-oracle"].items()})
        raise SystemExit
    if args.paper_lengths:
        rec = write_paper_lengths(args.folder)
        print(rec["train_seconds"], {n: round(a, 3) for n, a in rec["metrics"]["accuracy"]["looped-oracle"].items()})
        raise SystemExit
    for rec in write_weights(tuple(args.tasks), args.folder, families=tuple(args.families), seeds=args.seeds):
        print(rec["task"], rec["method"], {rule: {n: round(a, 3) for n, a in acc.items()} for rule, acc in rec["metrics"]["accuracy"].items()})
