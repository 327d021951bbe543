"""Associative recall: does a richer inner learner remember more key-value pairs?

A sequence lists ``n`` key-value pairs as tokens ``k_1 v_1 k_2 v_2 ... k_n v_n`` (keys drawn without
repetition from ``n_keys`` key tokens, values from ``n_values`` value tokens), then ``n_queries`` keys
of the context, each to be answered with its value (multi-query associative recall, as in the Zoology
benchmark of Arora et al. 2023). Every mixer of the chapter reads the same one-hot tokens into the same
small :class:`~icl_course.topics.ttt.models.SequenceModel` (one block, two heads of ``f`` features) and
is trained with the same budget. A mixer with a fixed-size state must keep all ``n`` pairs in it:
linear attention, the delta rule and TTT-Linear in an ``f x f`` matrix per head, TTT-MLP in a two-layer
MLP of hidden width ``4 f``; softmax attention keeps every token. Accuracy against ``n`` shows where
the state runs out.

``python -m icl_course.topics.ttt.recall`` trains the shipped models (:data:`COMMAND`).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from icl_course import pretrained
from icl_course.metrics import standard_error
from icl_course.plots import figure
from icl_course.tasks import generator
from icl_course.training import TrainConfig, TrainingDiverged, train

from .models import SequenceModel

__all__ = ["AssociativeRecallTask", "RecallBatch", "MIXERS", "MODEL", "TRAIN", "LRS", "SEEDS", "EVAL_PAIRS",
           "make_model", "accuracy_by_pairs", "train_model", "write_weights", "model_name", "shipped",
           "recall_figure", "COMMAND", "LONG", "long_name", "write_long", "RETRY_FACTOR"]


@dataclass(frozen=True)
class RecallBatch:
    tokens: Tensor  # (B, 2 n + n_queries) token ids: the pairs, then the queried keys
    answers: Tensor  # (B, n_queries) value ids (0 .. n_values - 1)

    def to(self, device) -> "RecallBatch":
        return RecallBatch(self.tokens.to(device), self.answers.to(device))


@dataclass(frozen=True)
class AssociativeRecallTask:
    """Multi-query associative recall with ``pairs`` key-value pairs per sequence (one count per batch,
    drawn uniformly from ``pairs`` at every training step).

    >>> task = AssociativeRecallTask(n_keys=8, n_values=4, pairs=(2, 3), n_queries=2)
    >>> batch = task.sample_pairs(5, 3, generator(0))
    >>> tuple(batch.tokens.shape), tuple(batch.answers.shape)
    ((5, 8), (5, 2))
    """

    n_keys: int = 64
    n_values: int = 16
    pairs: tuple[int, ...] = (4, 8, 16, 32)
    n_queries: int = 16

    def __post_init__(self):
        for name in ("n_keys", "n_values", "n_queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.pairs, tuple) or not self.pairs:
            raise ValueError(f"pairs must be a non-empty tuple of pair counts, got {self.pairs!r}")
        for n in self.pairs:
            self._check_pairs(n)

    def _check_pairs(self, n_pairs) -> None:
        if not isinstance(n_pairs, int) or isinstance(n_pairs, bool) or not 1 <= n_pairs <= self.n_keys:
            raise ValueError(f"pairs: each count must be an integer in 1..n_keys={self.n_keys} (keys do not repeat), "
                             f"got {n_pairs!r}")

    @property
    def vocab(self) -> int:
        """Token ids: keys ``0 .. n_keys - 1``, values ``n_keys .. n_keys + n_values - 1``."""
        return self.n_keys + self.n_values

    def sample_pairs(self, batch_size: int, n_pairs: int, gen: torch.Generator, device=None) -> RecallBatch:
        """``batch_size`` sequences of ``n_pairs`` pairs each (drawn with ``gen``, on its device)."""
        self._check_pairs(n_pairs)
        on = gen.device
        keys = torch.rand(batch_size, self.n_keys, generator=gen, device=on).argsort(-1)[:, :n_pairs]  # (B, n), distinct
        values = torch.randint(self.n_values, (batch_size, n_pairs), generator=gen, device=on)  # (B, n)
        asked = torch.randint(n_pairs, (batch_size, self.n_queries), generator=gen, device=on)  # (B, Q) which pair
        context = torch.stack([keys, values + self.n_keys], dim=2).reshape(batch_size, 2 * n_pairs)  # k1 v1 k2 v2 ...
        tokens = torch.cat([context, keys.gather(1, asked)], dim=1)  # (B, 2n + Q)
        return RecallBatch(tokens, values.gather(1, asked)).to(device)

    def sample(self, batch_size: int, gen: torch.Generator, device=None) -> RecallBatch:
        """A training batch: one pair count from ``pairs`` for the whole batch, then the sequences."""
        n_pairs = self.pairs[torch.randint(len(self.pairs), (1,), generator=gen, device=gen.device).item()]
        return self.sample_pairs(batch_size, n_pairs, gen, device)

    def logits(self, model, batch: RecallBatch) -> Tensor:
        """The model's value logits at the query positions: (B, n_queries, n_values)."""
        dtype = next(model.parameters()).dtype
        return model(F.one_hot(batch.tokens, self.vocab).to(dtype))[:, -self.n_queries:]

    def loss(self, model, batch: RecallBatch) -> Tensor:
        """Cross-entropy of the value at every query."""
        logits = self.logits(model, batch)
        return F.cross_entropy(logits.reshape(-1, self.n_values), batch.answers.reshape(-1))

    @torch.no_grad()
    def correct(self, model, batch: RecallBatch) -> Tensor:
        """The fraction of each sequence's queries answered right: (B,)."""
        return (self.logits(model, batch).argmax(-1) == batch.answers).float().mean(1)


