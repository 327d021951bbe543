"""Notebook tooling: student versions of the exercises, and the Colab header of every notebook.

**One source.** An exercise notebook is written once, with its solutions, in
``exercises/solutions/``. Solution code sits between marker lines::

    def best_step_size(batch):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

and written answers between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` in markdown.
:func:`student_version` replaces each marked block with a stub (``raise NotImplementedError`` at
the block's indentation, or a prompt in markdown) and drops every output, so the student version
runs top to bottom and every check reports "not implemented".

**Three versions, one source.** ``exercises/NN_*.ipynb`` is the student version (Colab, handouts).
``exercises/book/NN_*.ipynb`` is the book's page for self-learners (:func:`book_version`): each
solution folded under "Show a solution" after the starting code the student gets, each written answer
folded under "A possible answer". ``exercises/solutions/`` is the source and the instructor's copy.

**One repository URL, one release.** ``_config.yml`` (``repository.url``) holds the URL; every
notebook starts with an Open-in-Colab badge and an install cell made from it by :func:`colab_header`,
both pinned to the release tag of the package's version (``v`` + ``icl_course.__version__``), so the
notebook Colab opens and the package it installs are the same release.

Command line (``make exercises`` runs the first)::

    python -m icl_course.course.notebooks student exercises/solutions exercises
    python -m icl_course.course.notebooks book exercises/solutions exercises/book
    python -m icl_course.course.notebooks header chapters exercises/solutions
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import icl_course
from icl_course import topics

__all__ = [
    "student_version", "book_version", "has_solution", "colab_header", "stamp_header", "read", "write", "repository_url",
    "exercise_sources", "resolve_exercise", "assign", "execute", "leave_out_output_widget_echo",
]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
STUB = 'raise NotImplementedError("your code here")'
MD_STUB = "*Write your answer here.*"
HEADER_TAG = "colab-header"  # cell tag of the badge and install cells


def leave_out_output_widget_echo() -> None:
    """Make this process's nbclient keep what Output widgets (``interact``) draw without echoing it to the kernel.

    nbclient stands in for ipywidgets' Output widget and echoes each of its outputs back to the kernel
    on the shell channel, from the task that reads IOPub, while another task awaits the cell's
    execute_reply on that same socket. Now and then that reply is never seen (the kernel's debug log
    shows it sent), and kernel and client wait on each other for good: 21 of 196 smoke notebook runs,
    four at a time on two cores, hung so (ipykernel 6.31 and 7.4), in the chapters with ``interact``;
    with the echo left out, none of 210. A static execution does not need the echo: nbclient keeps the
    widget's outputs in the notebook's widget state itself, which the book shows."""
    from nbclient.output_widget import OutputWidget

    OutputWidget.sync_state = lambda self: None


def execute(nb, folder, timeout: float | None = None):
    """Execute ``nb`` in place in a fresh python3 kernel working in ``folder`` (``timeout``: seconds a cell
    may take), as the timings, the device check and the Colab test do; see :func:`leave_out_output_widget_echo`."""
    from nbclient import NotebookClient

    leave_out_output_widget_echo()
    return NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()


def read(path) -> dict:
    return json.loads(Path(path).read_text())


def write(nb: dict, path) -> None:
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def cell_source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _set_source(cell, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def _replace_blocks(text: str, begin: str, end: str, stub: str, code: bool) -> str:
    out, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == begin:
            indent = line[: len(line) - len(line.lstrip())]
            j = i + 1
            while j < len(lines) and lines[j].strip() != end:
                j += 1
            if j == len(lines):
                raise ValueError(f"a {begin!r} block has no {end!r}")
            out.append(f"{indent}{stub}\n" if code else f"{stub}\n")
            i = j + 1
        else:
            out.append(line)
            i += 1
    return "".join(out)


def student_version(nb: dict) -> dict:
    """The notebook with every solution block replaced by a stub and all outputs removed."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        text = cell_source(cell)
        if cell["cell_type"] == "code":
            _set_source(cell, _replace_blocks(text, BEGIN, END, STUB, code=True))
            cell["outputs"], cell["execution_count"] = [], None
        elif cell["cell_type"] == "markdown":
            _set_source(cell, _replace_blocks(text, MD_BEGIN, MD_END, MD_STUB, code=False))
        cell.get("metadata", {}).pop("solution", None)
    return nb


