"""The one-shot device check rehearsed on the CPU: ``device-check --device cpu --dry-run`` on one chapter."""

import json

import pytest

from icl_course.course import book, device_check


def test_dry_run_on_the_cpu_runs_tests_and_a_chapter_and_resumes(tmp_path):
    out, timings = tmp_path / "logs", tmp_path / "timings.json"
    args = ["--out", str(out), "--device", "cpu", "--dry-run", "--chapters", "01_gd_step", "--workers", "1",
            "--tests", "tests/test_device_sampling.py", "--timings", str(timings)]
    assert device_check.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["steps"]) == {"tests", "smoke-01_gd_step"}
    assert all(r["status"] == "passed" and r["seconds"] > 0 for r in results["steps"].values())
    assert "passed" in (out / "logs" / "tests.log").read_text() and (out / "logs.tar.gz").stat().st_size > 0
    assert not timings.exists()  # a dry run measures nothing for the landing page
    # stopped and started again: what is done is skipped
    assert device_check.main(args) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == results["steps"]


def test_a_step_over_its_limit_is_stopped_and_recorded(tmp_path):
    import sys

    step = {"name": "sleepy", "command": [sys.executable, "-c", "import time; time.sleep(60)"], "limit": 1.0,
            "env": {}, "profile": "quick", "stem": "01_gd_step"}
    result = device_check.run_step(step, tmp_path / "sleepy.log")
    assert result["status"] == "over" and result["seconds"] == 1.0 and result["returncode"] is None


def test_merge_fills_the_landing_pages_gpu_columns(tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    steps = {"quick-01_gd_step": {"status": "passed", "seconds": 42.0, "limit": 300, "profile": "quick", "stem": "01_gd_step"},
             "full-01_gd_step": {"status": "over", "seconds": 600, "limit": 600, "profile": "full", "stem": "01_gd_step"},
             "quick-02_preconditioning": {"status": "failed", "seconds": 3.0, "limit": 300, "profile": "quick",
                                          "stem": "02_preconditioning"}}
    (out / "results.json").write_text(json.dumps({"steps": steps, "date": "2026-12-07", "machine": "NVIDIA H100"}))
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    for stem in ("01_gd_step", "02_preconditioning"):
        (root / "chapters" / f"{stem}.ipynb").write_text(json.dumps({"cells": []}))
    (root / "timings.json").write_text(json.dumps({"quick": {"date": "2026-01-01", "machine": "a CPU",
                                                             "chapters": {"01_gd_step": 90.0}}}))
    assert device_check.main(["--out", str(out), "--merge", "--timings", str(root / "timings.json")]) == 0
    record = json.loads((root / "timings.json").read_text())
    assert record["quick-gpu"]["chapters"] == {"01_gd_step": 42.0} and record["full-gpu"]["over"] == {"01_gd_step": 600}
    assert record["quick"]["chapters"] == {"01_gd_step": 90.0}  # the CPU's times stay
    row = next(line for line in book.chapter_table(root).splitlines() if "chapters/01_gd_step" in line)
    assert row.endswith("| 1.5 min | 0.7 min | over 10 min (stopped) |")
    assert "NVIDIA H100" in book.chapter_table(root)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        device_check.main(["--out", str(tmp_path), "--device", "tpu"])
    with pytest.raises(SystemExit):
        device_check.main(["--out", str(tmp_path), "--chapters", "99_nothing", "--device", "cpu"])
    with pytest.raises(SystemExit):
        device_check.main(["--out", str(tmp_path), "--limit", "0", "--device", "cpu"])