TASK = AssociativeRecallTask()
MIXERS = ("linear-attention", "delta-rule", "ttt-linear", "ttt-mlp", "softmax")
MODEL = {"width": 32, "n_layers": 1, "n_heads": 2, "mini_batch": 16}  # f = 16 features per head, as chapter 5's quick
TRAIN = TrainConfig(steps=1200, batch_size=64, lr=1e-2, warmup=0.05, schedule="cosine", weight_decay=0.0, log_every=50)
LRS = (3e-3, 1e-2)  # outer learning rates tried per mixer, chosen on validation sequences at SEEDS[0]
RETRY_FACTOR = 0.5  # a run whose training diverges is trained once more from the same seed at this x its rate
SEEDS = (0, 1, 2)
EVAL_PAIRS = (4, 8, 16, 24, 32, 48)  # 24 lies between the training counts, 48 beyond them
N_EVAL = 1024  # sequences per pair count
VALIDATION_SEED, TEST_SEED = 7_000, 8_000  # generator(VALIDATION_SEED + n): validation, (TEST_SEED + n): test
COMMAND = "python -m icl_course.topics.ttt.recall"


def make_model(mixer: str, seed: int = 0, task: AssociativeRecallTask = TASK, **model) -> SequenceModel:
    """A :class:`SequenceModel` that reads one-hot tokens and returns value logits (``MODEL`` unless given)."""
    return SequenceModel(task.vocab, task.n_values, mixer, seed=seed, **{**MODEL, **model})


def accuracy_by_pairs(model, task: AssociativeRecallTask = TASK, pairs=EVAL_PAIRS, n: int = N_EVAL,
                      seed: int = TEST_SEED, device=None) -> dict[int, tuple[float, float]]:
    """``{n_pairs: (accuracy, its standard error over sequences)}`` on ``n`` sequences per count, drawn from
    ``generator(seed + n_pairs)``, on the model's device (or ``device``)."""
    device = device or next(model.parameters()).device
    out = {}
    for n_pairs in pairs:
        correct = task.correct(model, task.sample_pairs(n, n_pairs, generator(seed + n_pairs), device))
        out[n_pairs] = (correct.mean().item(), standard_error(correct))
    return out


def train_model(mixer: str, lr: float, seed: int, task: AssociativeRecallTask = TASK, config: TrainConfig = TRAIN,
                device=None, progress: bool | str = False, **model):
    """One model of ``mixer`` trained at ``lr``: init from ``seed``, data from ``generator(1000 seed + 1)``."""
    net = make_model(mixer, seed, task, **model)
    history = train(net, task, replace(config, lr=lr, seed=1000 * seed + 1), device=device, progress=progress)
    return net.eval(), history


def _train_or_retry(mixer: str, lr: float, seed: int, device, progress, config: TrainConfig = TRAIN) -> tuple:
    """``(model, history, retry)``: trained at ``lr``, or, if that diverges, once more at ``RETRY_FACTOR * lr``
    (``retry`` then says so; a second divergence raises)."""
    try:
        return (*train_model(mixer, lr, seed, config=config, device=device,
                             progress=progress and f"{mixer} seed {seed}"), None)
    except TrainingDiverged as err:
        retry = {"diverged_at_lr": lr, "error": str(err).split(". ")[0], "retried_at_lr": RETRY_FACTOR * lr}
        return (*train_model(mixer, RETRY_FACTOR * lr, seed, config=config, device=device, progress=progress), retry)


