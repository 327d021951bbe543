"""The landing page's and the instructors' page's tables come from the files themselves."""

import json
import re

import pytest

from icl_course.course import book as course


def test_every_chapter_notebook_is_on_the_path():
    stems = {ch.stem for ch in course.PLAN}
    on_disk = {p.stem for p in (course.ROOT / "chapters").glob("*.ipynb")}
    assert on_disk <= stems, f"add {on_disk - stems} to course.PLAN"
    assert [ch.number for ch in course.PLAN] == list(range(1, len(course.PLAN) + 1))


def test_tables(tmp_path):
    table = course.chapter_table()
    assert "[1. One linear-attention layer" in table and "min" in table
    assert "the best step size" in course.syllabus()
    # run times come from timings.json, with the machine they were measured on
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "01_gd_step.ipynb").write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["word " * 400]}, {"cell_type": "code", "source": ["1"]}]}))
    (tmp_path / "timings.json").write_text(json.dumps(
        {"quick": {"date": "2026-01-01", "machine": "test box", "chapters": {"01_gd_step": 90.0}}}))
    table = course.chapter_table(tmp_path)
    assert "| ~2 min | 1.5 min | not measured yet |" in table and "test box" in table
    assert course.reading_minutes(tmp_path / "chapters" / "01_gd_step.ipynb") == 2.5


def test_timings_reject_unknown_chapters():
    with pytest.raises(ValueError, match=r"stems must name written chapters, got \['06_loop'\].*06_looped"):
        course.measure_timings("quick", stems=["06_loop"])


def test_how_to_run_clones_the_books_repository():
    from icl_course.course.notebooks import repository_url

    url = repository_url(course.ROOT / "_config.yml")
    assert f"git clone {url}.git && cd icl-course" in (course.ROOT / "how_to_run.md").read_text()


def test_the_cheat_sheet_names_tests_that_exist_and_every_chapter():
    text = (course.ROOT / "summary.md").read_text()
    named = re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", text)
    assert len(named) >= 7
    for file, name in named:
        path = course.ROOT / "tests" / file
        assert path.exists(), f"summary.md names {file}, which is not in tests/"
        if name:
            assert re.search(rf"^def {name}\(", path.read_text(), flags=re.M), f"summary.md names {file}::{name}"
    for ch in course.PLAN:
        assert f"(chapters/{ch.stem}.ipynb)" in text, f"summary.md does not link chapter {ch.number}"
