"""The landing page's and the instructors' page's tables come from the files themselves."""

import json
import re

import pytest
import torch
import yaml

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
    assert "| ~2 min | none | 1.5 min | not measured yet |" in table and "test box" in table
    assert course.reading_minutes(tmp_path / "chapters" / "01_gd_step.ipynb") == 2.5
    # each display equation adds EQUATION_MINUTES, and the words inside it are not counted as prose
    (tmp_path / "chapters" / "01_gd_step.ipynb").write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["word " * 400, "\n$$\n", "a + b " * 100, "\n$$\n", "$$x$$"]},
        {"cell_type": "code", "source": ["1"]}]}))
    minutes = course.reading_minutes(tmp_path / "chapters" / "01_gd_step.ipynb")
    assert minutes == 2.5 + 2 * course.EQUATION_MINUTES
    # each exercise adds EXERCISE_MINUTES; the chapters' exercises are the checks their solutions call
    ch1 = course.PLAN[0]
    n_ex = course.exercise_count(ch1)
    assert n_ex >= 1 and course.exercise_count(ch1, tmp_path) == 0
    assert f"| {n_ex}, ~{n_ex * course.EXERCISE_MINUTES:.0f} min |" in course.chapter_table()
    assert f"{course.WORDS_PER_MINUTE} words a minute" in table


def test_the_path_is_a_dependency_map_that_links_every_chapter():
    # 1 -> 2 -> 3, 2 -> 4, and 5, 6, 7 off chapter 1 (the order the chapters build on each other)
    assert course.PREREQUISITE == {2: 1, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1}
    assert set(course.PREREQUISITE) | {1} == {ch.number for ch in course.PLAN}
    text = course.path_map()
    for ch in course.PLAN:
        assert f"[{ch.number}. {ch.title}](chapters/{ch.stem}.ipynb)" in text
    depth = {int(line.split("[")[1].split(".")[0]): (len(line) - len(line.lstrip())) // 2 for line in text.splitlines()}
    assert depth == {1: 0, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1}  # the nested list is the tree
    fig = course.path_figure()
    assert "faded" not in fig.axes[0].get_title()  # every chapter is written
    labels = [t.get_text() for t in fig.axes[0].texts if t.get_text()]  # the arrows are empty annotations
    assert len(labels) == len(course.PLAN) and len(fig.axes[0].texts) - len(labels) == len(course.PREREQUISITE)


def test_timings_reject_unknown_chapters():
    with pytest.raises(ValueError, match=r"stems must name written chapters, got \['06_loop'\].*06_looped"):
        course.measure_timings("quick", stems=["06_loop"])


def test_the_book_bundles_mathjax_so_an_offline_copy_renders_maths():
    """The built book's pages load MathJax from _build/html/_static/mathjax, not from a CDN."""
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "_config.yml").read_text())["sphinx"]
    assert "sphinx-mathjax-offline" in config.get("extra_extensions", [])
    assert "http" not in str(config.get("config", {}).get("mathjax_path", ""))


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


def test_book_cache_key_changes_with_profile_device_and_package(monkeypatch, tmp_path):
    """Outputs made under another profile, device or package version are never reused by the book."""
    from icl_course.course import book_cache

    root = tmp_path / "repo"
    (root / "icl_course" / "weights").mkdir(parents=True)
    (root / "icl_course" / "tasks.py").write_text("x = 1\n")
    (root / "icl_course" / "weights" / "m.pt").write_bytes(b"\0")
    monkeypatch.setenv("ICL_COURSE_PROFILE", "quick")
    key = book_cache.cache_key(root)
    assert book_cache.cache_key(root) == key  # deterministic
    monkeypatch.setenv("ICL_COURSE_PROFILE", "smoke")
    assert book_cache.cache_key(root) != key
    monkeypatch.setenv("ICL_COURSE_PROFILE", "quick")
    monkeypatch.setattr(book_cache.runtime, "get_device", lambda: torch.device("cuda"))
    assert book_cache.cache_key(root) != key
    monkeypatch.undo()
    monkeypatch.setenv("ICL_COURSE_PROFILE", "quick")
    (root / "icl_course" / "weights" / "m.pt").write_bytes(b"\1")  # new weights, same code
    assert book_cache.cache_key(root) != key
    monkeypatch.setattr(book_cache.icl_course, "__version__", "9.9.9")
    (root / "icl_course" / "weights" / "m.pt").write_bytes(b"\0")
    assert book_cache.cache_key(root) != key


def test_book_cache_stops_a_stuck_notebook_and_tries_it_again(monkeypatch, tmp_path):
    """A notebook past its time limit is stopped (child and kernel), tried once more, then left to the book
    build (insurance against hangs like the one notebooks.leave_out_output_widget_echo avoids); the limit
    is three times the chapter's measured time plus two minutes."""
    import time

    from icl_course.course import book_cache

    monkeypatch.setenv("ICL_COURSE_PROFILE", "smoke")
    notebook = course.ROOT / "chapters" / "01_gd_step.ipynb"
    start = time.perf_counter()
    done = book_cache.prepare(tmp_path / "cache", notebooks=[notebook], limit=1)
    assert time.perf_counter() - start < 30
    assert done["stopped"] == done["missing"] == [str(notebook)] and done["executed"] == []
    assert book_cache.time_limit(notebook) == 240
    monkeypatch.setenv("ICL_COURSE_PROFILE", "quick")
    quick = json.loads((course.ROOT / "timings.json").read_text())["quick"]["chapters"]
    assert book_cache.time_limit(notebook) == 3 * quick["01_gd_step"] + 120
    assert book_cache.measured_seconds(notebook) == quick["01_gd_step"]  # prepare runs the longest first
    assert book_cache.measured_seconds(course.ROOT / "exercises" / "book" / "01_gd_step.ipynb") is None
    assert book_cache.time_limit(course.ROOT / "exercises" / "book" / "01_gd_step.ipynb") == 600
    monkeypatch.setenv("ICL_COURSE_PROFILE", "full")
    assert book_cache.time_limit(notebook) is None


def test_book_cache_keeps_what_interact_draws(tmp_path):
    """The book's executions leave out nbclient's echo of Output-widget outputs to the kernel (the cause of
    the hangs, see notebooks.leave_out_output_widget_echo); what ``interact`` draws still reaches the widget
    state."""
    import nbformat

    from icl_course.course import book_cache
    from jupyter_cache import get_cache

    notebook = tmp_path / "interact.ipynb"
    code = "from ipywidgets import interact\ninteract(lambda x: print(f'x is {x}'), x=3)"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebook)
    done = book_cache.prepare(tmp_path / "cache", notebooks=[notebook], limit=120)
    assert done["executed"] == [str(notebook)] and not done["stopped"]
    cache = get_cache(tmp_path / "cache")
    executed = cache.get_cache_bundle(cache.list_cache_records()[0].pk).nb
    state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [o for w in state.values() if w["model_name"] == "OutputModel" for o in w["state"]["outputs"]]
    assert [o.get("text") for o in outputs] == ["x is 3\n"]


def test_book_cache_is_what_the_book_config_uses():
    config = yaml.safe_load((course.ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "cache"
    assert (course.ROOT / config["execute"]["cache"]).resolve() == (course.ROOT / "_build" / ".jupyter_cache").resolve()
    assert "icl_course.course.book_cache _build/.jupyter_cache" in (course.ROOT / "Makefile").read_text()
