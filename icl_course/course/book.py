"""The course as a whole: its path of chapters, and what the landing page shows about them.

``PLAN`` is the order of the chapters (the topics of :mod:`icl_course.topics`), ``PREREQUISITE`` the
chapter each one builds on (the dependency map of the landing page). A chapter is *in the book* when its
notebook exists. Study time is an estimate, computed from the chapter's notebook and its exercises: its
prose at ``WORDS_PER_MINUTE``, plus ``CODE_CELL_MINUTES`` per code cell, ``EQUATION_MINUTES`` per display
equation (a derivation is read slower than prose), and ``EXERCISE_MINUTES`` per exercise (a check that its
solution notebook calls). Run times come from
``timings.json``, written by ``python -m icl_course.course timings`` (``make timings``), which runs
every chapter notebook in a fresh kernel and records the wall-clock time with the machine it ran on,
and by ``python -m icl_course.course device-check`` (``make device-check``, :mod:`.device_check`) on a GPU.
Times measured on a CPU are kept under the profile's name (``quick``), on a GPU under ``quick-gpu`` and
``full-gpu`` (:func:`timings_key`); a chapter stopped at its time limit is listed under ``over``.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

from icl_course.topics import TOPICS, Topic

__all__ = ["PLAN", "PREREQUISITE", "reading_minutes", "exercise_count", "path_figure", "path_map", "chapter_table",
           "syllabus", "measure_timings", "timings_key", "merge_timings"]

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = "timings.json"
WORDS_PER_MINUTE = 200  # prose outside display equations
CODE_CELL_MINUTES = 0.5  # reading a code cell and its output
EQUATION_MINUTES = 2.0  # each display equation ($$ ... $$): following a derivation step
EXERCISE_MINUTES = 20.0  # each exercise: writing the function until its check passes


PLAN = TOPICS  # the chapters in order (icl_course.topics)
PREREQUISITE = {2: 1, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1}  # chapter -> the chapter it builds on; 1 is the root
DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", flags=re.S)


def available(chapter: Topic, root: Path = ROOT) -> bool:
    return (root / "chapters" / f"{chapter.stem}.ipynb").exists()


def reading_minutes(notebook: Path) -> float:
    """Minutes to read a notebook: its prose at WORDS_PER_MINUTE (display equations left out), plus
    CODE_CELL_MINUTES per code cell and EQUATION_MINUTES per display equation."""
    nb = json.loads(Path(notebook).read_text())
    markdown = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    words = sum(len(re.findall(r"\w+", DISPLAY_MATH.sub(" ", text))) for text in markdown)
    equations = sum(len(DISPLAY_MATH.findall(text)) for text in markdown)
    code_cells = sum(c["cell_type"] == "code" for c in nb["cells"])
    return words / WORDS_PER_MINUTE + CODE_CELL_MINUTES * code_cells + EQUATION_MINUTES * equations


def exercise_count(chapter: Topic, root: Path = ROOT) -> int:
    """How many exercises the chapter has: the checks its solution notebook calls (0 without one)."""
    from .grading import exercises_of

    source = root / "exercises" / "solutions" / f"{chapter.stem}.ipynb"
    return len(exercises_of(source)[1]) if source.exists() else 0


def _depth(number: int) -> int:
    return 0 if number not in PREREQUISITE else 1 + _depth(PREREQUISITE[number])


def _children(number: int) -> list[int]:
    return [ch.number for ch in PLAN if PREREQUISITE.get(ch.number) == number]


def path_figure(root: Path = ROOT):
    """The chapters as a dependency map: an arrow from the chapter each one builds on (PREREQUISITE).
    Chapters not yet in the book are drawn faded."""
    from matplotlib.patches import FancyBboxPatch

    from icl_course import plots

    # leaves get one row each, top to bottom in depth-first order; a parent sits at the mean of its children
    rows, leaves_placed = {}, []

    def place(number: int) -> float:
        kids = _children(number)
        if kids:
            rows[number] = sum(place(k) for k in kids) / len(kids)
        else:
            rows[number] = float(len(leaves_placed))
            leaves_placed.append(number)
        return rows[number]

    roots = [ch.number for ch in PLAN if ch.number not in PREREQUISITE]
    for r in roots:
        place(r)
    leaves = sum(not _children(n) for n in rows)
    fig, (ax,) = plots.figure(width=8.5, height=0.62 * leaves + 0.5)
    ax.set_axis_off()
    ax.grid(False)
    w, h, dx = 2.5, 0.72, 3.3
    by_number = {ch.number: ch for ch in PLAN}
    faded = False
    for number, row in rows.items():
        ch, x, y = by_number[number], _depth(number) * dx, -row
        ready = available(ch, root)
        faded |= not ready
        ax.add_patch(FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
            facecolor="#dbe9f6" if ready else "#f2f2f2", edgecolor="#2c6fad" if ready else "#bbbbbb"))
        ax.text(x, y, f"{ch.number}. {ch.idea}", ha="center", va="center", fontsize=8.5,
                color="black" if ready else "#999999")
        if number in PREREQUISITE:
            parent = PREREQUISITE[number]
            px, py = _depth(parent) * dx + w / 2, -rows[parent]
            ax.annotate("", xy=(x - w / 2 - 0.05, y), xytext=(px + 0.05, py),
                        arrowprops={"arrowstyle": "->", "color": "#555555", "connectionstyle": "arc3,rad=0"})
    depth = max(_depth(n) for n in rows)
    ax.set_xlim(-w / 2 - 0.1, depth * dx + w / 2 + 0.1)
    ax.set_ylim(-(leaves - 1) - 0.6, 0.6)
    title = "the chapters, each after the one it builds on"
    ax.set_title(title + (" (faded: not yet written)" if faded else ""), fontsize=10)
    return fig


def path_map(root: Path = ROOT) -> str:
    """The dependency map as a nested markdown list that links every chapter (the figure, in words)."""
    lines = []

    def add(number: int, level: int) -> None:
        ch = next(c for c in PLAN if c.number == number)
        link = f"[{ch.number}. {ch.title}](chapters/{ch.stem}.ipynb)"
        if not available(ch, root):
            link = f"{ch.number}. {ch.title} (not yet written)"
        after = f": builds on chapter {PREREQUISITE[number]}" if number in PREREQUISITE else ": the foundation"
        lines.append("  " * level + f"- {link}{after}")
        for k in _children(number):
            add(k, level + 1)

    for ch in PLAN:
        if ch.number not in PREREQUISITE:
            add(ch.number, 0)
    return "\n".join(lines)


def chapter_table(root: Path = ROOT) -> str:
    """A markdown table: chapter, reading time, exercises, and measured run times (quick on CPU, full on GPU)."""
    timings = json.loads((root / TIMINGS).read_text()) if (root / TIMINGS).exists() else {}
    columns = (("quick", "quick profile, CPU"), ("quick-gpu", "quick profile, GPU"), ("full-gpu", "full profile, GPU"))
    rows = ["| chapter | reading | exercises | " + " | ".join(name for _, name in columns) + " |",
            "|---|---|---|" + "---|" * len(columns)]
    for ch in PLAN:
        if not available(ch, root):
            rows.append(f"| {ch.number}. {ch.title} | not yet written | |" + " |" * len(columns))
            continue
        read = f"~{reading_minutes(root / 'chapters' / f'{ch.stem}.ipynb'):.0f} min"
        n_ex = exercise_count(ch, root)
        exercises = f"{n_ex}, ~{n_ex * EXERCISE_MINUTES:.0f} min" if n_ex else "none"
        cells = []
        for key, _ in columns:
            t = timings.get(key, {}).get("chapters", {}).get(ch.stem)
            over = timings.get(key, {}).get("over", {}).get(ch.stem)
            cells.append(f"{t / 60:.1f} min" if t is not None else f"over {over / 60:.0f} min (stopped)" if over is not None
                         else "not measured yet")
        rows.append(f"| [{ch.number}. {ch.title}](chapters/{ch.stem}.ipynb) | {read} | {exercises} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(f"*Reading: the prose at {WORDS_PER_MINUTE} words a minute, plus {CODE_CELL_MINUTES:g} min per code "
                f"cell and {EQUATION_MINUTES:g} min per displayed equation (a derivation is read more slowly than "
                f"prose). Exercises: {EXERCISE_MINUTES:g} min each, to write a function until its check passes.*")
    for key, name in columns:
        if key in timings:
            rows.append("")
            rows.append(f"*{name.capitalize()}: measured {timings[key]['date']} on {timings[key]['machine']}.*")
    return "\n".join(rows)


def syllabus(root: Path = ROOT) -> str:
    """A markdown table: one chapter a week, with the titles of its exercises."""
    from .grading import exercises_of

    rows = ["| week | chapter | exercises |", "|---|---|---|"]
    for ch in PLAN:
        source = root / "exercises" / "solutions" / f"{ch.stem}.ipynb"
        if not available(ch, root):
            rows.append(f"| {ch.number} | {ch.title} (not yet written) | |")
            continue
        titles = []
        if source.exists():
            _, exercises = exercises_of(source)
            checks = ch.checks()
            titles = [getattr(checks, e.check).exercise.split(": ", 1)[-1] for e in exercises]
        rows.append(f"| {ch.number} | [{ch.title}](chapters/{ch.stem}.ipynb) | {'; '.join(titles)} |")
    return "\n".join(rows)


def measure_timings(profile: str, root: Path = ROOT, stems=None) -> dict:
    """Run the available chapter notebooks (or those of ``stems``) in fresh kernels; record the
    wall-clock seconds."""
    known = [ch.stem for ch in PLAN if available(ch, root)]
    if stems and not set(stems) <= set(known):
        raise ValueError(f"stems must name written chapters, got {sorted(set(stems) - set(known))}; valid: {known}")
    import os

    import nbformat
    import torch

    from .notebooks import execute

    os.environ["ICL_COURSE_PROFILE"] = profile
    chapters = {}
    for ch in PLAN:
        if ch.stem in (stems or known):
            path = root / "chapters" / f"{ch.stem}.ipynb"
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            execute(nb, path.parent, timeout=3600)
            chapters[ch.stem] = round(time.perf_counter() - start, 1)
            print(f"{ch.stem}: {chapters[ch.stem]:.0f} s", file=sys.stderr)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{device}, {platform.machine()}", "chapters": chapters}


def timings_key(profile: str, gpu: bool) -> str:
    """Where ``timings.json`` keeps a profile's times: ``quick`` on a CPU, ``quick-gpu`` on a GPU."""
    return f"{profile}-gpu" if gpu else profile


