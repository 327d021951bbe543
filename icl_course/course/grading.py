"""Grading submitted exercise notebooks (``icl-course grade``).

Submissions are untrusted code, so each one runs in its own process, in its own empty temporary
folder, with a time limit, a cap on the size of files it may write, and its output sent to files of
which only the tail is read. The grade never comes from the submission's own check calls (a student
may edit or delete them): the grading process executes the notebook's code cells to define the
student's functions, then calls the package's reference checks on them itself, with fresh random
inputs, and reports the results tagged with a one-time token that the grader sent on standard input
before any student code ran.

Which function each check grades comes from the exercise's one source, the solution notebook in
``exercises/solutions/`` (its cells call ``checks.<check>(<function>)``).

Statuses per exercise: ``passed``, ``wrong`` (with the check's feedback), ``not implemented``,
``error`` (the function raised), ``missing`` (no such function after running the notebook), and for
a whole submission: ``timeout``, ``crashed`` (the process died), ``unknown chapter``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from icl_course import topics

from .notebooks import cell_source, exercise_sources, read, resolve_exercise

__all__ = ["Exercise", "SubmissionResult", "grade", "grade_all", "exercises_of"]

CHECK_CALL = re.compile(r"^\s*checks\.(\w+)\((\w+)\)", re.M)
# A notebook's checks import: today's ``from icl_course.topics.NAME import checks``, or the form of
# notebooks downloaded before the topics had folders: ``from icl_course.checks import NAME``.
CHECKS_IMPORT = re.compile(
    r"from\s+icl_course\.topics\.(\w+)\s+import\s+checks\b|import\s+icl_course\.topics\.(\w+)\.checks\b"
    r"|from\s+icl_course\.checks\s+import\s+(\w+)|import\s+icl_course\.checks\.(\w+)"
)
OUTPUT_LIMIT = 20_000_000  # bytes a submission may write to any one file (RLIMIT_FSIZE)
TAIL = 2_000  # characters of a submission's output kept for the report


@dataclass(frozen=True)
class Exercise:
    check: str  # name of the check in icl_course.topics.<module>.checks
    function: str  # name of the student's function it grades


@dataclass
class SubmissionResult:
    student: str  # the submission's file name without .ipynb
    chapter: str | None  # the exercise notebook it answers, e.g. "01_gd_step"
    status: str  # "graded", "timeout", "crashed" or "unknown chapter"
    results: list[dict] = field(default_factory=list)  # per exercise: exercise, status, message
    notes: list[str] = field(default_factory=list)  # cells that raised, output tail on a crash

    @property
    def score(self) -> int:
        return sum(r["status"] == "passed" for r in self.results)


def _code(nb: dict) -> list[str]:
    return [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]


def checks_module_of(nb: dict) -> str | None:
    """The topic whose checks a notebook imports (``"gd_step"``), if any."""
    for src in _code(nb):
        match = CHECKS_IMPORT.search(src)
        if match:
            return next(g for g in match.groups() if g)
    return None


def exercises_of(source: Path) -> tuple[str, list[Exercise]]:
    """``(checks module, exercises in order)`` of one exercise source notebook."""
    nb = read(source)
    module = checks_module_of(nb)
    if module is None:
        raise ValueError(f"{source} imports no topic's checks (from icl_course.topics.NAME import checks)")
    calls = [Exercise(*m) for src in _code(nb) for m in CHECK_CALL.findall(src)]
    return module, calls


def _chapter_of(nb: dict, sources: dict[str, Path], chapter: str | None) -> str | None:
    if chapter is not None:
        return resolve_exercise(chapter, sources)
    module = checks_module_of(nb)
    for stem, path in sources.items():
        if module is not None and exercises_of(path)[0] == module:
            return stem
    return None


def grade(submission: Path, timeout: float = 120.0, chapter: str | None = None, sources=None) -> SubmissionResult:
    """Grade one submitted notebook in a separate process (see the module docstring)."""
    submission = Path(submission)
    sources = sources or exercise_sources()
    student = submission.stem
    try:
        nb = read(submission)
    except (OSError, ValueError) as err:
        return SubmissionResult(student, None, "crashed", notes=[f"cannot read the notebook: {err}"])
    stem = _chapter_of(nb, sources, chapter)
    if stem is None:
        return SubmissionResult(student, None, "unknown chapter", notes=["pass --chapter to say which exercises it answers"])
    module, exercises = exercises_of(sources[stem])
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="icl-grade-") as tmp:
        work = Path(tmp) / "work"  # the submission's working directory: nothing else lives there
        work.mkdir()
        (work / "submission.ipynb").write_text(json.dumps(nb))
        spec = {"module": module, "exercises": [asdict(e) for e in exercises]}
        result_path = Path(tmp) / "result.json"
        out_path = Path(tmp) / "output.txt"
        env = {**os.environ, "ICL_COURSE_PROFILE": "smoke", "MPLBACKEND": "Agg"}
        env.pop("ICL_COURSE_CHECK_LOG", None)
        env.pop("ICL_COURSE_CHECKS", None)
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "icl_course.course.grading", json.dumps(spec), str(result_path)],
                cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_limit_file_size,
            )
            try:
                proc.communicate(input=(token + "\n").encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                return SubmissionResult(student, stem, "timeout", notes=[f"did not finish within {timeout:g} s"])
        tail = out_path.read_bytes()[-TAIL:].decode(errors="replace")
        try:
            report = json.loads(result_path.read_text())
        except (OSError, ValueError):
            report = None
        if not report or report.get("token") != token:
            return SubmissionResult(student, stem, "crashed", notes=[f"exit code {proc.returncode}", tail])
        return SubmissionResult(student, stem, "graded", report["results"], report["notes"])


def grade_all(submissions, timeout: float = 120.0, chapter: str | None = None) -> list[SubmissionResult]:
    sources = exercise_sources()
    return [grade(Path(s), timeout=timeout, chapter=chapter, sources=sources) for s in submissions]


def table(results: list[SubmissionResult]) -> str:
    """Students by exercises plus a total, as plain text."""
    titles = list(dict.fromkeys(r["exercise"] for res in results for r in res.results))
    rows = [["student", *[f"ex{i + 1}" for i in range(len(titles))], "total", "status"]]
    for res in results:
        by_title = {r["exercise"]: r["status"] for r in res.results}  # the words of the CSV and of the checks
        rows.append([res.student, *[by_title.get(t, "-") for t in titles], f"{res.score}/{len(res.results) or len(titles)}", res.status])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [f"ex{i + 1}: {t}" for i, t in enumerate(titles)]
    return "\n".join(lines)


def write_report(results: list[SubmissionResult], path: Path) -> None:
    """CSV (one row per student and exercise) or JSON, by the file's extension.

    Written to a temporary file beside ``path`` and moved over it, so ``path`` holds the old report
    or the whole new one, never half of one.
    """
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {path.name}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", newline="") as f:
            if path.suffix == ".json":
                f.write(json.dumps([{**asdict(r), "score": r.score} for r in results], indent=2) + "\n")
            else:
                writer = csv.writer(f)
                writer.writerow(["student", "chapter", "submission_status", "exercise", "status", "message"])
                for res in results:
                    for r in res.results or [{"exercise": "", "status": "", "message": " ".join(res.notes)[:500]}]:
                        writer.writerow([res.student, res.chapter, res.status, r["exercise"], r["status"], r["message"]])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))


def _kill(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- the grading process -----------------------------------------------------------------------


def _run_submission(spec: dict, result_path: str) -> None:
    """Inside the grading process: run the cells, then the reference checks on the student's functions."""
    import contextlib

    token = sys.stdin.readline().strip()  # read before any student code runs
    sys.stdin.close()
    checks = topics.get(spec["module"]).checks()
    reference = {e["check"]: getattr(checks, e["check"]) for e in spec["exercises"]}  # before students run
    write, dumps = open, json.dumps

    nb = read("submission.ipynb")
    devnull = open(os.devnull, "w")
    namespace = {"__name__": "__main__", "display": lambda *a, **k: None}
    notes = []
    for i, src in enumerate(_code(nb)):
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            with contextlib.redirect_stdout(devnull):  # the notebook's own check calls say nothing
                exec(compile(src, f"<cell {i}>", "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - anything a cell raises is noted, grading goes on
            if isinstance(exc, KeyboardInterrupt):
                raise
            notes.append(f"code cell {i} raised {type(exc).__name__}: {str(exc)[:200]}")

    results = []
    for e in spec["exercises"]:
        fn = namespace.get(e["function"])
        title = reference[e["check"]].exercise
        if not callable(fn):
            results.append({"exercise": title, "status": "missing", "message": f"no function `{e['function']}` is defined"})
            continue
        with contextlib.redirect_stdout(devnull):
            try:
                r = reference[e["check"]](fn)
                results.append({"exercise": title, "status": r.status, "message": r.message})
            except BaseException as exc:  # noqa: BLE001
                results.append({"exercise": title, "status": "error", "message": f"{type(exc).__name__}: {exc}"})
    with write(result_path, "w") as f:
        f.write(dumps({"token": token, "results": results, "notes": notes}))


if __name__ == "__main__":
    _run_submission(json.loads(sys.argv[1]), sys.argv[2])
