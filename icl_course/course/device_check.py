"""The one-shot device check: ``python -m icl_course.course device-check --out LOGDIR`` (``make device-check``).

Meant for a session lent a GPU for a few minutes: it does the most useful things first and can be
stopped at any moment and started again, going on where it stopped.

1. ``tests``: the test suite without the notebooks, in the smoke profile, on the device (the tests
   that need CUDA run only there), within ``--test-limit`` seconds.
2. ``quick``: every chapter notebook in the ``quick`` profile, each in a fresh kernel within
   ``--limit`` seconds, timed.
3. ``full``: the same in the ``full`` profile, each within ``--full-limit`` seconds.

Each step's outcome (``status``: passed, failed or over the limit; ``seconds``; the command) is
written into ``LOGDIR/results.json`` as soon as it ends (atomically: a temporary file renamed over
it) and its output into ``LOGDIR/logs/STEP.log``; ``LOGDIR/logs.tar.gz`` bundles the logs after
every step. Steps already in ``results.json`` are skipped, so the same command continues an
interrupted check (``--redo`` runs them again). A step cut at its time limit counts as done: it is
recorded as ``over`` with the limit.

At the end (and with ``--merge`` alone, for a ``results.json`` fetched from a device machine) the
chapters' times go into ``timings.json`` under ``quick-gpu`` and ``full-gpu`` (on a CUDA device),
which the landing page's GPU columns read. A machine whose results come back only from a few files
needs ``results.json`` and ``logs.tar.gz``; keep ``results.json`` in LOGDIR to resume in a later session.

``--device cpu --dry-run`` runs the same steps on the CPU in the ``smoke`` profile and writes no
timings into the repository's ``timings.json`` (``tests/test_device_check.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from icl_course.topics import TOPICS

from .book import ROOT, TIMINGS, available, merge_timings, timings_key

__all__ = ["main", "plan", "run_step"]

RESULTS = "results.json"


def _write_json(path: Path, data) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _bundle(out: Path) -> None:
    tmp = out / ".logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out / "logs", arcname="logs")
    os.replace(tmp, out / "logs.tar.gz")


def plan(args) -> list[dict]:
    """The steps in the order they run: ``{"name", "command", "limit", "env", "profile", "stem"}``."""
    python = sys.executable
    env = {"ICL_COURSE_PROFILE": "smoke", "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the chapters pick CUDA when they see it
    steps = []
    if not args.no_tests:
        workers = ["-n", str(args.workers), "--dist", "loadfile"] if args.workers > 1 else ["-p", "no:xdist"]
        steps.append({"name": "tests", "command": [python, "-m", "pytest", "-q", "--maxfail=20", *workers, *args.tests],
                      "limit": args.test_limit, "env": env, "profile": "smoke", "stem": None})
    profiles = ["smoke"] if args.dry_run else args.profiles
    for profile in profiles:
        for ch in TOPICS:
            if args.chapters and ch.stem not in args.chapters and str(ch.number) not in args.chapters:
                continue
            if not available(ch, ROOT):
                continue
            limit = args.full_limit if profile == "full" else args.limit
            steps.append({"name": f"{profile}-{ch.stem}", "limit": limit, "profile": profile, "stem": ch.stem,
                          "env": {**env, "ICL_COURSE_PROFILE": profile},
                          "command": [python, "-m", "icl_course.course.device_check", "--run-notebook",
                                      str(ROOT / "chapters" / f"{ch.stem}.ipynb")]})
    return steps


def run_step(step: dict, log: Path) -> dict:
    """Run one step in its own process group within its limit; its output into ``log``."""
    start = time.perf_counter()
    env = {**os.environ, **step["env"], "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        f.write(f"$ {' '.join(step['command'])}\n# env: {json.dumps(step['env'])}, limit {step['limit']} s\n")
        f.flush()
        proc = subprocess.Popen(step["command"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=step["limit"])
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc, status = None, "over"
        except BaseException:  # Ctrl-C or SIGTERM: stop the step too, record nothing
            _stop(proc)
            raise
    seconds = round(time.perf_counter() - start, 1)
    return {"status": status, "returncode": rc, "seconds": step["limit"] if status == "over" else seconds,
            "limit": step["limit"], "profile": step["profile"], "stem": step["stem"], "log": f"logs/{log.name}",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def _stop(proc: subprocess.Popen) -> None:
    """End the step's process group (the notebook's kernel with it): SIGTERM, then SIGKILL."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {platform.machine()}"
    return f"CPU ({os.cpu_count()} cores), {platform.machine()}"


