"""What experiments return: a mapping that says what it holds when asked for a key it lacks.

A chapter's ``run`` returns a result whose ``metrics`` are JSON-ready numbers (what ``icl-course
reproduce`` writes to ``metrics.json``). Notebooks read them by key, and a misspelt key must fail at
once, naming the keys there are, never fall through to a default (a NaN in a table). ``Lookup`` is a
``dict`` (so ``json.dumps`` writes it as one) with that behaviour at every level; JSON keys are
strings, so an integer key finds its string (``m["loss"][3]`` is ``m["loss"]["3"]``).

>>> m = Lookup.deep({"loss": {"1": 0.5, "2": 0.25}})
>>> m["loss"][2]
0.25
>>> m["los"]
Traceback (most recent call last):
...
KeyError: "no 'los' here; the keys are 'loss'"

A number from training comes from one run; a chapter repeats the run over seeds (initial weights,
training and test data all change) and reports ``mean ± std`` over them. A step count can be
missing (``None``: the run never got there), so the mean and spread are over the seeds that have a
value, and ``missing`` says on how many it is absent. An accuracy measured on ``n`` fresh samples
has the binomial standard error ``sqrt(p (1 - p) / n)``.

>>> mean_std([0.62, 0.64, 0.60])["mean"]
0.62
>>> pm([0.62, 0.64, 0.60])
'0.62 ± 0.02'
>>> pm([40, None, 44], ".0f")
'42 ± 3 (not reached on 1 of 3 seeds)'
>>> holds_on([True, False, True])
'2 of 3 seeds'
"""

from __future__ import annotations

import math
import statistics

__all__ = ["Lookup", "spread", "mean_std", "over_seeds", "pm", "binomial_se", "holds_on", "where_holds"]


class Lookup(dict):
    """A ``dict`` whose missing key raises a ``KeyError`` naming the keys it has."""

    def __missing__(self, key):
        if not isinstance(key, (str, bool)) and isinstance(key, int) and str(key) in self:
            return self[str(key)]
        keys = ", ".join(repr(k) for k in self) or "none"
        raise KeyError(f"no {key!r} here; the keys are {keys}")

    @classmethod
    def deep(cls, value):
        """``value`` with every ``dict`` inside it (in dicts, lists and tuples) made a ``Lookup``."""
        if isinstance(value, dict):
            return cls({k: cls.deep(v) for k, v in value.items()})
        if isinstance(value, list):
            return [cls.deep(v) for v in value]
        if isinstance(value, tuple):
            return tuple(cls.deep(v) for v in value)
        return value


def spread(values, fmt: str = ".4f") -> str:
    """``"mean ± std"`` of ``values`` (the sample standard deviation, over seeds), with the count:
    ``spread([0.21, 0.22, 0.20]) == "0.2100 ± 0.0100 (3 seeds)"``. One value has no spread."""
    values = list(values)
    if not values:
        raise ValueError("values must hold at least one number")
    s = mean_std(values)
    std = "" if s["std"] is None else f" ± {s['std']:{fmt.replace('+', '')}}"
    return f"{s['mean']:{fmt}}{std} ({len(values)} seed{'s' if len(values) > 1 else ''})"


def mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    """``{"mean", "std", "seeds", "missing"}`` of per-seed ``values``: the mean and the sample standard
    deviation of those that are not ``None`` (``None`` where there are too few for it)."""
    got = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(got) if got else None,
        "std": statistics.stdev(got) if len(got) > 1 else None,  # one seed has no spread
        "seeds": len(values),
        "missing": len(values) - len(got),
    }


def over_seeds(tree):
    """``tree`` (dicts of per-seed lists) with every list replaced by its :func:`mean_std`."""
    if isinstance(tree, dict):
        return {k: over_seeds(v) for k, v in tree.items()}
    return mean_std(tree)


def pm(values: list[float | None], fmt: str = ".2f") -> str:
    """``"mean ± std"`` over seeds, as the chapter's tables print it (one seed: the value alone)."""
    s = mean_std(values)
    if s["mean"] is None:
        return f"not reached on {s['seeds']} of {s['seeds']} seeds"
    text = f"{s['mean']:{fmt}}" + ("" if s["std"] is None else f" ± {s['std']:{fmt}}")
    return text + (f" (not reached on {s['missing']} of {s['seeds']} seeds)" if s["missing"] else "")


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent samples: ``sqrt(p (1 - p) / n)``."""
    if not 0 <= p <= 1 or n < 1:
        raise ValueError(f"binomial_se needs 0 <= p <= 1 and n >= 1, got p={p!r}, n={n!r}")
    return math.sqrt(p * (1 - p) / n)


def holds_on(verdicts: list[bool]) -> str:
    """``"k of n seeds"``: on how many seeds a claim holds."""
    return f"{sum(bool(v) for v in verdicts)} of {len(verdicts)} seed{'s' if len(verdicts) != 1 else ''}"


def where_holds(xs: list[float], verdicts: list[list[bool]]) -> str:
    """The ``xs`` (a sweep's SNRs) at which a claim holds on some seed, ``verdicts[i]`` being one per
    seed at ``xs[i]``; those where it does not hold on every seed say on how many (``"none"``: nowhere)."""
    return ", ".join(f"{x:g}" + ("" if all(v) else f" ({holds_on(v)})") for x, v in zip(xs, verdicts) if any(v)) or "none"
