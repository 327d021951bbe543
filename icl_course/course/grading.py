"""Grading submitted exercise notebooks (``icl-course grade``).

**Student code never shares an interpreter with the checks.** For each submission the grader starts
a worker process in a sandbox (:mod:`icl_course.course.sandbox`: no network, a private empty
working folder, read-only package, no view of the course repository or of other submissions,
limits on memory, processes, CPU and disk; the whole process tree killed at the end). The worker
(:mod:`icl_course.course.worker`) executes the notebook's code cells and then only answers calls:
the grader runs the package's reference checks *in its own process*, with fresh random inputs, and
hands each check a stand-in for the student's function. Calling it sends the function's name and
the arguments over a pipe; the worker calls the student's function and sends back its value as
plain data (tensors, numbers, strings, lists, tuples, dicts: :mod:`icl_course.course.wire`, read
with ``weights_only=True``). Objects the student's code makes (an instance of their class, a pair
of closures) stay in the worker and are used through references. Nothing secret (expected values,
the checks, solutions) ever reaches the worker, and nothing it does can change how the grader
judges: the worst it can do is return wrong values, stop answering (a timeout) or die (crashed).

Which function each check grades comes from the exercise's one source, the solution notebook in
``exercises/solutions/`` (its cells call ``checks.<check>(<function>)``).

Statuses per exercise: ``passed``, ``wrong`` (with the check's feedback), ``not implemented``,
``error`` (the function raised, or was not graded), ``missing`` (no such function after running the
notebook). Per submission: ``graded``; ``timeout`` (over ``--timeout``: exercises graded until then
keep their result); ``crashed`` (the worker died); ``killed: memory`` (over the memory limit);
``unknown chapter``; ``unreadable`` (not a notebook).

Every submission is read into memory before any student code runs, and graded in its own
``try``: one bad submission never costs the others, and the batch always ends with a gradebook.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import select
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from icl_course import topics

from . import sandbox, wire
from .notebooks import cell_source, exercise_sources, read, resolve_exercise

__all__ = ["Exercise", "SubmissionResult", "grade", "grade_all", "exercises_of"]

CHECK_CALL = re.compile(r"^\s*checks\.(\w+)\((\w+)\)", re.M)
# A notebook's checks import: today's ``from icl_course.topics.NAME import checks``, or the form of
# notebooks downloaded before the topics had folders: ``from icl_course.checks import NAME``.
CHECKS_IMPORT = re.compile(
    r"from\s+icl_course\.topics\.(\w+)\s+import\s+checks\b|import\s+icl_course\.topics\.(\w+)\.checks\b"
    r"|from\s+icl_course\.checks\s+import\s+(\w+)|import\s+icl_course\.checks\.(\w+)"
)
TAIL = 2_000  # characters of a submission's output kept for the report


@dataclass(frozen=True)
class Exercise:
    check: str  # name of the check in icl_course.topics.<module>.checks
    function: str  # name of the student's function it grades


@dataclass
class SubmissionResult:
    student: str  # the submission's file name without .ipynb
    chapter: str | None  # the exercise notebook it answers, e.g. "01_gd_step"
    status: str  # "graded", "timeout", "crashed", "killed: memory", "unknown chapter" or "unreadable"
    results: list[dict] = field(default_factory=list)  # per exercise: exercise, status, message
    notes: list[str] = field(default_factory=list)  # cells that raised, output tail on a crash
    seconds: float = 0.0  # wall time from starting its worker to its last check

    @property
    def score(self) -> int:
        return sum(r["status"] == "passed" for r in self.results)


def _code(nb: dict) -> list[str]:
    return [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]


OWN_CHECK = re.compile(r"^[ \t]*checks\.\w+\(\w+\);?[ \t]*$", re.M)


def _worker_code(nb: dict) -> list[str]:
    """The code cells the worker runs: without the notebook's own check calls, which only print
    feedback (the grade comes from the grader's checks), so the worker does not do them twice."""
    return [OWN_CHECK.sub("", src) for src in _code(nb)]


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


class _Timeout(BaseException):
    """The submission ran out of time (a BaseException: a check's ``except Exception`` lets it through)."""


class _Gone(BaseException):
    """The worker stopped answering: it died, closed its pipe, or sent something that is not a message."""


class Remote:
    """Stands in, in the grader, for an object that lives in the worker (the student's function, an
    instance of their class): calling it or reading an attribute asks the worker over the pipe."""

    __slots__ = ("_session", "_id", "_type")

    def __init__(self, session: "_Session", id: int, type_name: str):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_id", id)
        object.__setattr__(self, "_type", type_name)

    def __call__(self, *args, **kwargs):
        return self._session.ask(("call", self, args, kwargs))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._session.ask(("getattr", self, name))

    def __setattr__(self, name, value):
        raise AttributeError("objects of the submission are read-only here")

    def __repr__(self) -> str:
        return f"<{self._type} of the submission>"


_RAISED: dict[str, type] = {}


def _student_exception(name: str, message: str) -> BaseException:
    """An exception to raise in the grader for one the student's code raised in the worker: the
    check reports it by its type's name (``NotImplementedError`` is its own status)."""
    name, message = name[:100], message[:wire.MESSAGE]
    if name == "NotImplementedError":
        return NotImplementedError(message)
    if name == "AttributeError":
        return AttributeError(message)
    if not (isinstance(name, str) and name.isidentifier()):
        name = "Exception"
    if name not in _RAISED:
        _RAISED[name] = type(name, (Exception,), {"__module__": "submission"})
    return _RAISED[name](message)


class _Session:
    """The grader's end of the pipes to one worker, with the submission's deadline."""

    def __init__(self, requests: int, replies: int, deadline: float):
        self.requests, self.replies, self.deadline = requests, replies, deadline
        os.set_blocking(requests, False)

    def _wait(self, fd: int, write: bool = False) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Timeout()
        ready = select.select([], [fd], [], left)[1] if write else select.select([fd], [], [], left)[0]
        if not ready:
            raise _Timeout()

    def _send(self, payload: bytes) -> None:
        view = memoryview(wire.HEADER.pack(len(payload)) + payload)
        while view:
            self._wait(self.requests, write=True)
            try:
                n = os.write(self.requests, view)
            except BlockingIOError:
                continue
            except OSError as err:  # the worker is gone (EPIPE)
                raise _Gone(str(err)) from None
            view = view[n:]

    def ask(self, request):
        def ref_of(obj):
            return obj._id if type(obj) is Remote and obj._session is self else None

        self._send(wire.dump_request(request, ref_of))
        try:
            reply = wire.load_reply(wire.recv_bytes(self.replies, self._wait))
            kind = reply[0]
        except wire.ProtocolError as err:
            raise _Gone(str(err)) from None
        except Exception as err:  # noqa: BLE001 - not a reply torch can read safely
            raise _Gone(f"an unreadable reply ({type(err).__name__}: {str(err)[:200]})") from None
        if kind == "value":
            return self._rebuild(reply[1])
        if kind == "raised":
            raise _student_exception(str(reply[1]), str(reply[2]))
        return reply  # ("ran", notes) or ("missing", why)

    def _rebuild(self, value):
        if isinstance(value, tuple) and len(value) == 4 and value[0] == wire.REF and type(value[1]) is int:
            return Remote(self, value[1], str(value[2]))
        if type(value) in (list, tuple):
            return type(value)(self._rebuild(v) for v in value)
        if isinstance(value, dict):
            return {k: self._rebuild(v) for k, v in value.items()}
        return value


LIMITS = sandbox.Limits()


def grade(submission: Path, timeout: float = 120.0, chapter: str | None = None, sources=None,
          limits: sandbox.Limits | None = None) -> SubmissionResult:
    """Grade one submitted notebook (see the module docstring)."""
    submission = Path(submission)
    try:
        nb = _load(submission.read_bytes())
    except (OSError, ValueError) as err:
        return SubmissionResult(submission.stem, None, "unreadable", notes=[f"cannot read the notebook: {err}"])
    return grade_notebook(submission.stem, nb, timeout, chapter, sources or exercise_sources(), limits)


def _load(data: bytes) -> dict:
    nb = json.loads(data)
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) or \
            not all(isinstance(c, dict) and isinstance(c.get("cell_type"), str) for c in nb["cells"]):
        raise ValueError("not a notebook (no list of cells)")
    for cell in nb["cells"]:
        src = cell.get("source", "")
        if not (isinstance(src, str) or isinstance(src, list) and all(isinstance(x, str) for x in src)):
            raise ValueError("a cell's source is not text")
    return nb


