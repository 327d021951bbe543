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
"""

from __future__ import annotations

__all__ = ["Lookup", "spread"]


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
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values must hold at least one number")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:{fmt}} (1 seed)"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:{fmt}} ± {std:{fmt.replace('+', '')}} ({len(values)} seeds)"
