"""The book's execution cache: rebuild only what changed, and run the notebooks two at a time.

``make book`` calls this before ``jupyter-book build``. The book executes its notebooks through
jupyter-cache (``execute_notebooks: cache`` in ``_config.yml``), which reuses a notebook's stored
outputs while its code is unchanged. Outputs also depend on what the code does not show: the profile
(``ICL_COURSE_PROFILE``), the device, and the package (its code, its shipped weights, torch's version).
So the cache carries a key made of those, and a cache made under another key is emptied first: outputs
made under another profile, device or package version are never reused.

Then every notebook the cache does not hold is executed here, one per core with one torch thread
each, so a first build uses both cores; ``jupyter-book build`` then finds them all cached (and
executes the book's Markdown pages, which take seconds, itself).

    python -m icl_course.course.book_cache [_build/.jupyter_cache]
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def prepare(cache_path: Path = CACHE, root: Path = ROOT) -> dict:
    """Empty the cache if its key changed, then execute the notebooks it lacks. Returns what was done."""
    from jupyter_cache import get_cache
    from jupyter_cache.executors import load_executor

    key = cache_key(root)
    key_file = Path(cache_path) / KEY_FILE
    stale = Path(cache_path).exists() and (not key_file.exists() or key_file.read_text() != key)
    if stale:
        shutil.rmtree(cache_path)
    cache = get_cache(cache_path)
    Path(cache_path).mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    for notebook in book_notebooks(root):
        cache.add_nb_to_project(str(notebook))
    todo = [record.uri for record in cache.list_unexecuted()]
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernels inherit it: one torch thread each
    # local-parallel: one process per core (os.cpu_count()), each running notebooks in their own folder
    executor = load_executor("local-parallel", cache)
    result = executor.run_and_cache(timeout=TIMEOUT)
    failed = result.excepted + result.errored
    return {"emptied": stale, "executed": [uri for uri in todo if uri not in failed], "failed": failed}


def main(argv: list[str]) -> int:
    done = prepare(Path(argv[0]) if argv else CACHE)
    if done["emptied"]:
        print("book cache: made under another profile, device or package version; emptied")
    print(f"book cache: executed {len(done['executed'])} notebook(s)"
          + (f"; failed (the book build will show why): {', '.join(done['failed'])}" if done["failed"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
