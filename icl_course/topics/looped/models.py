"""Looped transformers (Fan et al. 2024, arXiv 2409.15647) and the baselines they are compared with.

**The looped model.** One pre-LN decoder block ``f`` (causal softmax attention + MLP, *no*
positional encoding) is applied ``T`` times, with the input embedding ``e`` added back at every
loop (the paper's input injection, its Sec. 4):

    h_0 = 0,    h_t = f(h_{t-1} + e)  for t = 1..T,    logits = head(LN(h_T)).

The model sees a full-answer prompt ``input = _ ... _`` and writes the whole answer into the blank
slots after the last loop. Trained with ``T = T(n)`` loops for an input of length ``n`` (the step
count of the task's iterative solution), it can be run for more loops on longer inputs.

**Baselines**, called the same way (``predict(batch) -> answer tokens``):

- ``fixed-loop``: the same weight-tied block, trained and run with one fixed loop count;
- ``next-token``: a stack of distinct blocks (same parameter count as the looped block), trained by
  next-token prediction and decoded greedily;
- ``pause-tokens``: the same stack given a fixed number of blank *pause* tokens between ``=`` and
  the answer, in training and at test (Goyal et al. 2023; the paper's NTP-Pause): more positions to
  compute on, but still a fixed depth. :func:`equal_compute_pauses` sets their number so that, at
  the longest training length, the stack's compute equals the looped model's.

**Stopping without the oracle.** :func:`max_confidence_stop` is the paper's rule: run up to
``max_loops`` and keep the loop whose decoded answer has the highest confidence (the mean
log-probability of its own argmax tokens). :func:`stable_stop` keeps the first answer that stays
unchanged for ``patience`` further loops. Which of them works depends on how the model was trained
(see ``FullAnswerObjective.extra_loops``). :func:`clock_stop` asks a second looped model, the *clock*
(a :class:`Clock`, trained with :class:`HaltingObjective` to count loops against the input length)
when to stop the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icl_course import pretrained
from icl_course.runtime import require_finite

from .tasks import ONE, VOCAB_SIZE, ZERO, AlgorithmicBatch

__all__ = [
    "Block", "LoopedTransformer", "Clock", "NextTokenTransformer", "PauseTransformer", "equal_compute_pauses", "Supervised", "FullAnswerObjective", "NextTokenObjective",
    "HaltingObjective", "answer_confidence", "max_confidence_stop", "max_confidence_stop_batch", "stable_stop", "clock_stop", "accuracy", "save", "load",
]


class Block(nn.Module):
    """Pre-LN causal decoder block without positions: ``h + attn(LN h)``, then ``+ mlp(LN h)``."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        for name, value in (("width", width), ("n_heads", n_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if width % n_heads:
            raise ValueError(f"width must be a multiple of n_heads, got width={width}, n_heads={n_heads}")
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: Tensor) -> Tensor:
        B, L, W = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(W, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, W // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # causal mask is the only order signal
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, W))
        return h + self.mlp(self.ln2(h))