def merge(results: dict, timings: Path, gpu: bool) -> dict:
    """The chapters' times of ``results`` into ``timings`` (``quick-gpu``/``full-gpu`` when ``gpu``)."""
    record = {}
    for profile in ("quick", "full"):
        steps = [r for r in results["steps"].values() if r.get("profile") == profile and r.get("stem")]
        chapters = {r["stem"]: r["seconds"] for r in steps if r["status"] == "passed"}
        over = {r["stem"]: r["limit"] for r in steps if r["status"] == "over"}
        if chapters or over:
            record = merge_timings(timings, timings_key(profile, gpu), {
                "date": results["date"], "machine": results["machine"], "chapters": chapters,
                **({"over": over} if over else {})})
    return record


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m icl_course.course device-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="LOGDIR: results.json, logs/ and logs.tar.gz")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="every step in the smoke profile; timings.json untouched")
    parser.add_argument("--chapters", nargs="*", default=None, help="only these chapters (stems or numbers)")
    parser.add_argument("--profiles", nargs="*", default=["quick", "full"], choices=["quick", "full"])
    parser.add_argument("--limit", type=float, default=300, help="seconds per chapter in quick (default 300)")
    parser.add_argument("--full-limit", type=float, default=600, help="seconds per chapter in full (default 600)")
    parser.add_argument("--test-limit", type=float, default=300, help="seconds for the tests (default 300)")
    parser.add_argument("--tests", nargs="*", default=["tests"], help="what pytest runs (default: tests)")
    parser.add_argument("--no-tests", action="store_true", help="skip the test suite")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="pytest workers")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every step (default 1)")
    parser.add_argument("--redo", action="store_true", help="run the steps already in results.json again")
    parser.add_argument("--timings", type=Path, default=ROOT / TIMINGS, help="the timings file to merge into")
    parser.add_argument("--merge", action="store_true", help="only merge LOGDIR/results.json into the timings file")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    for name in ("limit", "full_limit", "test_limit"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    known = {ch.stem for ch in TOPICS} | {str(ch.number) for ch in TOPICS}
    if args.chapters and not set(args.chapters) <= known:
        parser.error(f"--chapters must name chapters, got {sorted(set(args.chapters) - known)}")
    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    results = json.loads(path.read_text()) if path.exists() else {}
    gpu = args.device == "cuda"
    if args.merge:
        if not results:
            parser.error(f"--merge: no {path}")
        merge(results, args.timings, gpu)
        print(f"merged {path} into {args.timings}", file=sys.stderr)
        return 0
    if gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here (use --device cpu for a dry run)")
    results.setdefault("steps", {})
    results.update({"device": args.device, "machine": _machine(args.device), "date": time.strftime("%Y-%m-%d"),
                    "dry_run": args.dry_run})
    for step in plan(args):
        done = results["steps"].get(step["name"])
        if done and not args.redo:
            print(f"{step['name']}: done before ({done['status']}, {done['seconds']} s), skipped", file=sys.stderr)
            continue
        print(f"{step['name']}: running (limit {step['limit']:.0f} s)", file=sys.stderr, flush=True)
        results["steps"][step["name"]] = run_step(step, out / "logs" / f"{step['name']}.log")
        _write_json(path, results)
        _bundle(out)
        r = results["steps"][step["name"]]
        print(f"{step['name']}: {r['status']} in {r['seconds']} s", file=sys.stderr, flush=True)
    _bundle(out)
    if not args.dry_run:
        merge(results, args.timings, gpu)
        print(f"merged the chapters' times into {args.timings}", file=sys.stderr)
    failed = [name for name, r in results["steps"].items() if r["status"] == "failed"]
    return 1 if failed else 0


def _run_notebook(path: str) -> None:
    """Execute a notebook in a fresh kernel (the profile comes from the environment), as ``timings`` does."""
    import nbformat

    from .notebooks import execute

    execute(nbformat.read(path, as_version=4), Path(path).parent)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run-notebook":
        _run_notebook(sys.argv[2])
    else:
        raise SystemExit(main())
