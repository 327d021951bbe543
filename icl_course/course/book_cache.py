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

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "_build" / ".jupyter_cache"  # where _config.yml (execute: cache) points
KEY_FILE = "icl-course-key"
WORKERS = 2
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
    """The .ipynb pages of the book, in the order of _toc.yml."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").exists()]


def prepare(cache_path: Path = CACHE, root: Path = ROOT, workers: int = WORKERS) -> dict:
    """Empty the cache if its key changed, then execute the notebooks it lacks. Returns what was done."""
    from jupyter_cache import get_cache
    from jupyter_cache.executors import load_executor

    key = cache_key(root)
    key_file = Path(cache_path) / KEY_FILE
    stale = key_file.exists() and key_file.read_text() != key
    if stale or (Path(cache_path).exists() and not key_file.exists()):
        shutil.rmtree(cache_path)
    cache = get_cache(cache_path)
    Path(cache_path).mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    for notebook in book_notebooks(root):
        cache.add_nb_to_project(str(notebook))
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernels inherit it: one thread each, `workers` at a time
    # local-parallel: one process per core (os.cpu_count()), each running notebooks in their own folder
    executor = load_executor("local-parallel" if workers > 1 else "local-serial", cache)
    result = executor.run_and_cache(timeout=TIMEOUT)
    return {"emptied": stale, "executed": result.succeeded, "failed": result.excepted + result.errored}


def main(argv: list[str]) -> int:
    done = prepare(Path(argv[0]) if argv else CACHE)
    if done["emptied"]:
        print("book cache: made under another profile, device or package version; emptied")
    print(f"book cache: executed {len(done['executed'])} notebook(s)"
          + (f"; failed (the book build will show why): {', '.join(done['failed'])}" if done["failed"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