def _check_model_args(width, n_heads, seed, vocab_size):
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be an int >= 1, got {n_heads!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(vocab_size, int) or vocab_size < VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {VOCAB_SIZE} (the tasks' tokens), got {vocab_size!r}")


def _check_tokens(tokens: Tensor, vocab_size: int) -> None:
    if not torch.is_tensor(tokens) or tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32):
        raise ValueError(f"tokens must be a (B, L) tensor of token ids (torch.long), got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.numel() and not bool(((tokens >= 0) & (tokens < vocab_size)).all()):
        raise ValueError(f"tokens must be ids in [0, {vocab_size}), got values in [{tokens.min().item()}, {tokens.max().item()}]")


class LoopedTransformer(nn.Module):
    """One block looped ``n_loops`` times with the input embedding injected at every loop.

    >>> model = LoopedTransformer(width=16, n_heads=2)
    >>> model(torch.zeros(3, 7, dtype=torch.long), n_loops=4).shape
    torch.Size([3, 7, 5])
    """

    def __init__(self, width: int = 64, n_heads: int = 4, vocab_size: int = VOCAB_SIZE, seed: int = 0):
        super().__init__()
        _check_model_args(width, n_heads, seed, vocab_size)
        self.width, self.n_heads, self.vocab_size = width, n_heads, vocab_size
        self.args = {"width": width, "n_heads": n_heads, "vocab_size": vocab_size}  # what rebuilds it (pretrained)
        with torch.random.fork_rng(devices=[]):  # the init is a function of the seed alone
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab_size, width)
            self.block = Block(width, n_heads)
            self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size)

    def trajectory(self, tokens: Tensor, n_loops: int, last: int | None = None) -> Tensor:
        """Logits after every loop: ``(n_loops, B, L', vocab)``, ``L'`` the last ``last`` positions."""
        if not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be an int >= 1, got {n_loops!r}")
        _check_tokens(tokens, self.vocab_size)
        e = self.embed(tokens)  # (B, L, W)
        h, out = torch.zeros_like(e), []
        for _ in range(n_loops):
            h = self.block(h + e)  # input injection: e re-enters at every loop
            out.append(self.head(self.ln_f(h if last is None else h[:, -last:])))
        return torch.stack(out)

    def forward(self, tokens: Tensor, n_loops: int) -> Tensor:
        """Logits after ``n_loops`` loops: ``(B, L, vocab)``."""
        if not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be an int >= 1, got {n_loops!r}")
        _check_tokens(tokens, self.vocab_size)
        e = self.embed(tokens)
        h = torch.zeros_like(e)
        for _ in range(n_loops):
            h = self.block(h + e)
        return self.head(self.ln_f(h))

    def predict(self, batch: AlgorithmicBatch, n_loops: int) -> Tensor:
        """The answer tokens after ``n_loops`` loops: ``(B, L_ans)``."""
        L_ans = batch.answer.shape[1]
        with torch.no_grad():
            return self(batch.prompt(), n_loops)[:, -L_ans:].argmax(-1)


class Clock(LoopedTransformer):
    """A looped block that sees only the prompt's layout: every bit is read as ``0``.

    It is trained (:class:`HaltingObjective`) to tell another looped model when to stop. For the
    tasks here ``T(n)`` depends on the input length alone, so hiding the bits hides nothing the
    clock needs, and its answer is the same for every input of one length.
    """

    def trajectory(self, tokens: Tensor, n_loops: int, last: int | None = None) -> Tensor:
        return super().trajectory(torch.where(tokens == ONE, ZERO, tokens), n_loops, last)

    def forward(self, tokens: Tensor, n_loops: int) -> Tensor:
        return super().forward(torch.where(tokens == ONE, ZERO, tokens), n_loops)


class NextTokenTransformer(nn.Module):
    """A fixed-depth stack of distinct blocks trained by next-token prediction (no positions)."""

    pauses = 0  # blanks between '=' and the answer (PauseTransformer)

    def __init__(self, width: int = 32, n_heads: int = 4, n_layers: int = 4, vocab_size: int = VOCAB_SIZE, seed: int = 0):
        super().__init__()
        _check_model_args(width, n_heads, seed, vocab_size)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        self.width, self.n_heads, self.n_layers, self.vocab_size = width, n_heads, n_layers, vocab_size
        self.args = {"width": width, "n_heads": n_heads, "n_layers": n_layers, "vocab_size": vocab_size}
        with torch.random.fork_rng(devices=[]):  # the init is a function of the seed alone
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab_size, width)
            self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(n_layers))
            self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        _check_tokens(tokens, self.vocab_size)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def predict(self, batch: AlgorithmicBatch) -> Tensor:
        """Greedy decoding of the answer, one token at a time after ``input =``."""
        L_ans = batch.answer.shape[1]
        seq = batch.teacher_forced(self.pauses)[:, : batch.inputs.shape[1] + 1 + self.pauses]  # input = (pauses)
        with torch.no_grad():
            for _ in range(L_ans):
                next_token = self(seq)[:, -1, :2].argmax(-1, keepdim=True)  # answers are bits
                seq = torch.cat([seq, next_token], dim=1)
        return seq[:, -L_ans:]


class PauseTransformer(NextTokenTransformer):
    """The next-token stack with ``pauses`` blank tokens between ``=`` and the answer: ``input = _..._ answer``.

    The pauses give the stack more positions to compute on before it answers, not more depth: every
    position still passes through ``n_layers`` blocks (Goyal et al. 2023, "pause tokens"; Fan et al.
    2024's NTP-Pause baseline). Training and decoding are the next-token model's.

    >>> model = PauseTransformer(width=16, n_heads=2, n_layers=2, pauses=3)
    >>> model(torch.zeros(2, 9, dtype=torch.long)).shape
    torch.Size([2, 9, 5])
    """

    def __init__(self, width: int = 32, n_heads: int = 4, n_layers: int = 4, pauses: int = 0,
                 vocab_size: int = VOCAB_SIZE, seed: int = 0):
        super().__init__(width, n_heads, n_layers, vocab_size, seed)
        if not isinstance(pauses, int) or pauses < 0:
            raise ValueError(f"pauses must be an int >= 0, got {pauses!r}")
        self.pauses = pauses
        self.args = {**self.args, "pauses": pauses}


