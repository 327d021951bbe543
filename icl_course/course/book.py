"""The course as a whole: its path of chapters, and what the landing page shows about them.

``PLAN`` is the order of the chapters (the topics of :mod:`icl_course.topics`). A chapter is *in the book* when its notebook exists.
Reading time is computed from the words of a chapter's notebook; run times come from
``timings.json``, written by ``python -m icl_course.course timings`` (``make timings``), which runs
every chapter notebook in a fresh kernel and records the wall-clock time with the machine it ran on.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

from icl_course.topics import TOPICS, Topic

__all__ = ["PLAN", "reading_minutes", "path_figure", "chapter_table", "syllabus", "measure_timings"]

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = "timings.json"
WORDS_PER_MINUTE = 200  # prose; every code cell adds CODE_CELL_MINUTES on top
CODE_CELL_MINUTES = 0.5


PLAN = TOPICS  # the chapters in order (icl_course.topics)


def available(chapter: Topic, root: Path = ROOT) -> bool:
    return (root / "chapters" / f"{chapter.stem}.ipynb").exists()


def reading_minutes(notebook: Path) -> float:
    """Minutes to read a notebook: its prose at WORDS_PER_MINUTE plus a little per code cell."""
    nb = json.loads(Path(notebook).read_text())
    words = sum(len(re.findall(r"\w+", "".join(c["source"]))) for c in nb["cells"] if c["cell_type"] == "markdown")
    code_cells = sum(c["cell_type"] == "code" for c in nb["cells"])
    return words / WORDS_PER_MINUTE + CODE_CELL_MINUTES * code_cells


def path_figure(root: Path = ROOT):
    """The seven chapters as a path; chapters not yet in the book are drawn faded."""
    from matplotlib.patches import FancyBboxPatch

    from icl_course import plots

    fig, (ax,) = plots.figure(width=11, height=2.2)
    ax.set_axis_off()
    ax.grid(False)
    for i, ch in enumerate(PLAN):
        x = i * 1.6
        ready = available(ch, root)
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.65, -0.45), 1.3, 0.9, boxstyle="round,pad=0.05",
                facecolor="#dbe9f6" if ready else "#f2f2f2", edgecolor="#2c6fad" if ready else "#bbbbbb",
            )
        )
        color = "black" if ready else "#999999"
        ax.text(x, 0.18, f"{ch.number}", ha="center", va="center", fontsize=13, weight="bold", color=color)
        ax.text(x, -0.18, ch.idea.replace(": ", ":\n").replace(" = ", " =\n"), ha="center", va="center", fontsize=7.5, color=color)
        if i:
            ax.annotate("", xy=(x - 0.7, 0), xytext=(x - 0.9, 0), arrowprops={"arrowstyle": "->", "color": "#555555"})
    ax.set_xlim(-0.8, (len(PLAN) - 1) * 1.6 + 0.8)
    ax.set_ylim(-0.6, 0.6)
    ax.set_title("the path through the course (faded: not yet written)", fontsize=10)
    return fig


def chapter_table(root: Path = ROOT) -> str:
    """A markdown table: chapter, reading time, measured run times (quick on CPU, full on GPU)."""
    timings = json.loads((root / TIMINGS).read_text()) if (root / TIMINGS).exists() else {}
    rows = ["| chapter | reading | quick profile, CPU | full profile, GPU |", "|---|---|---|---|"]
    for ch in PLAN:
        if not available(ch, root):
            rows.append(f"| {ch.number}. {ch.title} | not yet written | | |")
            continue
        read = f"~{reading_minutes(root / 'chapters' / f'{ch.stem}.ipynb'):.0f} min"
        cells = []
        for profile in ("quick", "full"):
            t = timings.get(profile, {}).get("chapters", {}).get(ch.stem)
            cells.append(f"{t / 60:.1f} min" if t is not None else "not measured yet")
        rows.append(f"| [{ch.number}. {ch.title}](chapters/{ch.stem}.ipynb) | {read} | {cells[0]} | {cells[1]} |")
    for profile in ("quick", "full"):
        if profile in timings:
            rows.append("")
            rows.append(f"*{profile} profile measured {timings[profile]['date']} on {timings[profile]['machine']}.*")
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
    from nbclient import NotebookClient

    os.environ["ICL_COURSE_PROFILE"] = profile
    chapters = {}
    for ch in PLAN:
        if ch.stem in (stems or known):
            path = root / "chapters" / f"{ch.stem}.ipynb"
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
            chapters[ch.stem] = round(time.perf_counter() - start, 1)
            print(f"{ch.stem}: {chapters[ch.stem]:.0f} s", file=sys.stderr)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{device}, {platform.machine()}", "chapters": chapters}


def main() -> None:  # python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]
    if len(sys.argv) < 3 or sys.argv[1] != "timings":
        sys.exit("usage: python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]")
    path = ROOT / TIMINGS
    record = json.loads(path.read_text()) if path.exists() else {}
    measured = measure_timings(sys.argv[2], stems=sys.argv[3:])
    if sys.argv[3:]:  # a few chapters: keep the others' earlier times
        measured["chapters"] = {**record.get(sys.argv[2], {}).get("chapters", {}), **measured["chapters"]}
    record[sys.argv[2]] = measured
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
