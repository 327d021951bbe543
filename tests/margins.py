"""Headline claims as measurements with bounds, and the command that measures their margins.

A *claim* is a function of a seed that returns named measured values (losses, ratios, accuracies),
registered with the bound each value must clear::

    @claim(loss_ratio=("<", 1.03), cosine=(">", 0.99))
    def trained_layer_is_one_gd_step(seed):
        ...
        return {"loss_ratio": ..., "cosine": ...}

The tests call a claim at seed 0 and assert every bound (``trained_layer_is_one_gd_step.check()``).
Whether such a test holds on another machine depends on how far each bound sits from what the
claim measures there: training results move with the CPU's kernels and the thread count. So each
bound is set from a measurement over seeds (data and initialisation) and thread counts, recorded
in ``tests/margins.md``; the rule is that the bound lies beyond mean +- 4 standard deviations.

    make margins                                  # every claim, seeds 0-4, 1 and 2 threads
    .venv/bin/python tests/margins.py -k gd_step  # only the claims whose name contains gd_step

The command rewrites the rows of the claims it measured and keeps the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).parent
RECORD = HERE / "margins.json"
TABLE = HERE / "margins.md"
OPS = {"<": lambda v, b: v < b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b}
Z_REQUIRED = 4.0  # the bound must lie this many standard deviations beyond the mean

CLAIMS: dict[str, "Claim"] = {}


@dataclass
class Claim:
    name: str  # "test_module::function"
    measure: Callable[[int], dict[str, float]]
    bounds: dict[str, tuple[str, float]]
    _cache: dict = field(default_factory=dict, repr=False)

    def __call__(self, seed: int = 0) -> dict[str, float]:
        """The measured values at ``seed`` (measured once per process and seed)."""
        if seed not in self._cache:
            values = self.measure(seed)
            missing = set(self.bounds) - set(values)
            if missing:
                raise KeyError(f"claim {self.name} measured no {sorted(missing)}")
            self._cache[seed] = values
        return self._cache[seed]

    def failures(self, values: dict[str, float], keys=None) -> list[str]:
        out = []
        for key in keys or self.bounds:
            op, bound = self.bounds[key]
            if not (math.isfinite(values[key]) and OPS[op](values[key], bound)):
                out.append(f"{self.name}: {key} = {values[key]:.6g}, expected {op} {bound}")
        return out

    def check(self, seed: int = 0, keys=None) -> dict[str, float]:
        """Assert the bounds (all, or those in ``keys``) at ``seed``; return the measured values."""
        values = self(seed)
        failed = self.failures(values, keys)
        assert not failed, "\n".join(failed) + "\n(see tests/margins.md for the measured spread)"
        return values


def claim(**bounds: tuple[str, float]):
    """Register a claim ``measure(seed) -> {name: value}`` with a bound ``(op, value)`` per name."""
    for key, (op, _) in bounds.items():
        if op not in OPS:
            raise ValueError(f"bound {key}: op must be one of {sorted(OPS)}, got {op!r}")

    def register(measure):
        name = f"{measure.__module__}::{measure.__name__}"
        CLAIMS[name] = Claim(name, measure, dict(bounds))
        return CLAIMS[name]

    return register


def load_all() -> dict[str, Claim]:
    """Import every test module, so that every claim is registered."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for path in sorted(HERE.glob("test_*.py")):
        importlib.import_module(path.stem)
    return CLAIMS


def summarize(claim_: Claim, runs: list[dict]) -> list[dict]:
    """One row per bounded value: mean, spread, worst, and how many standard deviations of room."""
    rows = []
    for key, (op, bound) in claim_.bounds.items():
        values = [r["values"][key] for r in runs]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        worst = max(values) if op.startswith("<") else min(values)
        room = bound - mean if op.startswith("<") else mean - bound
        z = room / std if std > 0 else (math.inf if room > 0 else -math.inf)
        rows.append(dict(claim=claim_.name, value=key, op=op, bound=bound, mean=mean, std=std, worst=worst,
                         z=z, runs=len(values), ok=all(OPS[op](v, bound) for v in values) and z >= Z_REQUIRED))
    return rows


def render(record: dict) -> str:
    lines = [
        "# Measured margins of the claim tests",
        "",
        "Written by `make margins` (`tests/margins.py`): each claim measured at every seed and torch "
        "thread count of its row (data and initialisation both follow the seed). "
        f"`z` is the distance from the mean to the bound in standard deviations (required: >= {Z_REQUIRED:g}); "
        "`worst` is the worst single run. A claim whose runs do not depend on the seed has std 0 and z inf.",
        "",
        "| claim | value | bound | mean | std | worst | z | seeds x threads | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    machines = set()
    for name in sorted(record["claims"]):
        entry = record["claims"][name]
        machines.add(f"{entry['machine']}, {entry['date']}")
        for r in entry["rows"]:
            z = "inf" if math.isinf(r["z"]) else f"{r['z']:.1f}"
            lines.append(
                f"| `{r['claim']}` | {r['value']} | {r['op']} {r['bound']:g} | {r['mean']:.4g} | {r['std']:.2g} "
                f"| {r['worst']:.4g} | {z} | {len(entry['seeds'])} x {entry['threads']} | {'yes' if r['ok'] else '**no**'} |"
            )
    lines += ["", "Measured on: " + "; ".join(sorted(machines)) + "."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    import platform

    import torch

    parser = argparse.ArgumentParser(description="Measure every claim over seeds and thread counts.")
    parser.add_argument("-k", default="", help="only claims whose name contains this")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2 (a spread needs two runs), got {args.seeds}")

    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    chosen = {n: c for n, c in load_all().items() if args.k in n}
    if not chosen:
        parser.error(f"no claim matches -k {args.k!r}; claims: {', '.join(sorted(CLAIMS))}")
    measured = {}
    for name, c in chosen.items():
        runs = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            for seed in range(args.seeds):
                start = time.perf_counter()
                values = {k: float(v) for k, v in c.measure(seed).items()}
                runs.append({"seed": seed, "threads": threads, "values": values,
                             "seconds": round(time.perf_counter() - start, 1)})
                print(f"{name} seed {seed} threads {threads}: "
                      + ", ".join(f"{k}={values[k]:.4g}" for k in c.bounds), flush=True)
        measured[name] = {"rows": summarize(c, runs), "runs": runs, "seeds": list(range(args.seeds)),
                          "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "machine": machine}
    # read the record only now, so that runs of other claims in parallel (-k) keep their rows
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"claims": {}}
    record["claims"].update(measured)
    record["claims"] = {n: v for n, v in record["claims"].items() if n in CLAIMS}  # drop claims that are gone
    table = render(record)
    print(table)
    if not args.dry_run:
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        TABLE.write_text(table)
    return 0 if all(r["ok"] for n in chosen for r in measured[n]["rows"]) else 1


if __name__ == "__main__":
    sys.modules["margins"] = sys.modules[__name__]  # the test modules' `from margins import claim`
    raise SystemExit(main())