def equal_compute_pauses(task, n: int | None = None) -> int:
    """The pause count at which a :class:`PauseTransformer` computes as much as a looped model of the
    same parameter count at input length ``n`` (default: the task's longest training length).

    The looped block runs ``T(n)`` times over the ``L`` positions of the full-answer prompt; the stack
    (the same parameters per position) runs once over ``L + P`` positions. Equal matrix products,
    ``L + P = T(n) L``, give ``P = (T(n) - 1) L`` (attention over the longer sequence costs a bit more).

    >>> from icl_course.topics.looped.tasks import Parity
    >>> equal_compute_pauses(Parity(train_lengths=(1, 12)))  # (12 - 1) x the 14 positions of 12 bits, '=', '_'
    154
    """
    n = task.train_lengths[1] if n is None else n
    L = task.sample_length(n, 1, torch.Generator().manual_seed(0)).prompt().shape[1]
    return (task.steps(n) - 1) * L


# --- training objectives: the task's batches plus a loss, the contract of icl_course.training.train --


@dataclass(frozen=True)
class Supervised:
    """One single-length group of a :class:`FullAnswerObjective` batch and its loop count."""

    batch: AlgorithmicBatch
    n_loops: int  # the answer is supervised after this many loops


@dataclass
class FullAnswerObjective:
    """Cross-entropy of the full answer after ``T(n) + k`` loops (or ``fixed_loops`` loops).

    ``extra_loops = K > 0`` draws ``k`` uniformly from ``0..K`` for every group: the answer must
    already be right after ``T(n)`` loops *and stay right* for ``K`` more, which makes it a fixed
    point of the loop. ``K = 0`` is the paper's training (supervision at exactly ``T(n)``).

    What a training step sees is a function of the step and the generator alone: :meth:`sample_at`,
    which :func:`icl_course.training.train` calls with the step, so the objective holds no state and
    a resumed run is the same run. :meth:`sample` (the task protocol's) draws at the end of the
    curriculum: the full range of training lengths.
    """

    task: object  # an AlgorithmicTask
    extra_loops: int = 0  # K: supervise at T(n) + k with k ~ U{0..K}
    fixed_loops: int | None = None  # train with this many loops at every length (the fixed-loop baseline)
    unsure_weight: float = 0.0  # weight of the "not done yet" loss on loops 1..T(n)-2 (0: off)
    curriculum: int = 0  # the longest training length grows to its final value over this many steps (0: off)

    def __post_init__(self):
        if not isinstance(self.extra_loops, int) or self.extra_loops < 0:
            raise ValueError(f"extra_loops must be an int >= 0, got {self.extra_loops!r}")
        require_finite("FullAnswerObjective: unsure_weight", self.unsure_weight, at_least=0)
        if self.fixed_loops is not None and (not isinstance(self.fixed_loops, int) or self.fixed_loops < 1):
            raise ValueError(f"fixed_loops must be None or an int >= 1, got {self.fixed_loops!r}")
        if not isinstance(self.curriculum, int) or self.curriculum < 0:
            raise ValueError(f"curriculum must be an int >= 0 (steps), got {self.curriculum!r}")

    def sample_at(self, step: int, batch_size: int, gen: torch.Generator, device=None) -> list[Supervised]:
        """The groups of training step ``step``: lengths up to the curriculum's longest at ``step``,
        then each group's loop count, ``k`` drawn from ``gen`` after the data."""
        groups = self.task.sample(batch_size, gen, device, self.task.longest_at(step, self.curriculum))
        return [Supervised(batch, self._loops(batch, gen)) for batch in groups]

    def sample(self, batch_size: int, gen: torch.Generator, device=None) -> list[Supervised]:
        return self.sample_at(self.curriculum, batch_size, gen, device)

    def _loops(self, batch: AlgorithmicBatch, gen: torch.Generator) -> int:
        if self.fixed_loops is not None:
            return self.fixed_loops
        k = int(torch.randint(0, self.extra_loops + 1, (1,), generator=gen, device=gen.device)) if self.extra_loops else 0
        return batch.steps + k

    def loss(self, model: LoopedTransformer, groups: list[Supervised]) -> Tensor:
        """Mean over groups of CE(answer after the last loop) + unsure_weight * CE(uniform, loops < T(n) - 1).

        The second term asks the loop to *say* it is not done yet: before T(n) - 1 loops its answer
        distribution should be flat, so a confident answer can only come from a finished loop.
        """
        total = 0.0
        for batch, n_loops in ((g.batch, g.n_loops) for g in groups):
            L_ans = batch.answer.shape[1]
            early = max(0, batch.steps - 2) if self.unsure_weight else 0
            if early:
                traj = model.trajectory(batch.prompt(), n_loops, last=L_ans)  # (T, B, L_ans, vocab)
                logits = traj[-1]
                total = total - self.unsure_weight * traj[:early].log_softmax(-1).mean()  # CE to uniform
            else:
                logits = model(batch.prompt(), n_loops)[:, -L_ans:]  # (B, L_ans, vocab)
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.answer.reshape(-1))
        return total / len(groups)