def model_name(mixer: str, seed: int) -> str:
    return f"ttt/recall-{mixer}-seed{seed}"


def _validation(model, task) -> float:
    """Mean accuracy over the training pair counts, on the validation sequences."""
    scores = accuracy_by_pairs(model, task, task.pairs, seed=VALIDATION_SEED)
    return sum(a for a, _ in scores.values()) / len(scores)


def write_weights(folder=None, progress: bool = False, mixers=MIXERS, seeds=SEEDS) -> dict:
    """Train every mixer of ``mixers`` at ``seeds`` and ship it (``folder=None``: into the package).

    For each mixer the outer learning rate is chosen among :data:`LRS` by the mean accuracy over the
    training pair counts on validation sequences (``generator(VALIDATION_SEED + n)``) at ``seeds[0]``; the
    other seeds are trained at that rate, and one whose training diverges once more at ``RETRY_FACTOR``
    times it (its record says so). Each model's record holds its test accuracy by pair count
    (``generator(TEST_SEED + n)``). Models already in ``folder`` are kept (an interrupted run goes on where
    it stopped). Returns ``{mixer: [accuracy at 32 pairs, per seed]}``.
    """
    device = torch.device("cpu")
    out = {}
    have = set(pretrained.available("ttt/", folder))
    for mixer in mixers:
        if model_name(mixer, seeds[0]) in have:  # chosen before: its record holds the selection
            first = pretrained.provenance(model_name(mixer, seeds[0]), folder)
            _train_seeds(mixer, first["train_config"]["lr"], first["selection"],
                         [s for s in seeds[1:] if model_name(mixer, s) not in have], device, progress, folder, out)
            continue
        tried = [(lr, *train_model(mixer, lr, seeds[0], device=device, progress=progress and f"{mixer} lr={lr:g}"))
                 for lr in LRS]
        scores = [_validation(net, TASK) for _, net, _ in tried]
        chosen = min(range(len(tried)), key=lambda i: (-scores[i], i))
        selection = {"rule": f"outer learning rate among {list(LRS)}: the highest mean validation accuracy over "
                             f"{list(TASK.pairs)} pairs at seed {seeds[0]}",
                     "runs": {str(i): {"lr": lr, "validation": s} for i, ((lr, _, _), s) in enumerate(zip(tried, scores))},
                     "chosen": chosen, "better": "higher",
                     "validation": {"generator": f"{VALIDATION_SEED} + pairs", "n": N_EVAL},
                     "test": {"generator": f"{TEST_SEED} + pairs", "n": N_EVAL}}
        _train_seeds(mixer, tried[chosen][0], selection, seeds, device, progress, folder, out,
                     first=tried[chosen][1:])
    return out


def _train_seeds(mixer, lr, selection, seeds, device, progress, folder, out, first=None, config: TrainConfig = TRAIN,
                 name=None) -> None:
    """Train (or, for ``first``'s seed, take) and ship ``mixer`` at ``seeds``, all at ``lr``, as ``name(seed)``
    (default: :func:`model_name`)."""
    name = name or (lambda seed: model_name(mixer, seed))
    for i, seed in enumerate(seeds):
        if i == 0 and first is not None:
            net, history, retry = *first, None
        else:
            net, history, retry = _train_or_retry(mixer, lr, seed, device, progress, config)
        trained_lr = lr if retry is None else retry["retried_at_lr"]
        accuracy = accuracy_by_pairs(net)
        record = {
            "task": asdict(TASK), "mixer": mixer, "model": MODEL,
            "train_config": {**asdict(config), "lr": trained_lr}, "retry": retry,
            "seed": seed, "data_generator": 1000 * seed + 1, "train_seconds": history.seconds,
            "final_train_loss": history.losses[-1],
            "metrics": {"accuracy": {str(k): a for k, (a, _) in accuracy.items()},
                        "accuracy_se": {str(k): s for k, (_, s) in accuracy.items()}},
            "eval": {"n_eval": N_EVAL, "generator": f"{TEST_SEED} + pairs"},
            "selection": selection, "command": COMMAND,
            "torch": torch.__version__, "platform": platform.platform(),
        }
        pretrained.save(name(seed), net, record, folder=folder)
        out.setdefault(mixer, []).append(accuracy[32][0] if 32 in accuracy else None)
        if progress:
            print(f"{mixer} seed {seed} lr {trained_lr:g}: " + ", ".join(f"{k}: {a:.3f}" for k, (a, _) in accuracy.items()),
                  flush=True)


