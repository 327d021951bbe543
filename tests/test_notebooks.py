"""Conventions every notebook keeps, and the exercise format (one source, student version in sync).

nbval (run by `make test` over chapters/ and exercises/) executes every notebook top to bottom in the
smoke profile; these tests check what nbval does not.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import icl_course as icl

from icl_course import checking as checks
from icl_course.course import notebooks

ROOT = Path(__file__).resolve().parent.parent
ALL = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/**/*.ipynb") if ".venv" not in p.parts and "_build" not in p.parts)
SOLUTIONS = sorted((ROOT / "exercises" / "solutions").glob("*.ipynb"))
URL = notebooks.repository_url(ROOT / "_config.yml")


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", ALL)
def test_stored_without_outputs(path):
    nb = notebooks.read(ROOT / path)
    for cell in code_cells(nb):
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path}: strip the outputs"


@pytest.mark.parametrize("path", ALL)
def test_colab_header_comes_from_the_one_repository_url(path):
    nb = notebooks.read(ROOT / path)
    assert nb["cells"][:2] == notebooks.colab_header(path, URL), (
        f"{path}: run `python -m icl_course.course.notebooks header {Path(path).parent}`"
    )


@pytest.mark.parametrize("path", ALL)
def test_badge_and_install_cell_are_pinned_to_the_release_of_pyproject(path):
    version = next(ln for ln in (ROOT / "pyproject.toml").read_text().splitlines() if ln.startswith("version"))
    version = version.split("=")[1].strip().strip('"')
    assert icl.__version__ == version, "icl_course.__version__ and pyproject.toml disagree"
    badge, install = (notebooks.cell_source(c) for c in notebooks.read(ROOT / path)["cells"][:2])
    assert f"/blob/v{version}/" in badge and "/blob/main/" not in badge
    assert f"icl-course[widgets] @ git+{URL}@v{version}" in install


def test_no_launch_buttons_only_badges():
    """Colab cannot open the book's Markdown pages, and an exercise page's own notebook holds solutions."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert not config.get("launch_buttons", {}).get("colab_url")


def test_every_chapter_and_exercise_is_in_the_book():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {ch["file"] for part in toc["parts"] for ch in part["chapters"]}
    for path in ALL:  # the book shows each exercise notebook as its page with folded solutions
        if path.startswith(("chapters/", "exercises/book/")):
            assert path.removesuffix(".ipynb") in files, f"{path} is not in _toc.yml"
        else:
            assert path.removesuffix(".ipynb") not in files, f"{path} is a handout or a source, not a page"
    for f in files:
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".ipynb", ".md")), f"_toc.yml names missing {f}"


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_student_version_is_in_sync_and_holds_no_solution(source):
    student_path = ROOT / "exercises" / source.name
    expected = notebooks.stamp_header(notebooks.student_version(notebooks.read(source)), f"exercises/{source.name}", URL)
    committed = notebooks.read(student_path)
    assert committed == expected, "regenerate the student versions with `make exercises`"
    assert notebooks.has_solution(notebooks.read(source))
    assert not notebooks.has_solution(committed)
    assert "NotImplementedError" in json.dumps(committed)


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_book_page_is_in_sync_and_folds_every_solution(source):
    nb = notebooks.read(source)
    page_path = f"exercises/book/{source.name}"
    expected = notebooks.stamp_header(notebooks.book_version(nb, source.name, URL), page_path, URL)
    page = notebooks.read(ROOT / page_path)
    assert page == expected, "regenerate the book pages with `make exercises`"
    assert not notebooks.has_solution(page), "a solution marker is left on the page"
    solved = [c for c in code_cells(nb) if notebooks.BEGIN in notebooks.cell_source(c)]
    folded = [c for c in code_cells(page) if "hide-input" in c["metadata"].get("tags", [])
              and c["metadata"]["mystnb"]["code_prompt_show"] == "Show a solution"]
    assert len(folded) == len(solved) > 0
    answers = json.dumps(nb).count(notebooks.MD_BEGIN)
    assert json.dumps(page).count("<summary>A possible answer</summary>") == answers
    assert f"blob/{notebooks.release_ref()}/exercises/{source.name}" in notebooks.cell_source(page["cells"][0]), "the badge opens the handout"