BOOK_NOTE = """```{{tip}}
This page shows the exercises **with their solutions folded away**: each exercise shows the code you
start from, then *Show a solution* and the check's verdict on it. Try each one before unfolding it. To
work on them, open the [student version in Colab]({colab}) (or the badge above), or download
`exercises/{name}` from the repository.
```"""


def _without_markers(text: str, begin: str, end: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if line.strip() not in (begin, end))


def _fold_answers(text: str) -> str:
    """Written answers between the markdown markers, folded in an HTML ``<details>`` block."""
    opened = "<details><summary>A possible answer</summary>\n\n"
    return text.replace(MD_BEGIN, opened).replace(MD_END, "\n</details>")


def book_version(nb: dict, name: str, url: str) -> dict:
    """The book's page of an exercise notebook ``name`` (e.g. ``"01_gd_step.ipynb"``): the starting code
    of each exercise shown as code, its solution in a folded cell that runs (so the page shows the
    check's verdict), written answers folded; links one folder deeper."""
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb["cells"]:
        text = cell_source(cell)
        if cell["cell_type"] == "markdown":
            text = _fold_answers(text).replace("](../", "](../../")
            _set_source(cell, text)
        elif BEGIN in text:
            start = _replace_blocks(text, BEGIN, END, STUB, code=True)
            cells.append({"cell_type": "markdown", "id": f"{cell['id']}-start"[:64], "metadata": {},
                          "source": f"```python\n{start.rstrip()}\n```".splitlines(keepends=True)})
            _set_source(cell, _without_markers(text, BEGIN, END))
            meta = cell.setdefault("metadata", {})
            meta["tags"] = [*meta.get("tags", []), "hide-input"]
            meta["mystnb"] = {"code_prompt_show": "Show a solution", "code_prompt_hide": "Hide the solution"}
        cell.get("metadata", {}).pop("solution", None)
        cells.append(cell)
        if cell["cell_type"] == "markdown" and cell_source(cell).startswith("# "):  # after the title
            colab = f"https://colab.research.google.com/github/{_github(url)}/blob/{release_ref()}/exercises/{name}"
            cells.append({"cell_type": "markdown", "id": "book-note", "metadata": {},
                          "source": BOOK_NOTE.format(colab=colab, name=name).splitlines(keepends=True)})
    nb["cells"] = cells
    return nb


def has_solution(nb: dict) -> bool:
    """Whether any solution marker is left anywhere in the notebook (sources or metadata)."""
    blob = json.dumps(nb)
    return any(marker in blob for marker in (BEGIN, END, MD_BEGIN, MD_END))


def repository_url(config_path="_config.yml") -> str:
    """The repository URL from the book's ``_config.yml`` (``repository: url:``)."""
    text = Path(config_path).read_text()
    match = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+url:\s*(\S+)", text, flags=re.M)
    if not match:
        raise ValueError(f"{config_path} has no repository url")
    return match.group(1).strip("\"'")


def release_ref() -> str:
    """The git tag of this version of the course (the README's release checklist makes it)."""
    return f"v{icl_course.__version__}"


def _github(url: str) -> str:
    return url.removeprefix("https://github.com/").rstrip("/")


def colab_header(relpath: str, url: str) -> list[dict]:
    """The two first cells of a notebook at ``relpath`` (relative to the repository root). The badge of
    an exercise's book page opens its student version: Colab is where students work."""
    relpath, ref = relpath.replace("exercises/book/", "exercises/"), release_ref()
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{_github(url)}/blob/{ref}/{relpath})"
    )
    install = (
        "# Installs the course package on Colab (or wherever it is missing); nothing otherwise.\n"
        "import importlib.util\nimport subprocess\nimport sys\n\n"
        'if importlib.util.find_spec("icl_course") is None:\n'
        f'    package = "icl-course[widgets] @ git+{url}@{ref}"\n'
        '    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", package])'
    )
    return [
        {"cell_type": "markdown", "id": "colab-badge", "metadata": {"tags": [HEADER_TAG]},
         "source": badge.splitlines(keepends=True)},
        # the book leaves the install cell out of its pages (remove-cell): it serves Colab, not the reader
        {"cell_type": "code", "id": "colab-install", "metadata": {"tags": [HEADER_TAG, "remove-cell"]},
         "source": install.splitlines(keepends=True), "outputs": [], "execution_count": None},
    ]


