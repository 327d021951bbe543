"""`icl-course assign` and `icl-course grade`, with planted honest, wrong and hostile submissions."""

import copy
import json

import pytest

from icl_course.course import grading, notebooks
from icl_course.course.cli import main

SOURCES = notebooks.exercise_sources()
SOURCE = notebooks.read(SOURCES["01_gd_step"])


def edited(nb, old, new):
    """A copy of ``nb`` with ``old`` replaced by ``new`` in the code cells (``old`` must occur)."""
    nb = copy.deepcopy(nb)
    hits = 0
    for cell in nb["cells"]:
        src = notebooks.cell_source(cell)
        if cell["cell_type"] == "code" and old in src:
            cell["source"] = src.replace(old, new).splitlines(keepends=True)
            hits += 1
    assert hits, f"{old!r} not in the notebook"
    return nb


def with_cell(nb, code, first=False):
    nb = copy.deepcopy(nb)
    cell = {"cell_type": "code", "metadata": {}, "source": code.splitlines(keepends=True), "outputs": [], "execution_count": None}
    nb["cells"].insert(3 if first else len(nb["cells"]), cell)
    return nb


SUBMISSIONS = {
    "solved": SOURCE,
    "untouched": notebooks.student_version(SOURCE),
    # downloaded before the topics had folders: the old import of the checks
    "old_layout": edited(SOURCE, "from icl_course.topics.gd_step import checks", "from icl_course.checks import gd_step as checks"),
    "wrong_sign": edited(SOURCE, "P[d, d] = -eta", "P[d, d] = eta"),
    "raises": with_cell(edited(SOURCE, "    Q = torch.zeros(d + 1, d + 1)\n", "    raise KeyError('oops')\n"), "1 / 0", first=True),
    "loops_forever": with_cell(SOURCE, "while True:\n    pass"),
    # Hostile: fake the checks' output, replace the check module's functions, fill the disk with
    # output, delete everything in the working directory, forge a result file and exit hard.
    "tampers": with_cell(
        edited(
            edited(SOURCE, "checks.construction_weights(construction_weights);", "print('✅ passed')"),
            "P[d, d] = -eta", "P[d, d] = 2 * eta",
        ),
        "import os, shutil\n"
        "checks.construction_weights = checks.best_step_size = lambda fn: None\n"
        "print('x' * 5_000_000)\n"
        "for f in os.listdir('.'):\n    os.remove(f)\n",
    ),
    "forges": with_cell(
        SOURCE,
        "import json, os, sys\n"
        "open(sys.argv[2], 'w').write(json.dumps({'token': 'guess', 'results': [], 'notes': []}))\n"
        "os._exit(0)",
    ),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    paths = []
    for name, nb in SUBMISSIONS.items():
        notebooks.write(nb, folder / f"{name}.ipynb")
        paths.append(folder / f"{name}.ipynb")
    results = {r.student: r for r in grading.grade_all(paths, timeout=12)}
    # the grader never touches the submissions themselves
    assert all(json.loads(p.read_text()) == SUBMISSIONS[p.stem] for p in paths)
    return results


def statuses(result):
    return [r["status"] for r in result.results]


def test_solution_scores_full_marks_and_student_version_zero(graded):
    assert statuses(graded["solved"]) == ["passed"] * 3 and graded["solved"].score == 3
    assert statuses(graded["untouched"]) == ["not implemented"] * 3 and graded["untouched"].score == 0


def test_a_notebook_with_the_old_checks_import_is_graded_as_its_chapter(graded):
    assert graded["old_layout"].chapter == "01_gd_step" and statuses(graded["old_layout"]) == ["passed"] * 3


def test_earlier_notebook_names_resolve_to_their_chapter():
    assert notebooks.resolve_exercise("03_momentum", SOURCES) == "03_mixed_noise"
    assert [notebooks.resolve_exercise(k, SOURCES) for k in ("2", "02", "preconditioning", "02_preconditioned_gd")] == ["02_preconditioning"] * 4


def test_wrong_answer_gets_its_specific_feedback(graded):
    first = graded["wrong_sign"].results[0]
    assert first["status"] == "wrong" and "minus" in first["message"]
    assert statuses(graded["wrong_sign"])[1:] == ["passed", "passed"]


def test_exceptions_are_noted_and_grading_goes_on(graded):
    result = graded["raises"]
    assert result.status == "graded"
    assert statuses(result) == ["error", "passed", "passed"] and "KeyError" in result.results[0]["message"]
    assert any("ZeroDivisionError" in note for note in result.notes)


def test_infinite_loop_times_out(graded):
    assert graded["loops_forever"].status == "timeout" and graded["loops_forever"].score == 0


def test_tampering_does_not_change_the_grade(graded):
    result = graded["tampers"]
    assert result.status == "graded"
    assert statuses(result) == ["wrong", "passed", "passed"]
    assert graded["forges"].status == "crashed" and graded["forges"].score == 0


def test_cli_grade_writes_a_gradebook(tmp_path, capsys):
    notebooks.write(SOURCE, tmp_path / "ada.ipynb")
    assert main(["grade", str(tmp_path / "ada.ipynb"), "--out", str(tmp_path / "book.json"), "--timeout", "60"]) == 0
    assert "3/3" in capsys.readouterr().out
    report = json.loads((tmp_path / "book.json").read_text())
    assert report[0]["student"] == "ada" and report[0]["score"] == 3
    with pytest.raises(SystemExit):
        main(["grade", str(tmp_path / "ada.ipynb"), "--out", str(tmp_path / "book.txt")])


def test_assign_writes_student_versions_without_solutions(tmp_path):
    assert main(["assign", "1", "--out", str(tmp_path)]) == 0
    student = notebooks.read(tmp_path / "student" / "01_gd_step.ipynb")
    text = json.dumps(student)
    assert not notebooks.has_solution(student)
    for line in ("Q[:d, :d] = torch.eye(d)", "torch.autograd.grad(y_hat.sum(), x_query)", "polynomial of degree"):
        assert line not in text  # no solution line survives, in any cell or metadata
    assert notebooks.has_solution(notebooks.read(tmp_path / "solutions" / "01_gd_step.ipynb"))
    assert "Colab" in (tmp_path / "student" / "README.md").read_text()


def test_unknown_chapter_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["assign", "42", "--out", "/tmp/never"])
    assert "01_gd_step" in capsys.readouterr().err
