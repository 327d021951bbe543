"""Exercise checks: immediate, specific feedback that never crashes the notebook.

A check calls the student's function on *fresh random inputs* (a new seed every call, so pasting
an expected output cannot pass), compares with the package's reference, and reports one of

- ``passed``;
- ``wrong``, with what is wrong (a shape, a value, a sign), from :class:`Wrong`;
- ``not implemented``, when the function still raises ``NotImplementedError``;
- ``error``, when the function raised anything else (the exception is named, the notebook goes on).

Writing a check for a new exercise::

    @check("Exercise 1: the construction weights")
    def construction_weights(student_fn, gen):
        Q, P = student_fn(d, eta)          # gen: a torch.Generator with a fresh seed
        expect_shape("Q", Q, (d + 1, d + 1))
        expect_close("Q", Q, Q_reference)

Two environment variables serve the tests and grading: ``ICL_COURSE_CHECKS=strict`` makes any
result but ``passed`` raise :class:`CheckFailed`; ``ICL_COURSE_CHECK_LOG=FILE`` appends every result
to FILE as one JSON line.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import asdict, dataclass

import torch

__all__ = ["CheckResult", "CheckFailed", "Wrong", "check", "expect_shape", "expect_close", "expect"]

STATUSES = ("passed", "wrong", "not implemented", "error")
SYMBOLS = {"passed": "✅", "wrong": "❌", "not implemented": "⏳", "error": "💥"}


class Wrong(Exception):
    """Raised inside a check to report a specific mistake."""


class CheckFailed(AssertionError):
    """Raised in strict mode (``ICL_COURSE_CHECKS=strict``) when a check does not pass."""


@dataclass
class CheckResult:
    exercise: str
    status: str  # one of STATUSES
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __str__(self) -> str:
        return f"{SYMBOLS[self.status]} {self.exercise}: {self.status}. {self.message}".rstrip()

    def __repr__(self) -> str:
        return str(self)


def check(exercise: str):
    """Turn ``fn(student_fn, gen)``, which raises :class:`Wrong` on a mistake, into a check.

    The check prints its result, returns a :class:`CheckResult`, and never raises (unless strict).
    ``report=False`` (the grader's call) only returns the result: nothing printed, logged or raised.
    """

    def decorate(body):
        @functools.wraps(body)
        def run(student_fn, report: bool = True) -> CheckResult:
            gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
            try:
                body(student_fn, gen)
                result = CheckResult(exercise, "passed", "Well done.")
            except NotImplementedError:
                result = CheckResult(exercise, "not implemented", "Replace the `raise NotImplementedError` with your code.")
            except Wrong as mistake:
                result = CheckResult(exercise, "wrong", str(mistake))
            except Exception as exc:  # the student's code raised: report it, keep the notebook going
                result = CheckResult(exercise, "error", f"Your function raised {type(exc).__name__}: {exc}{_hint(exc)}")
            if report:
                _report(result)
            return result

        run.exercise = exercise  # the title, for graders and tables
        return run

    return decorate


# Errors whose message a student cannot act on alone: a piece of the message -> the hint added to it
HINTS = {
    "does not require grad": "Autograd can only differentiate with respect to a tensor made with "
                             "`requires_grad=True` (or `x.requires_grad_()`), before the computation that uses it.",
}


def _hint(exc: Exception) -> str:
    return next((f" Hint: {hint}" for piece, hint in HINTS.items() if piece in str(exc)), "")


def _report(result: CheckResult) -> None:
    print(result)
    log = os.environ.get("ICL_COURSE_CHECK_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(asdict(result)) + "\n")
    if os.environ.get("ICL_COURSE_CHECKS", "").lower() == "strict" and not result.passed:
        raise CheckFailed(str(result))


# --- helpers for writing checks ----------------------------------------------------------------


def expect(condition: bool, message: str) -> None:
    """Report ``message`` as the mistake unless ``condition`` holds."""
    if not condition:
        raise Wrong(message)


def expect_shape(name: str, value, shape: tuple[int, ...]) -> None:
    """``value`` must be a tensor of exactly ``shape``."""
    expect(isinstance(value, torch.Tensor), f"`{name}` should be a torch.Tensor, got {type(value).__name__}.")
    expect(tuple(value.shape) == tuple(shape), f"`{name}` has shape {tuple(value.shape)}, expected {tuple(shape)}.")


def expect_close(name: str, value, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-6, hint: str = "") -> None:
    """``value`` must match ``expected`` in shape and, within tolerance, in every entry."""
    expect_shape(name, value, tuple(expected.shape))
    value = value.detach().to(expected.dtype)
    expect(bool(torch.isfinite(value).all()), f"`{name}` contains NaN or infinite entries.")
    if not torch.allclose(value, expected, rtol=rtol, atol=atol):
        factor = _constant_factor(value, expected, rtol, atol)
        if factor is not None:
            what = "has the wrong sign everywhere" if abs(factor + 1) < 1e-3 else \
                f"is off by a factor {factor:.3g} everywhere (a missing 1/n, 2 or 1/2?)"
            raise Wrong(f"`{name}` {what}: got {value.flatten()[0].item():.6g} where {expected.flatten()[0].item():.6g} "
                        f"was expected, and so on. {hint}".rstrip())
        err = (value - expected).abs()
        i = tuple(int(k) for k in torch.unravel_index(err.argmax(), err.shape)) if err.ndim else ()
        where = f" at index {i}" if i else ""
        got, want = value[i].item(), expected[i].item()
        sign = " (the sign is flipped)" if abs(got + want) < 1e-6 * max(1.0, abs(want)) and want != 0 else ""
        raise Wrong(f"`{name}` is off{where}: got {got:.6g}, expected {want:.6g}{sign}. {hint}".rstrip())


def _constant_factor(value: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float | None:
    """``c`` if ``value`` is ``c * expected`` within tolerance for one constant ``c`` (not 0 or 1), else None:
    the most common wrong answer, a formula right up to a constant, gets its own feedback."""
    if expected.numel() < 2 or not bool(expected.ne(0).any()):
        return None
    c = ((value * expected).sum() / (expected * expected).sum()).item()
    if abs(c) < 1e-3 or abs(c - 1) < 1e-3 or not torch.allclose(value, c * expected, rtol=rtol, atol=atol * abs(c)):
        return None
    return c