@dataclass
class HaltingObjective:
    """Train a :class:`Clock` to say when ``T(n)`` loops are done.

    The clock's "done" signal is the margin ``m_t = logit(1) - logit(0)`` of its last slot after
    loop ``t``: done when it is positive. Asking only for the right sign (a cross-entropy on the bit
    ``t >= T(n)``) fits the training lengths but leaves the margin's shape free, and in our runs its
    zero crossing then drifted later and later beyond them. So the margin is regressed onto a
    straight ramp over the loops ``t = 1 .. horizon * T(n)``,

        m_t = scale * (t - T(n) + offset) / T(n),

    which rises by ``scale / T(n)`` per loop and crosses zero ``offset`` loops before ``T(n)``: a
    loop counter measured in units of the input length. ``offset < 1/2`` puts the crossing nearer
    ``T(n)`` than ``T(n) - 1``, so that a clock that is off beyond the training lengths tends to stop a
    loop late rather than early (a finished parity loop is more often still right one loop later
    than one loop before). The clock never sees the task's answers.
    """

    task: object  # an AlgorithmicTask (its prompts and T(n); its answers are not used)
    horizon: float = 2.0  # the ramp runs over loops 1 .. ceil(horizon * T(n))
    offset: float = 0.25  # the ramp crosses zero this many loops before T(n), in (0, 1)
    scale: float = 4.0  # the ramp's margin at t = 2 T(n), about; sets the loss's units

    def __post_init__(self):
        require_finite("HaltingObjective: horizon", self.horizon, at_least=1)
        require_finite("HaltingObjective: offset", self.offset, above=0, below=1)
        require_finite("HaltingObjective: scale", self.scale, above=0)

    def sample(self, batch_size: int, gen: torch.Generator, device=None) -> list[AlgorithmicBatch]:
        return self.task.sample(batch_size, gen, device=device)

    def loss(self, model: LoopedTransformer, groups: list[AlgorithmicBatch]) -> Tensor:
        total = 0.0
        for batch in groups:
            n_loops = math.ceil(self.horizon * batch.steps)
            logits = model.trajectory(batch.prompt(), n_loops, last=1)[:, :, 0]  # (T, B, vocab)
            margin = logits[..., ONE] - logits[..., ZERO]
            t = torch.arange(1, n_loops + 1, device=logits.device, dtype=logits.dtype)
            ramp = self.scale * (t - batch.steps + self.offset) / batch.steps
            total = total + F.mse_loss(margin, ramp[:, None].expand_as(margin))
        return total / len(groups)


@dataclass
class NextTokenObjective:
    """Teacher-forced cross-entropy of the answer tokens (the next-token and pause-token baselines;
    the model's ``pauses`` blanks sit before the answer and are not supervised)."""

    task: object

    def sample(self, batch_size: int, gen: torch.Generator, device=None) -> list[AlgorithmicBatch]:
        return self.task.sample(batch_size, gen, device=device)

    def loss(self, model: NextTokenTransformer, groups: list[AlgorithmicBatch]) -> Tensor:
        total = 0.0
        for batch in groups:
            L_ans = batch.answer.shape[1]
            logits = model(batch.teacher_forced(model.pauses))[:, -L_ans - 1 : -1]  # the token before each answer token
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.answer.reshape(-1))
        return total / len(groups)


# --- inference: accuracy and stopping rules ---------------------------------------------------------