def grade_notebook(student: str, nb: dict, timeout: float = 120.0, chapter: str | None = None,
                   sources=None, limits: sandbox.Limits | None = None) -> SubmissionResult:
    """Grade a submission already read into memory, in a sandboxed worker."""
    sources = sources or exercise_sources()
    stem = _chapter_of(nb, sources, chapter)
    if stem is None:
        return SubmissionResult(student, None, "unknown chapter", notes=["pass --chapter to say which exercises it answers"])
    module, exercises = exercises_of(sources[stem])
    checks = topics.get(module).checks()
    limits = limits or dataclasses.replace(LIMITS, cpu=int(math.ceil(timeout)) + 5)
    results: list[dict] = []
    notes: list[str] = []
    status = "graded"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryFile())  # the worker's output: no name to find
        pipes: set[int] = set()  # closed on the way out, each once (its number may be reused)
        stack.callback(lambda: [os.close(fd) for fd in pipes])
        req_r, req_w = os.pipe()
        pipes |= {req_r, req_w}
        rep_r, rep_w = os.pipe()
        pipes |= {rep_r, rep_w}
        command = [sys.executable, "-m", "icl_course.course.worker", str(req_r), str(rep_w)]
        worker = stack.enter_context(sandbox.Worker(command, limits, pass_fds=(req_r, rep_w), stdout=out))
        for fd in (req_r, rep_w):  # the worker's ends: the grader sees EOF when the worker is gone
            pipes.discard(fd)
            os.close(fd)
        session = _Session(req_w, rep_r, time.monotonic() + timeout)
        try:
            ran = session.ask(("run", _worker_code(nb)))
            if not (isinstance(ran, tuple) and ran[0] == "ran" and isinstance(ran[1], list)):
                raise _Gone("the worker's reply to running the cells is not a list of notes")
            notes += [str(note)[:300] for note in ran[1][:50]]
            for e in exercises:
                check = getattr(checks, e.check)
                found = session.ask(("lookup", e.function))
                if not isinstance(found, Remote):
                    results.append({"exercise": check.exercise, "status": "missing",
                                    "message": f"no function `{e.function}` is defined"})
                    continue
                r = check(found, report=False)
                results.append({"exercise": check.exercise, "status": r.status, "message": r.message})
        except _Timeout:
            status = "timeout"
            notes.append(f"did not finish within {timeout:g} s")
        except _Gone as why:
            oom = worker.oom()
            worker.kill()
            status = "killed: memory" if oom else "crashed"
            notes += [f"the submission's process ended ({why}); exit code {worker.returncode}", _tail(out)]
    if status != "graded":
        done = {r["exercise"] for r in results}
        results += [{"exercise": getattr(checks, e.check).exercise, "status": "error",
                     "message": f"not graded: the submission {UNFINISHED[status]}"}
                    for e in exercises if getattr(checks, e.check).exercise not in done]
    return SubmissionResult(student, stem, status, results, notes, round(time.monotonic() - started, 2))