def merge_timings(path: Path, key: str, measured: dict, keep_others: bool = True) -> dict:
    """Write ``measured`` (``date``, ``machine``, ``chapters`` and maybe ``over``) under ``key`` of the
    timings file at ``path``, keeping the other chapters' earlier times (``keep_others``); atomically."""
    import os
    import tempfile

    path = Path(path)
    record = json.loads(path.read_text()) if path.exists() else {}
    old = record.get(key, {}) if keep_others else {}
    merged = {**old, **measured, "chapters": {**old.get("chapters", {}), **measured.get("chapters", {})}}
    over = {k: v for k, v in {**old.get("over", {}), **measured.get("over", {})}.items() if k not in measured.get("chapters", {})}
    merged["chapters"] = {k: v for k, v in merged["chapters"].items() if k not in measured.get("over", {})}
    merged.pop("over", None)
    if over:
        merged["over"] = over
    record[key] = merged
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return record


def main() -> None:  # python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]
    if len(sys.argv) < 3 or sys.argv[1] != "timings":
        sys.exit("usage: python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]\n"
                 "       python -m icl_course.course device-check --out LOGDIR [--device cuda] [...] (see --help)")
    import torch

    measured = measure_timings(sys.argv[2], stems=sys.argv[3:])
    key = timings_key(sys.argv[2], torch.cuda.is_available())
    merge_timings(ROOT / TIMINGS, key, measured, keep_others=bool(sys.argv[3:]))  # a few chapters: keep the others' times
    print(f"wrote {ROOT / TIMINGS} ({key})", file=sys.stderr)


if __name__ == "__main__":
    main()