# TTT-MLP once more with a longer outer loop at a lower rate, fixed before these runs were trained (chapter 5's
# regression found TTT-MLP learns at a third of the others' rate given more steps): does it then learn on every
# seed? Nothing is chosen; every seed ships.
LONG = {"steps": 3000, "lr": 3e-3}


def long_name(seed: int) -> str:
    return f"ttt/recall-ttt-mlp-long-seed{seed}"


def write_long(folder=None, progress: bool = False, seeds=SEEDS) -> dict:
    """Train TTT-MLP with :data:`LONG`'s budget at ``seeds`` and ship it. Returns ``{"ttt-mlp": [acc at 32]}``."""
    out, have = {}, set(pretrained.available("ttt/", folder))
    for seed in [s for s in seeds if long_name(s) not in have]:
        _train_seeds("ttt-mlp", LONG["lr"], pretrained.one_run(seed), [seed], torch.device("cpu"), progress, folder,
                     out, config=replace(TRAIN, steps=LONG["steps"]), name=long_name)
    return out


def shipped(pairs=EVAL_PAIRS, n: int = N_EVAL, folder=None) -> dict:
    """The shipped recall models measured afresh on the test sequences: ``{"accuracy": {mixer: {n_pairs:
    [per seed]}}, "se": {mixer: {n_pairs: [per seed]}}, "lr": {mixer: lr}, "retried": {mixer: [seeds]}}``
    (mixers with no weights left out, and all empty for ``n = 0``; ``"ttt-mlp-long"``: TTT-MLP with
    :data:`LONG`'s budget)."""
    out = {"accuracy": {}, "se": {}, "lr": {}, "retried": {}}
    if not n:  # nothing to measure on
        return out
    names = set(pretrained.available("ttt/", folder))
    runs = {mixer: (lambda s, m=mixer: model_name(m, s)) for mixer in MIXERS} | {"ttt-mlp-long": long_name}
    for mixer, name in runs.items():
        seeds = [s for s in SEEDS if name(s) in names]
        for seed in seeds:
            scores = accuracy_by_pairs(pretrained.load(name(seed), folder), pairs=pairs, n=n)
            for k, (a, se) in scores.items():
                out["accuracy"].setdefault(mixer, {}).setdefault(k, []).append(a)
                out["se"].setdefault(mixer, {}).setdefault(k, []).append(se)
            if pretrained.provenance(name(seed), folder).get("retry"):
                out["retried"].setdefault(mixer, []).append(seed)
        if seeds:
            out["lr"][mixer] = pretrained.provenance(name(seeds[0]), folder)["train_config"]["lr"]
    return out


def recall_figure(accuracy: dict[str, dict[int, list[float]]], colors: dict[str, str] | None = None,
                  task: AssociativeRecallTask = TASK, features: int | None = None):
    """Accuracy against the number of pairs: one thin line per run (seed), one colour per mixer (dashed:
    TTT-MLP with the longer budget), the training counts shaded, chance dotted, the features per head marked."""
    fig, (ax,) = figure(width=7.0, height=3.8)
    ax.axvspan(min(task.pairs), max(task.pairs), color="0.93", zorder=0, label="training pair counts")
    for mixer, by_pairs in accuracy.items():
        ns = sorted(by_pairs)
        base = mixer.removesuffix("-long")
        label = mixer if base == mixer else f"{base}, {LONG['steps']} steps"
        for run in zip(*(by_pairs[k] for k in ns)):  # one run per seed
            ax.plot(ns, run, marker="o", ms=3, lw=1.2, alpha=0.8, color=(colors or {}).get(base),
                    ls="--" if base != mixer else "-", label=label)
            label = None
    ax.axhline(1 / task.n_values, ls=":", color="0.5", label="chance")
    if features:
        ax.axvline(features, ls="--", color="0.6", lw=1)
        ax.annotate(f"$f = {features}$ features per head", (features, 0.02), xytext=(4, 0),
                    textcoords="offset points", fontsize=8, color="0.4")
    ax.set(xlabel="key-value pairs in the context", ylabel="recall accuracy (test)", ylim=(0, 1.03),
           title="associative recall: the state fills up")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(write_weights(progress=True))
    print(write_long(progress=True))
