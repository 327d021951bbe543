"""The ``icl-course`` command line.

    icl-course info                                  versions, device, profile
    icl-course reproduce TOPIC [--profile P] [--out DIR] [--force] [--resume]
                                                     run a chapter's experiment headless; write its
                                                     figures (PNG) and metrics.json into DIR
    icl-course reproduce TOPIC --write-weights [--weights-dir DIR] [--resume]
                                                     retrain the topic's shipped weights (with provenance)
    icl-course assign CHAPTER [CHAPTER ...] --out DIR   student versions, solutions, a README
    icl-course grade SUBMISSION.ipynb [...] [--out FILE.csv|FILE.json] [--timeout S] [--chapter C]
                                                     grade submissions in a sandbox (see
                                                     icl_course.course.grading); exit status 1 when
                                                     a submission could not be read (the gradebook
                                                     is written all the same)

``reproduce`` checks ``--out`` before it trains: not a file, a place it can write, and not a folder
that holds another run unless ``--force``. It writes the run into a hidden temporary folder beside
``--out`` (the figures, then ``metrics.json``) and moves that into place at the end (with
``--force`` the old run is replaced only then), so an error or interrupt leaves either the old
folder untouched or nothing. Ctrl-C (SIGINT) and SIGTERM stop any command with one line on stderr
and exit status 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, as shells report them.

``--resume`` makes a run that survives an interrupt: every training loop in it checkpoints every
100 steps (:func:`icl_course.training.checkpointing`) into a hidden folder, ``.DIR.checkpoints``
beside ``--out`` (for ``--write-weights``: ``results/.TOPIC-weights.checkpoints``). The same command
again continues from there, and gives the same numbers as a run that was never stopped (on one
device); the folder is removed when the run has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from icl_course import __version__, topics
from icl_course.runtime import PROFILE_ENV, PROFILES, get_device, get_profile
from icl_course.training import checkpointing


def info() -> dict:
    import matplotlib
    import numpy
    import torch

    return {
        "icl_course": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
        "device": str(get_device()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "profile": get_profile(),
        "topics": [t.command for t in topics.TOPICS],
    }


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` so that the same cleanup runs."""

    signum = signal.SIGTERM


def check_out(out: Path, force: bool = False) -> None:
    """Refuse an ``--out`` that is a file, lies where nothing can be written, or holds another run."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if out.is_dir():
        if not force and any(out.iterdir()):
            raise ValueError(f"--out {out} already holds files (another run?): pass --force to replace it")
        base = out.parent
    else:
        base = next(p for p in out.parents if p.exists())
        if not base.is_dir():
            raise ValueError(f"--out {out} lies under {base}, which is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {base} (permission denied)")


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C and SIGTERM until the block is done (then deliver them), so it is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    handlers = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def checkpoints_of(out: Path) -> Path:
    """Where ``reproduce(..., resume=True)`` keeps the checkpoints of the run bound for ``out``."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.checkpoints"


@contextmanager
def _resumable(folder: Path | None):
    """Train under :func:`checkpointing` into ``folder`` (``None``: as usual); remove it once the block is done."""
    if folder is None:
        yield
        return
    with checkpointing(folder):
        yield
    shutil.rmtree(folder, ignore_errors=True)


def reproduce(topic: str, profile: str | None, out: Path, progress: bool = True, force: bool = False,
              resume: bool = False) -> dict:
    """Run ``topic``'s experiment; write one PNG per figure and ``metrics.json`` into ``out``.

    ``out`` is checked first (:func:`check_out`); the run is written into a temporary folder beside it
    and moved into place at the end, replacing an old run only if ``force``. On an error or interrupt
    ``out`` is left as it was and the temporary folder is removed. With ``resume``, training
    checkpoints into :func:`checkpoints_of` ``(out)`` and continues from what an interrupted run left
    there; those checkpoints are kept on an interrupt and removed at the end.
    """
    out = Path(out)
    check_out(out, force)
    topic = topics.get(topic).command
    experiment = topics.get(topic).experiment()
    profile = get_profile(profile)
    folder = checkpoints_of(out) if resume else None
    created = [p for p in reversed(out.parents) if not p.exists()]
    staging = out.parent / f".{out.name}.{os.getpid()}-{time.time_ns() % 10**6}.partial"  # hidden, beside out
    old = staging.with_suffix(".old")
    try:  # the folders are made inside the try: an interrupt just after mkdir still reaches the cleanup below
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        except OSError as err:
            raise ValueError(f"--out {out}: cannot write there ({err.strerror or err})") from None
        start = time.perf_counter()
        with _resumable(folder):
            result = experiment.run(profile=profile, progress=progress)
        metrics = {"topic": topic, **result.metrics, "total_seconds": time.perf_counter() - start}
        for name, fig in result.figures().items():
            fig.savefig(staging / f"{name}.png", dpi=120)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        with _signals_deferred():
            if out.exists():  # an empty folder, or with force the old run: set aside until the new one is in
                if not force and any(out.iterdir()):
                    raise ValueError(f"--out {out} was filled while this run ran: pass --force to replace it")
                os.rename(out, old)
            try:
                os.rename(staging, out)
            except OSError:
                if old.exists():
                    os.rename(old, out)
                raise
    finally:
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
        if not out.exists():  # and the folders made for it, if still empty
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break
    return metrics