def accuracy(predicted: Tensor, answer: Tensor) -> float:
    """Fraction of sequences whose *whole* answer is right."""
    if predicted.shape != answer.shape:
        raise ValueError(f"predicted has shape {tuple(predicted.shape)}, answer has {tuple(answer.shape)}")
    return (predicted == answer).all(dim=1).float().mean().item()


def answer_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Decoded answers and their confidence from per-loop logits ``(T, B, L_ans, vocab)``.

    The confidence of loop ``t`` is the mean log-probability of its own argmax tokens, i.e. minus
    the cross-entropy of the decoded answer against itself (Fan et al., Sec. 4). Returns
    ``answers (T, B, L_ans)`` and ``confidence (T, B)``.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (T, B, L_ans, vocab), got {tuple(logits.shape)}")
    logp = logits.log_softmax(-1)
    best, answers = logp.max(-1)  # (T, B, L_ans)
    return answers, best.mean(-1)


def max_confidence_stop(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's rule: per sequence, the answer of the most confident loop.

    Returns ``answers (B, L_ans)`` and the chosen loop count ``(B,)`` (1-based).
    """
    answers, conf = answer_confidence(logits)
    t = conf.argmax(0)  # (B,)
    return answers[t, torch.arange(answers.shape[1])], t + 1


def max_confidence_stop_batch(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's rule for a batch of one input length: one loop count for every sequence, the loop
    whose answers are most confident on average. Returns ``answers (B, L_ans)`` and the loop count
    ``(B,)`` (1-based, the same for all)."""
    answers, conf = answer_confidence(logits)
    t = conf.mean(1).argmax()
    return answers[t], (t + 1).expand(answers.shape[1])


def stable_stop(logits: Tensor, patience: int = 2, min_confidence: float = -math.inf) -> tuple[Tensor, Tensor]:
    """Stop at the first loop whose answer is unchanged, and confident, for ``patience`` more loops.

    Loops whose confidence (see :func:`answer_confidence`) is below ``min_confidence`` never count
    as settled; the default counts every loop. A sequence whose answer never settles keeps its last
    answer. Returns ``answers (B, L_ans)`` and the chosen loop count ``(B,)`` (1-based).
    """
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1, got {patience!r}")
    if not min_confidence <= 0:
        raise ValueError(f"min_confidence must be <= 0 (a log-probability), got {min_confidence!r}")
    answers, conf = answer_confidence(logits)
    T, B = answers.shape[:2]
    sure = conf >= min_confidence  # (T, B)
    same = (answers[1:] == answers[:-1]).all(-1) & sure[1:] & sure[:-1]  # (T-1, B): loop t+1 repeats loop t, both sure
    chosen = torch.full((B,), T - 1, dtype=torch.long)
    for t in range(T - 1 - patience, -1, -1):  # the earliest t with `patience` unchanged loops after it
        settled = same[t : t + patience].all(0)
        chosen = torch.where(settled.cpu(), torch.tensor(t), chosen)
    chosen = chosen.to(answers.device)
    return answers[chosen, torch.arange(B, device=answers.device)], chosen + 1


def clock_stop(logits: Tensor, clock_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence, the answer at the first loop where the clock says "done" (the last loop if never).

    ``logits`` are the solver's per-loop logits ``(T, B, L_ans, vocab)``, ``clock_logits`` the clock's
    on the same prompts ``(T, B, L, vocab)`` (its last slot is read). Returns ``answers (B, L_ans)``
    and the chosen loop count ``(B,)`` (1-based).
    """
    if logits.ndim != 4 or clock_logits.ndim != 4 or clock_logits.shape[:2] != logits.shape[:2]:
        raise ValueError(f"logits (T, B, L_ans, vocab) and clock_logits (T, B, L, vocab) must share T and B, "
                         f"got {tuple(logits.shape)} and {tuple(clock_logits.shape)}")
    done = clock_logits[:, :, -1, ONE] > clock_logits[:, :, -1, ZERO]  # (T, B): a positive margin
    T, B = done.shape
    chosen = torch.where(done.any(0), done.long().argmax(0), torch.full((B,), T - 1, device=done.device))
    return logits.argmax(-1)[chosen, torch.arange(B, device=done.device)], chosen + 1


# --- shipped weights: icl_course.pretrained saves and loads these classes ---------------------------


pretrained.register(LoopedTransformer, Clock, NextTokenTransformer, PauseTransformer)
save, load = pretrained.save, pretrained.load  # the names notebooks use (icl.looped.load)