UNFINISHED = {"timeout": "ran out of time", "crashed": "crashed", "killed: memory": "was killed for its memory"}


def _tail(out) -> str:
    out.seek(0, os.SEEK_END)
    out.seek(max(0, out.tell() - TAIL))
    return out.read().decode(errors="replace")


def grade_all(submissions, timeout: float = 120.0, chapter: str | None = None,
              limits: sandbox.Limits | None = None) -> list[SubmissionResult]:
    """Grade every submission; always one result each, whatever any of them does.

    Each file is read into memory before any student code runs (a submission cannot change a
    classmate's file in between), then graded in its own ``try``: an error of the grader on one
    submission is that submission's ``crashed`` status, and the others are graded as usual.
    """
    sources = exercise_sources()
    if chapter is not None:
        resolve_exercise(chapter, sources)  # a wrong --chapter is the instructor's error: say it first
    sandbox.warn_once()
    loaded = []
    for path in map(Path, submissions):
        try:
            loaded.append((path.stem, _load(path.read_bytes()), None))
        except (OSError, ValueError) as err:
            loaded.append((path.stem, None, f"cannot read the notebook: {err}"))
    results = []
    for student, nb, error in loaded:
        if nb is None:
            results.append(SubmissionResult(student, None, "unreadable", notes=[error]))
            continue
        try:
            results.append(grade_notebook(student, nb, timeout, chapter, sources, limits))
        except Exception as err:  # noqa: BLE001 - the grader's own failure on this one submission
            results.append(SubmissionResult(student, None, "crashed", notes=[f"the grader failed on it: {type(err).__name__}: {err}"]))
    return results


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
