"""Algorithmic tasks whose solution takes more steps as the input grows: parity, copy, addition.

Fan et al. 2024 (arXiv 2409.15647) train looped transformers on tasks with a known iterative
solution (their *n-RASP-L* programs) whose number of steps ``T(n)`` grows with the input length
``n``. Each task here draws a batch of inputs of *one* length (no padding is ever needed) and knows
the exact answer and ``T(n)``.

Token vocabulary (shared by every task, so one model class serves all of them)::

    0, 1   the bits
    2 '+'  separates the two numbers of an addition
    3 '='  ends the input
    4 '_'  an empty answer slot: the model writes the whole answer into these at once

A *full-answer* prompt is ``input = _ _ ... _`` with one ``_`` per answer token; the model's output
at those slots is its answer. A *next-token* sequence is ``input = answer``, trained by teacher
forcing and decoded one token at a time. Bits are written least-significant first (so an addition's
carry flows left to right, the direction causal attention can see).

>>> task = Parity(train_lengths=(1, 12))
>>> batch = task.sample_length(5, 3, generator(0))
>>> batch.inputs.shape, batch.answer.shape
(torch.Size([3, 5]), torch.Size([3, 1]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from icl_course.tasks import generator

__all__ = ["ZERO", "ONE", "PLUS", "EQUALS", "BLANK", "VOCAB_SIZE", "AlgorithmicBatch", "Parity", "Copy", "Addition",
           "TASKS", "make_task", "generator"]

ZERO, ONE, PLUS, EQUALS, BLANK = 0, 1, 2, 3, 4
VOCAB_SIZE = 5
SYMBOLS = "01+=_"


@dataclass
class AlgorithmicBatch:
    """Sequences of one input length ``n``: ``inputs (B, L_in)``, exact ``answer (B, L_ans)``."""

    n: int  # the input length (bits per number)
    inputs: Tensor  # (B, L_in) token ids, without the '='
    answer: Tensor  # (B, L_ans) token ids (bits)
    steps: int  # T(n): how many steps the iterative solution takes

    def prompt(self) -> Tensor:
        """Full-answer prompt ``input = _..._``: (B, L_in + 1 + L_ans)."""
        B, L_ans = self.answer.shape
        tail = torch.full((B, 1 + L_ans), BLANK, dtype=torch.long, device=self.inputs.device)
        tail[:, 0] = EQUALS
        return torch.cat([self.inputs, tail], dim=1)

    def teacher_forced(self, pauses: int = 0) -> Tensor:
        """Next-token sequence ``input = answer``, or with ``pauses`` blanks before the answer
        ``input = _..._ answer``: (B, L_in + 1 + pauses + L_ans)."""
        if not isinstance(pauses, int) or pauses < 0:
            raise ValueError(f"pauses must be an int >= 0, got {pauses!r}")
        tail = torch.full((self.inputs.shape[0], 1 + pauses), BLANK, dtype=torch.long, device=self.inputs.device)
        tail[:, 0] = EQUALS
        return torch.cat([self.inputs, tail, self.answer], dim=1)

    def to(self, device) -> "AlgorithmicBatch":
        return AlgorithmicBatch(self.n, self.inputs.to(device), self.answer.to(device), self.steps)

    def __len__(self) -> int:
        return self.inputs.shape[0]


def show(tokens: Tensor) -> str:
    """A token row as text, e.g. ``'1011=_'``."""
    return "".join(SYMBOLS[int(t)] for t in tokens)


def _check_range(name: str, lengths) -> tuple[int, int]:
    if not (isinstance(lengths, tuple) and len(lengths) == 2 and all(isinstance(v, int) for v in lengths)):
        raise ValueError(f"{name} must be a pair of ints (shortest, longest), got {lengths!r}")
    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 1 <= shortest <= longest, got {lengths!r}")
    return lengths


@dataclass(frozen=True)
class AlgorithmicTask:
    """Base: training lengths, test lengths, and a sampler of single-length batches.

    ``sample(batch_size, gen, device)`` (the contract of :func:`icl_course.training.train`) draws
    ``groups`` batches, each of one length drawn uniformly from ``train_lengths``, and returns
    them as a list: every step of training sees several lengths without padding.
    """

    train_lengths: tuple[int, int] = (1, 12)  # input lengths seen in training (inclusive)
    test_lengths: tuple[int, int] = (1, 24)  # input lengths of the evaluation (inclusive)
    groups: int = 4  # single-length groups per training batch

    def __post_init__(self):
        _check_range("train_lengths", self.train_lengths)
        _check_range("test_lengths", self.test_lengths)
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {self.groups!r}")

    name = "task"

    def steps(self, n: int) -> int:
        """T(n): the number of steps of the iterative solution for inputs of length n."""
        return n

    def _draw(self, n: int, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample_length(self, n: int, batch_size: int, gen: torch.Generator, device=None) -> AlgorithmicBatch:
        """``batch_size`` random inputs of length ``n`` and their answers (drawn on ``gen``'s device)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        inputs, answer = self._draw(n, batch_size, gen)
        return AlgorithmicBatch(n, inputs, answer, self.steps(n)).to(device or "cpu")

    def sample(self, batch_size: int, gen: torch.Generator, device=None, longest: int | None = None) -> list[AlgorithmicBatch]:
        """``groups`` single-length batches, lengths uniform in ``train_lengths`` (capped at ``longest``)."""
        lo, hi = self.train_lengths
        hi = hi if longest is None else max(lo, min(hi, longest))
        per_group = max(1, batch_size // self.groups)
        lengths = torch.randint(lo, hi + 1, (self.groups,), generator=gen, device=gen.device).tolist()
        return [self.sample_length(n, per_group, gen, device) for n in lengths]

    def longest_at(self, step: int, curriculum: int) -> int:
        """A curriculum's longest training length at ``step``: it grows linearly from
        ``min(shortest + 1, longest)`` to the longest training length over the first ``curriculum``
        steps (0: no curriculum)."""
        lo, hi = self.train_lengths
        if curriculum <= 0 or step >= curriculum:
            return hi
        start = min(lo + 1, hi)
        return start + int((hi - start + 1) * step / curriculum)


def _bits(batch_size: int, n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (batch_size, n), generator=gen, device=gen.device)


@dataclass(frozen=True)
class Parity(AlgorithmicTask):
    """Input: n bits. Answer: their XOR (one bit). Iterative solution: XOR one bit per step, T(n) = n."""

    name = "parity"

    def _draw(self, n, batch_size, gen):
        x = _bits(batch_size, n, gen)
        return x, x.sum(dim=1, keepdim=True) % 2


@dataclass(frozen=True)
class Copy(AlgorithmicTask):
    """Input: n bits. Answer: the same n bits. T(n) = n (one bit moved per step)."""

    name = "copy"

    def _draw(self, n, batch_size, gen):
        x = _bits(batch_size, n, gen)
        return x, x.clone()


@dataclass(frozen=True)
class Addition(AlgorithmicTask):
    """Input: ``a + b`` with two n-bit numbers, least-significant bit first. Answer: the n + 1 bits
    of ``a + b``, least-significant first. T(n) = n + 1 (the carry moves one bit per step)."""

    name = "addition"

    def steps(self, n: int) -> int:
        return n + 1

    def _draw(self, n, batch_size, gen):
        a, b = _bits(batch_size, n, gen), _bits(batch_size, n, gen)
        on = gen.device
        answer = torch.empty(batch_size, n + 1, dtype=torch.long, device=on)
        carry = torch.zeros(batch_size, dtype=torch.long, device=on)
        for i in range(n):  # schoolbook addition, bit i (least significant first)
            s = a[:, i] + b[:, i] + carry
            answer[:, i], carry = s % 2, s // 2
        answer[:, n] = carry
        plus = torch.full((batch_size, 1), PLUS, dtype=torch.long, device=on)
        return torch.cat([a, plus, b], dim=1), answer


TASKS = {"parity": Parity, "copy": Copy, "addition": Addition}


def make_task(name: str, train_lengths: tuple[int, int], test_lengths: tuple[int, int], groups: int = 4):
    """The task called ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"name must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](train_lengths=train_lengths, test_lengths=test_lengths, groups=groups)
