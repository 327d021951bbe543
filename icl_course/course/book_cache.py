"""The book's execution cache: rebuild only what changed, and run the notebooks one per core.

``make book`` calls this before ``jupyter-book build``. The book executes its notebooks through
jupyter-cache (``execute_notebooks: cache`` in ``_config.yml``), which reuses a notebook's stored
outputs while its code is unchanged. Outputs also depend on what the code does not show: the profile
(``ICL_COURSE_PROFILE``), the device, and the package (its code, its shipped weights, torch's version).
So the cache carries a key made of those, and a cache made under another key is emptied first: outputs
made under another profile, device or package version are never reused.

Then every notebook the cache does not hold is executed here, one per core with one torch thread
each, so a first build uses both cores; ``jupyter-book build`` then finds them all cached (and
executes the book's Markdown pages, which take seconds, itself). A notebook past its time limit is
stopped and tried again; one stopped twice is left to the book build.

    python -m icl_course.course.book_cache [_build/.jupyter_cache]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

import icl_course
from icl_course import runtime
from icl_course.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "_build" / ".jupyter_cache"  # where _config.yml (execute: cache) points
KEY_FILE = "icl-course-key"
TIMEOUT = 1200  # seconds per notebook, as _config.yml's execute: timeout


def cache_key(root: Path = ROOT) -> str:
    """What a notebook's outputs depend on beyond its code: profile, device, package and torch."""
    digest = hashlib.sha256()
    for part in (runtime.get_profile(), runtime.get_device().type, icl_course.__version__, torch.__version__):
        digest.update(f"{part}\n".encode())
    package = root / "icl_course"
    for path in sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".pt", ".json")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def book_notebooks(root: Path = ROOT) -> list[Path]:
    """The .ipynb pages of the book: each topic's chapter and exercise page (tests/test_layout.py
    checks that _toc.yml lists exactly these)."""
    return [root / folder / f"{topic.stem}.ipynb" for folder in ("chapters", "exercises/book") for topic in TOPICS]


def _measured(root: Path) -> dict | None:
    """This profile's chapter times in timings.json, or None for a profile never measured."""
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}
    return timings.get(runtime.get_profile(), {}).get("chapters")


def measured_seconds(notebook: Path, root: Path = ROOT) -> float | None:
    """``notebook``'s chapter time in this profile (timings.json), or None: an exercise page, a chapter
    not measured, or a profile never measured."""
    return (_measured(root) or {}).get(notebook.stem) if notebook.parent.name == "chapters" else None


def time_limit(notebook: Path, root: Path = ROOT) -> float | None:
    """Seconds one execution of ``notebook`` may take before it is stopped and tried again: three times
    its chapter's measured time in this profile (timings.json) plus two minutes; ten minutes for an
    exercise page or a chapter not measured in a measured profile; four minutes for any page in the
    smoke profile (seconds each); no limit in a profile never measured."""
    if runtime.get_profile() == "smoke":
        return 240.0
    if _measured(root) is None:
        return None
    seconds = measured_seconds(notebook, root)
    return 600.0 if seconds is None else 3 * seconds + 120


def prepare(cache_path: Path = CACHE, root: Path = ROOT, notebooks: list[Path] | None = None,
            limit: float | None = None) -> dict:
    """Empty the cache if its key changed, then execute the notebooks (default: the book's) it lacks, one
    per core. Returns what was done.

    Each notebook runs in a child process of its own (jupyter-cache's serial executor), at most
    ``limit`` seconds (default :func:`time_limit`) and then once more: under load a kernel and its
    client have been seen waiting on each other for good, which neither jupyter-cache nor nbclient
    notices before the cell timeout (20 minutes); the cause found is avoided (:func:`_execute_one`),
    the limit stays as insurance. A notebook stopped twice is left to ``jupyter-book build``, which
    executes it and shows any error."""
    from concurrent.futures import ThreadPoolExecutor

    from jupyter_cache import get_cache

    key = cache_key(root)
    key_file = Path(cache_path) / KEY_FILE
    stale = Path(cache_path).exists() and (not key_file.exists() or key_file.read_text() != key)
    if stale:
        shutil.rmtree(cache_path)
    cache = get_cache(cache_path)
    Path(cache_path).mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    wanted = {str(nb) for nb in (book_notebooks(root) if notebooks is None else notebooks)}
    for notebook in sorted(wanted):
        cache.add_nb_to_project(notebook)
    todo = [(record.pk, record.uri) for record in cache.list_unexecuted() if record.uri in wanted]
    # the longest first, so that the cores finish together (chapter 6 last left a core idle 1.5 minutes)
    todo.sort(key=lambda item: -(measured_seconds(Path(item[1]), root) or 0))

    def run(item) -> tuple[str, int]:
        pk, uri = item
        seconds = time_limit(Path(uri), root) if limit is None else limit
        command = [sys.executable, "-m", "icl_course.course.book_cache", "--execute", str(cache_path), str(pk)]
        stops = 0
        for _ in range(2):
            child = subprocess.Popen(command, cwd=root, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})  # the kernel inherits it
            try:
                child.wait(timeout=seconds)
                break
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # the child; its kernel sees its parent gone and exits
                child.wait()
                stops += 1
        return uri, stops

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        stops = dict(pool.map(run, todo))
    missing = {record.uri for record in get_cache(cache_path).list_unexecuted()} & wanted
    return {"emptied": stale, "executed": [uri for _, uri in todo if uri not in missing],
            "missing": sorted(missing), "stopped": sorted(uri for uri, n in stops.items() if n)}


def _execute_one(cache_path: Path, pk: int) -> None:
    """Execute the cache's notebook ``pk`` with jupyter-cache's serial executor (in :func:`prepare`'s child),
    without the echo that made executions hang (:func:`icl_course.course.notebooks.leave_out_output_widget_echo`)."""
    from jupyter_cache import get_cache
    from jupyter_cache.executors import load_executor

    from icl_course.course.notebooks import leave_out_output_widget_echo

    leave_out_output_widget_echo()
    load_executor("local-serial", get_cache(cache_path)).run_and_cache(filter_pks=[pk], timeout=TIMEOUT)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--execute"]:
        _execute_one(Path(argv[1]), int(argv[2]))
        return 0
    done = prepare(Path(argv[0]) if argv else CACHE)
    if done["emptied"]:
        print("book cache: made under another profile, device or package version; emptied")
    print(f"book cache: executed {len(done['executed'])} notebook(s)")
    if done["stopped"]:
        print(f"book cache: stopped past the time limit and retried: {', '.join(done['stopped'])}")
    if done["missing"]:
        print(f"book cache: not executed (jupyter-book will run them and show any error): {', '.join(done['missing'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