def _check_gradebook(out: Path) -> None:
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'gradebook.csv'}")
    if out.suffix not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {out.name}")
    parent = Path(os.path.abspath(out)).parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {parent} (permission denied)")


def _on_sigterm(signum, frame):
    raise Terminated()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icl-course", description="Companion tools of the course.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and profile")
    rep = sub.add_parser("reproduce", help="run a chapter's experiment headless")
    rep.add_argument("topic", help=f"one of: {', '.join(t.command for t in topics.TOPICS)} (or a chapter number)")
    rep.add_argument("--profile", choices=[*PROFILES, "auto"], default=None, help=f"default: ${PROFILE_ENV} or auto")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default: results/TOPIC)")
    rep.add_argument("--force", action="store_true", help="replace the run already in --out")
    rep.add_argument("--resume", action="store_true",
                     help="checkpoint the training, and continue from what an interrupted --resume run left")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.add_argument("--write-weights", action="store_true",
                     help="instead: retrain the topic's shipped pretrained weights and write them with provenance")
    rep.add_argument("--weights-dir", type=Path, default=None, help="where --write-weights writes (default: the package)")
    asg = sub.add_parser("assign", help="write student versions and solutions of chapters' exercises")
    asg.add_argument("chapters", nargs="+", help="exercise notebooks by number or name, e.g. 1 or 01_gd_step")
    asg.add_argument("--out", type=Path, required=True, help="output folder")
    grd = sub.add_parser("grade", help="grade submitted exercise notebooks")
    grd.add_argument("submissions", nargs="+", type=Path)
    grd.add_argument("--out", type=Path, default=None, help="write a gradebook: FILE.csv or FILE.json")
    grd.add_argument("--timeout", type=float, default=120.0, help="seconds per submission (default 120)")
    grd.add_argument("--chapter", default=None, help="which exercises (default: read from each notebook)")
    return parser


def _grade(args) -> int:
    from . import grading

    if args.out is not None:
        _check_gradebook(args.out)
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    results = grading.grade_all(args.submissions, timeout=args.timeout, chapter=args.chapter)
    print(grading.table(results))
    if args.out is not None:
        grading.write_report(results, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    unreadable = [r.student for r in results if r.status == "unreadable"]
    if unreadable:
        print(f"icl-course grade: could not read {len(unreadable)} submission(s): {', '.join(unreadable)}",
              file=sys.stderr)
        return 1
    return 0


def _write_weights(args) -> None:
    experiment = topics.get(args.topic).experiment()
    if not hasattr(experiment, "write_weights"):
        raise ValueError(f"topic {args.topic!r} ships no pretrained weights")
    folder = Path(os.path.abspath("results")) / f".{args.topic}-weights.checkpoints" if args.resume else None
    with _resumable(folder):
        records = experiment.write_weights(folder=args.weights_dir, progress=not args.quiet)
    for record in records:
        print(json.dumps(record.get("metrics", record), sort_keys=True))


def _command(args, out: Path | None) -> int:
    if args.command == "info":
        for key, value in info().items():
            print(f"{key:>11}: {value}")
    elif args.command == "assign":
        from .notebooks import assign

        for path in assign(args.chapters, args.out):
            print(f"wrote {path}")
    elif args.command == "grade":
        return _grade(args)
    elif args.write_weights:
        _write_weights(args)
    else:
        metrics = reproduce(args.topic, args.profile, out, progress=not args.quiet, force=args.force, resume=args.resume)
        print(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"wrote {out}/metrics.json and figures", file=sys.stderr)
    return 0


def _stopped(args, out: Path | None, signum: int) -> int:
    """One line on stderr for a command stopped by a signal; the exit status a shell reports for it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # end a progress bar's line now, not after ours
        bar.close()
    left = f": {out} was left as it was" if out is not None and not args.write_weights else ""
    if args.command == "reproduce":
        left += ("; run the same command again to continue from its checkpoints" if args.resume
                 else "; add --resume to make a run that can be continued")
    print(f"icl-course {args.command}: stopped by {signal.Signals(signum).name}{left}", file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out = (args.out or Path("results") / args.topic) if args.command == "reproduce" else None
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        status = _command(args, out)
    except ValueError as err:
        parser.error(str(err))
    except KeyboardInterrupt as err:
        return _stopped(args, out, getattr(err, "signum", signal.SIGINT))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if sigterm is None else sigterm)
    return status or 0


if __name__ == "__main__":
    raise SystemExit(main())