def run_code_cells(nb, monkeypatch, log, strict):
    """Execute a notebook's code cells in-process; return the check results it logged to ``log``."""
    monkeypatch.setenv("ICL_COURSE_CHECK_LOG", str(log))
    monkeypatch.setenv("ICL_COURSE_CHECKS", "strict" if strict else "")
    monkeypatch.setenv("ICL_COURSE_PROFILE", "smoke")
    namespace = {"__name__": "__main__", "display": print}
    for cell in code_cells(nb):
        exec(compile("".join(cell["source"]), "<cell>", "exec"), namespace)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_pass_every_check_and_students_start_at_zero(source, monkeypatch, tmp_path):
    solved = run_code_cells(notebooks.read(source), monkeypatch, tmp_path / "solved.jsonl", strict=True)
    assert solved and all(r["status"] == "passed" for r in solved)
    fresh = run_code_cells(notebooks.read(ROOT / "exercises" / source.name), monkeypatch, tmp_path / "fresh.jsonl", strict=False)
    assert [r["exercise"] for r in fresh] == [r["exercise"] for r in solved]
    assert all(r["status"] == "not implemented" for r in fresh)


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_a_buggy_answer_that_raises_never_stops_the_notebook(source, monkeypatch, tmp_path):
    """Every exercise answered with code that raises (not NotImplementedError): each check reports the
    error, and the cells after it (demos that call the answer) still run, so later exercises get feedback."""
    student = notebooks.read(ROOT / "exercises" / source.name)
    planted = json.loads(json.dumps(student).replace('raise NotImplementedError(\\"your code here\\")',
                                                      'raise RuntimeError(\\"planted bug\\")'))
    assert planted != student, "no stub to plant a bug in"
    results = run_code_cells(planted, monkeypatch, tmp_path / "planted.jsonl", strict=False)
    assert results and all(r["status"] == "error" and "planted bug" in r["message"] for r in results), results


def test_strict_mode_raises_on_anything_but_a_pass(monkeypatch):
    monkeypatch.setenv("ICL_COURSE_CHECKS", "strict")

    @checks.check("toy")
    def toy(student_fn, gen):
        checks.expect(student_fn() == 1, "expected 1")

    assert toy(lambda: 1).passed
    with pytest.raises(checks.CheckFailed, match="expected 1"):
        toy(lambda: 2)


def test_a_constant_factor_and_a_missing_requires_grad_get_their_own_feedback(monkeypatch):
    monkeypatch.delenv("ICL_COURSE_CHECKS", raising=False)
    want = torch.linspace(-1, 2, 7)

    @checks.check("toy")
    def toy(student_fn, gen):
        checks.expect_close("w", student_fn(), want)

    assert "off by a factor 2 everywhere" in toy(lambda: 2 * want).message
    assert "off by a factor 0.25 everywhere" in toy(lambda: want / 4).message
    assert "wrong sign everywhere" in toy(lambda: -want).message
    other = toy(lambda: want + torch.arange(7.0) ** 2 / 10)
    assert other.status == "wrong" and "factor" not in other.message and "is off at index" in other.message

    def no_grad():
        x = torch.ones(3)
        return torch.autograd.grad((x ** 2).sum(), x)[0]

    result = toy(no_grad)
    assert result.status == "error" and "requires_grad=True" in result.message


HIDDEN = ("hide-input", "remove-input", "remove-cell")


COLUMN = 90  # characters of code the book's column shows (12 px code, both sidebars, 1280 px window)


def _shown_code(nb) -> list[str]:
    """Code a reader sees: code cells not hidden as plumbing (a folded solution counts: it unfolds),
    and the ```python blocks of the text."""
    lines = []
    for c in nb["cells"]:
        text = "".join(c["source"])
        if c["cell_type"] == "code":
            folded_solution = c["metadata"].get("mystnb", {}).get("code_prompt_show") == "Show a solution"
            if folded_solution or not set(HIDDEN) & set(c["metadata"].get("tags", [])):
                lines += text.splitlines()
        else:
            for block in text.split("```python\n")[1:]:
                lines += block.split("```")[0].splitlines()
    return lines


@pytest.mark.parametrize("path", [p for p in ALL if not p.startswith("exercises/solutions/")])
def test_shown_code_fits_the_books_column(path):
    """Wider lines scroll off the column's edge (`make screenshots` reports any that do)."""
    wide = [line for line in _shown_code(notebooks.read(ROOT / path)) if len(line) > COLUMN]
    assert not wide, f"{path}: lines over {COLUMN} characters (`ruff format` wraps code):\n" + "\n".join(wide)


