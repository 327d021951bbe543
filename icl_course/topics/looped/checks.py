"""Checks for the exercises of chapter 6 (looped transformers and length generalization)."""

from __future__ import annotations

import torch

from icl_course.checking import Wrong, check, expect, expect_shape

from .models import max_confidence_stop, stable_stop

__all__ = ["parity_loop", "max_confidence", "stable_answer"]


def _random_logits(gen: torch.Generator) -> torch.Tensor:
    """Per-loop logits ``(T, B, L_ans, 5)`` with answers that settle, flip and repeat."""
    T = int(torch.randint(4, 12, (1,), generator=gen))
    B = int(torch.randint(3, 9, (1,), generator=gen))
    L_ans = int(torch.randint(1, 4, (1,), generator=gen))
    logits = 3 * torch.randn(T, B, L_ans, 5, generator=gen)
    settle = torch.randint(1, T, (B,), generator=gen)  # from this loop on, some sequences keep one answer
    for b in range(0, B, 2):
        # Each later loop rescales the logits by its own factor: a positive scale keeps every argmax (the
        # answer stays), and distinct scales give distinct confidences, so no two loops tie for the most
        # confident one (a tie would make any tie-break a right answer, the reference's only one of them).
        scale = 1 + 0.05 * torch.randperm(T - settle[b], generator=gen)
        logits[settle[b]:, b] = scale[:, None, None] * logits[settle[b], b]
    return logits


@check("Exercise 1: parity as a loop")
def parity_loop(student_fn, gen):
    B, n = int(torch.randint(3, 9, (1,), generator=gen)), int(torch.randint(4, 12, (1,), generator=gen))
    for _ in range(100):  # bits on which stopping at the wrong step shows: for each n_steps tried below, some
        bits = torch.randint(0, 2, (B, n), generator=gen)  # row's parity changes after it, and at its next bit
        if all(bool((bits[:, s:].sum(1) % 2).any()) and bool(bits[:, s].any()) for s in (0, 1, n // 2)):
            break
    full = student_fn(bits, n)
    expect(torch.is_tensor(full), f"Return a tensor, got {type(full).__name__}.")
    expect_shape("state", full, (B,))
    want = bits.sum(1) % 2
    if torch.equal(full.long(), 1 - want):
        raise Wrong("Every answer is flipped: the state starts at 0 (the parity of no bits) and XORs in each bit.")
    expect(torch.equal(full.long(), want), "After n steps the state should be the parity of all n bits (sum mod 2).")
    for steps in (0, 1, n // 2):
        got = student_fn(bits, steps)
        want = bits[:, :steps].sum(1) % 2
        if torch.equal(got.long(), bits.sum(1) % 2) and not torch.equal(got.long(), want):
            raise Wrong(f"With n_steps={steps} you returned the parity of all bits: run only n_steps steps.")
        expect(torch.equal(got.long(), want), f"With n_steps={steps} the state should be the parity of the first {steps} bits.")


def _raw_logit_loops(logits: torch.Tensor) -> torch.Tensor:
    """The common mistake: loops ranked by raw logits instead of log-probabilities."""
    return logits.max(-1).values.mean(-1).argmax(0) + 1


def _other_averages(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loops ranked by another summary of the answer positions' log-probabilities than their mean."""
    logp = logits.log_softmax(-1).max(-1).values  # (T, B, L_ans): the argmax token's log-probability
    return {"the mean *probability*": logp.exp().mean(-1).argmax(0) + 1,
            "the *smallest* log-probability": logp.min(-1).values.argmax(0) + 1}


_OTHER_AVERAGES = ("You ranked loops by {}; the confidence of a loop is the *mean* log-probability of its "
                   "answer tokens (each the log_softmax of the argmax).")


@check("Exercise 2: maximum-confidence stopping")
def max_confidence(student_fn, gen):
    for _ in range(1000):  # inputs on which each mistake below shows, and is not taken for another one:
        logits = _random_logits(gen)
        best, raw = max_confidence_stop(logits)[1], _raw_logit_loops(logits)
        others = list(_other_averages(logits).values())
        if (len(set(best.tolist())) > 1  # the sequences' best loops differ (one loop for all shows),
                and len(set(raw.tolist())) > 1  # ranking by raw logits gives other loops, not one for all
                and not torch.equal(raw, best) and not torch.equal(raw, best - 1)  # nor these shifted by one
                and all(len(set(o.tolist())) > 1 and not torch.equal(o, raw)  # other averages show,
                        and not torch.equal(o, best) and not torch.equal(o, best - 1) for o in others)
                and not torch.equal(*others)):  # each as itself
            break
    out = student_fn(logits)
    expect(isinstance(out, tuple) and len(out) == 2, "Return a pair `(answers, loops)`.")
    answers, loops = out
    want_answers, want_loops = max_confidence_stop(logits)
    expect_shape("answers", answers, tuple(want_answers.shape))
    expect_shape("loops", loops, tuple(want_loops.shape))
    if torch.equal(loops.long(), want_loops - 1):
        raise Wrong("`loops` is off by one: report the loop *count*, 1 for the first loop, not the index.")
    if len(set(loops.tolist())) == 1 and len(set(want_loops.tolist())) > 1:
        raise Wrong("You chose one loop for the whole batch; choose the most confident loop for each sequence.")
    raw = _raw_logit_loops(logits)
    if torch.equal(loops.long(), raw) and not torch.equal(raw, want_loops):
        raise Wrong("You ranked loops by raw logits; the confidence is the log-*probability* (log_softmax) of the argmax.")
    for what, other in _other_averages(logits).items():
        if torch.equal(loops.long(), other):
            raise Wrong(_OTHER_AVERAGES.format(what))
    expect(torch.equal(loops.long(), want_loops), f"Wrong loops: got {loops.tolist()}, expected {want_loops.tolist()}.")
    expect(torch.equal(answers.long(), want_answers), "Right loops, wrong answers: return the argmax tokens of the chosen loop.")


@check("Exercise 3: stop when the answer stops changing")
def stable_answer(student_fn, gen):
    for patience in (1, 2, 3):
        logits = _random_logits(gen)
        out = student_fn(logits, patience)
        expect(isinstance(out, tuple) and len(out) == 2, "Return a pair `(answers, loops)`.")
        answers, loops = out
        want_answers, want_loops = stable_stop(logits, patience)
        expect_shape("answers", answers, tuple(want_answers.shape))
        expect_shape("loops", loops, tuple(want_loops.shape))
        if torch.equal(loops.long(), want_loops + patience):
            raise Wrong(f"With patience={patience} you stopped at the *last* loop of the unchanged run; "
                        "return the first loop whose answer then stays the same.")
        if torch.equal(loops.long(), want_loops - 1):
            raise Wrong("`loops` is off by one: report the loop count, 1 for the first loop.")
        expect(torch.equal(loops.long(), want_loops),
               f"With patience={patience}: got loops {loops.tolist()}, expected {want_loops.tolist()}. A sequence whose "
               "answer never settles keeps its last loop's answer.")
        expect(torch.equal(answers.long(), want_answers), "Right loops, wrong answers: return the argmax tokens of the chosen loop.")