def stamp_header(nb: dict, relpath: str, url: str) -> dict:
    """Replace (or add) the tagged header cells of ``nb``."""
    nb = copy.deepcopy(nb)
    body = [c for c in nb["cells"] if HEADER_TAG not in c.get("metadata", {}).get("tags", [])]
    nb["cells"] = colab_header(relpath, url) + body
    return nb


def exercise_sources(root: Path | None = None) -> dict[str, Path]:
    """The exercise sources (with solutions) by stem, e.g. ``{"01_gd_step": Path(...)}``."""
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    folder = root / "exercises" / "solutions"
    if not folder.is_dir():
        raise ValueError(f"no exercise sources at {folder}: run from a clone of the course repository")
    return {p.stem: p for p in sorted(folder.glob("*.ipynb"))}


def resolve_exercise(name: str, sources: dict[str, Path]) -> str:
    """The stem for ``name``: the stem itself, its number (``1``, ``01``), its topic (``gd_step``,
    ``gd-step``) or an earlier stem of the chapter (``03_momentum``); see :func:`icl_course.topics.get`."""
    try:
        stem = topics.get(name).stem
    except ValueError:
        stem = None
    if stem not in sources:
        raise ValueError(f"chapter must be one of {sorted(sources)} (or their numbers), got {name!r}")
    return stem


STUDENT_README = """# Exercises: {chapters}

Each notebook has exercises: a function to write, followed by a check that runs your function on fresh
random inputs and tells you what is wrong (or that it is right). The notebook runs top to bottom
whether you have finished or not.

## On Google Colab (recommended)
1. Go to https://colab.research.google.com, choose *File -> Upload notebook*, and pick the notebook.
2. Optional: *Runtime -> Change runtime type -> GPU*. The exercises run fine on a CPU.
3. Run the first code cell: it installs the course package. Then work through the exercises.
4. When done: *File -> Download -> Download .ipynb*.

## Locally
`pip install "icl-course[widgets] @ git+{url}@{ref}"`, then open the notebook in Jupyter.

## Submitting
Submit the `.ipynb` file, named after yourself (e.g. `ada_lovelace.ipynb`), as your instructor asks.
Keep the function names, and do not worry about the check cells: grading runs its own checks on your
functions with new random inputs, so every answer must be computed, not pasted.
"""


def assign(chapters: list[str], out: Path, root: Path | None = None) -> list[Path]:
    """Write student versions to ``out/student`` (with a README) and solutions to ``out/solutions``."""
    sources = exercise_sources(root)
    stems = [resolve_exercise(c, sources) for c in chapters]
    url = repository_url(Path(root or Path(__file__).resolve().parents[2]) / "_config.yml")
    out = Path(out)
    (out / "student").mkdir(parents=True, exist_ok=True)
    (out / "solutions").mkdir(parents=True, exist_ok=True)
    written = []
    for stem in stems:
        source = read(sources[stem])
        student = stamp_header(student_version(source), f"exercises/{stem}.ipynb", url)
        if has_solution(student):
            raise ValueError(f"{stem}: a solution marker survived; check the BEGIN/END markers")
        write(student, out / "student" / f"{stem}.ipynb")
        write(source, out / "solutions" / f"{stem}.ipynb")
        written += [out / "student" / f"{stem}.ipynb", out / "solutions" / f"{stem}.ipynb"]
    readme = out / "student" / "README.md"
    readme.write_text(STUDENT_README.format(chapters=", ".join(stems), url=url, ref=release_ref()))
    return [*written, readme]


def _main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("student", "book", "header"):
        print(__doc__.split("Command line")[1], file=sys.stderr)
        return 2
    url = repository_url()
    if argv[0] == "student":
        src, dst = Path(argv[1]), Path(argv[2])
        for path in sorted(src.glob("*.ipynb")):
            out = dst / path.name
            nb = student_version(read(path))
            write(stamp_header(nb, out.as_posix(), url), out)
            print(f"wrote {out}")
    elif argv[0] == "book":
        src, dst = Path(argv[1]), Path(argv[2])
        dst.mkdir(parents=True, exist_ok=True)
        for path in sorted(src.glob("*.ipynb")):
            out = dst / path.name
            write(stamp_header(book_version(read(path), path.name, url), out.as_posix(), url), out)
            print(f"wrote {out}")
    else:
        for folder in argv[1:]:
            for path in sorted(Path(folder).glob("*.ipynb")):
                write(stamp_header(read(path), path.as_posix(), url), path)
                print(f"stamped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
