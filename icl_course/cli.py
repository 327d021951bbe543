"""The ``icl-course`` command line.

    icl-course info                                  versions, device, profile
    icl-course reproduce TOPIC [--profile P] [--out DIR]
                                                     run a chapter's experiment headless; write its
                                                     figures (PNG) and metrics.json into DIR
    icl-course reproduce TOPIC --write-weights [--weights-dir DIR]
                                                     retrain the topic's shipped weights (with provenance)
    icl-course assign CHAPTER [CHAPTER ...] --out DIR   student versions, solutions, a README
    icl-course grade SUBMISSION.ipynb [...] [--out FILE.csv|FILE.json] [--timeout S] [--chapter C]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from . import __version__
from .experiments import TOPICS, load
from .runtime import PROFILE_ENV, PROFILES, get_device, get_profile


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
        "topics": sorted(TOPICS),
    }


def reproduce(topic: str, profile: str | None, out: Path, progress: bool = True) -> dict:
    """Run ``topic``'s experiment; write ``metrics.json`` and one PNG per figure into ``out``."""
    experiment = load(topic)
    profile = get_profile(profile)
    start = time.perf_counter()
    result = experiment.run(profile=profile, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"topic": topic, **result.metrics, "total_seconds": time.perf_counter() - start}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for name, fig in result.figures().items():
        fig.savefig(out / f"{name}.png", dpi=120)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icl-course", description="Companion tools of the course.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and profile")
    rep = sub.add_parser("reproduce", help="run a chapter's experiment headless")
    rep.add_argument("topic", help=f"one of: {', '.join(sorted(TOPICS))}")
    rep.add_argument("--profile", choices=[*PROFILES, "auto"], default=None, help=f"default: ${PROFILE_ENV} or auto")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default: results/TOPIC)")
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
    args = parser.parse_args(argv)

    try:
        if args.command == "info":
            for key, value in info().items():
                print(f"{key:>11}: {value}")
        elif args.command == "assign":
            from .notebooks import assign

            for path in assign(args.chapters, args.out):
                print(f"wrote {path}")
        elif args.command == "grade":
            from . import grading

            if args.out is not None and args.out.suffix not in (".csv", ".json"):
                raise ValueError(f"--out must end in .csv or .json, got {args.out.name}")
            if not args.timeout > 0:
                raise ValueError(f"--timeout must be > 0, got {args.timeout}")
            results = grading.grade_all(args.submissions, timeout=args.timeout, chapter=args.chapter)
            print(grading.table(results))
            if args.out is not None:
                grading.write_report(results, args.out)
                print(f"wrote {args.out}", file=sys.stderr)
        elif args.write_weights:
            experiment = load(args.topic)
            if not hasattr(experiment, "write_weights"):
                raise ValueError(f"topic {args.topic!r} ships no pretrained weights")
            for record in experiment.write_weights(folder=args.weights_dir, progress=not args.quiet):
                print(json.dumps(record.get("metrics", record), sort_keys=True))
        else:
            out = args.out or Path("results") / args.topic
            metrics = reproduce(args.topic, args.profile, out, progress=not args.quiet)
            print(json.dumps(metrics, indent=2, sort_keys=True))
            print(f"wrote {out}/metrics.json and figures", file=sys.stderr)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