def test_notebook_code_is_formatted():
    """`ruff format` (configured in pyproject.toml) keeps the notebooks' code in one style that fits."""
    done = subprocess.run([sys.executable, "-m", "ruff", "format", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"run `ruff format` from the repository root:\n{done.stdout}{done.stderr}"


# --- the scaffolding of every exercise: difficulty, time, why, two hints, a capstone -------------

import re  # noqa: E402

HEADING = re.compile(r"^## Exercise (\d+): \S")
META = re.compile(r"^\*\*Difficulty\*\* (★☆☆|★★☆|★★★) · \*\*Time\*\* about (\d+) min · "
                  r"\*\*Why it matters:\*\* [^\n]+\.$")
HINT = re.compile(r"<details><summary>Hint (\d)</summary>\n\n(.+?)\n\n</details>", re.S)


def markdown(cell) -> str:
    return notebooks.cell_source(cell) if cell["cell_type"] == "markdown" else ""


def exercise_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb["cells"]) if HEADING.match(markdown(c))]


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_every_exercise_has_difficulty_time_why_and_two_hints(source):
    nb = notebooks.read(source)
    cells = exercise_cells(nb)
    solved = [c for c in code_cells(nb) if notebooks.BEGIN in notebooks.cell_source(c)]
    assert len(cells) == len(solved) >= 1, f"{source.name}: one '## Exercise K:' cell per exercise"
    for k, i in enumerate(cells, start=1):
        text = markdown(nb["cells"][i])
        lines = [line for line in text.splitlines() if line.strip()]
        assert HEADING.match(lines[0]).group(1) == str(k), f"{source.name}: exercises numbered 1, 2, ..."
        assert META.match(lines[1]), f"{source.name}, exercise {k}: second line is\n{lines[1]}"
        assert 5 <= int(META.match(lines[1]).group(2)) <= 60, f"{source.name}, exercise {k}: time"
        hints = HINT.findall(text)
        assert [h[0] for h in hints] == ["1", "2"], f"{source.name}, exercise {k}: two hint blocks"
        assert text.count("<details>") == text.count("</details>") == 2
        assert all(h[1].strip() and "<details>" not in h[1] for h in hints)
        assert text.rstrip().endswith("</details>"), f"{source.name}, exercise {k}: hints close the statement"
        assert notebooks.MD_BEGIN not in text, "students must see the hints: no solution marker around them"
        outside = HINT.sub("", text)
        assert not re.search(r"\bHint[.:*]", outside), f"{source.name}, exercise {k}: move the inline hint"
        after = nb["cells"][i + 1]  # the code cell the student fills in comes right after the hints
        assert after["cell_type"] == "code" and notebooks.BEGIN in notebooks.cell_source(after)
        assert after is solved[k - 1]


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_the_intro_announces_the_scaffolding(source):
    intro = next(markdown(c) for c in notebooks.read(source)["cells"] if markdown(c).startswith("# "))
    assert "difficulty" in intro and "two hints" in intro and "click" in intro, source.name


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_the_last_section_is_a_capstone_with_an_answer_students_do_not_see(source):
    nb = notebooks.read(source)
    headed = [i for i, c in enumerate(nb["cells"]) if re.search(r"^## ", markdown(c), re.M)]
    last = headed[-1]
    text = "\n".join(notebooks.cell_source(c) for c in nb["cells"][last:] if c["cell_type"] == "markdown")
    headings = re.findall(r"^## .*$", markdown(nb["cells"][last]), re.M)
    assert headings[-1] == "## Going further", f"{source.name}: the last section is '## Going further'"
    assert "no check" in " ".join(text.split()), f"{source.name}: say in the text that it has no check"
    assert text.count(notebooks.MD_BEGIN) >= 1, f"{source.name}: a possible answer for self-learners"
    assert re.search(r"\bmeasure", text, re.I) and re.search(r"\bexpect", text, re.I), source.name
    student = notebooks.student_version(nb)
    tail = "\n".join(notebooks.cell_source(c) for c in student["cells"][last:])
    assert notebooks.MD_BEGIN not in tail and notebooks.MD_STUB in tail


@pytest.mark.parametrize("source", SOLUTIONS, ids=lambda p: p.name)
def test_hints_do_not_hand_out_solution_lines(source):
    """A hint may point the way, not paste the answer: no solution line of 25+ characters (nor the
    right-hand side of one) reaches the student version, unless the exercise's statement itself shows
    it (a set-up line both use, say)."""
    nb = notebooks.read(source)
    solution, statement = [], []
    for cell in nb["cells"]:
        text = re.sub(r"<details>.*?</details>", "", notebooks.cell_source(cell), flags=re.S)  # hints out
        inside = False
        for line in text.splitlines():
            if line.strip() in (notebooks.BEGIN, notebooks.MD_BEGIN, notebooks.END, notebooks.MD_END):
                inside = line.strip() in (notebooks.BEGIN, notebooks.MD_BEGIN)
                continue
            (solution if inside else statement).append(line.strip())
    solution = [line for line in solution if not line.startswith("def ")]  # a signature is interface
    pieces = {line for line in solution} | {line.split(" = ", 1)[1] for line in solution if " = " in line}
    student = "\n".join(notebooks.cell_source(c) for c in notebooks.student_version(nb)["cells"])
    shown = "\n".join(statement)
    leaked = sorted(p for p in pieces if len(p) >= 25 and p not in shown and p in student)
    assert not leaked, f"solution lines in the student version (a hint?): {leaked}"
