"""The package's layout: one registry of chapters, one folder per topic, a core that every topic shares,
and the old module names that downloaded notebooks import still working."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import icl_course
from icl_course import _moved, topics

PACKAGE = Path(icl_course.__file__).parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The icl_course modules ``path`` imports (at any depth of the file), as absolute names."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("icl_course")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("icl_course"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def _sources():
    return [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]


def test_the_registry_is_the_book_the_folders_and_the_command_line():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    assert [f for f in files if f.startswith("chapters/")] == [f"chapters/{t.stem}" for t in topics.TOPICS]
    assert [f for f in files if f.startswith("exercises/")] == [f"exercises/book/{t.stem}" for t in topics.TOPICS]
    assert [t.number for t in topics.TOPICS] == list(range(1, len(topics.TOPICS) + 1))
    folders = sorted(p.name for p in (PACKAGE / "topics").iterdir() if (p / "__init__.py").exists())
    assert folders == sorted(t.name for t in topics.TOPICS)
    for t in topics.TOPICS:
        assert (ROOT / "chapters" / f"{t.stem}.ipynb").exists() and (ROOT / "exercises" / "solutions" / f"{t.stem}.ipynb").exists()
        assert hasattr(t.experiment(), "run") and hasattr(t.experiment(), "CONFIGS")
        assert t.checks().__name__ == f"icl_course.topics.{t.name}.checks"
        for key in (t.number, f"{t.number:02d}", t.name, t.command, t.stem, *t.old_stems):
            assert topics.get(key) is t


def test_an_unknown_topic_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"topic must be one of \['gd-step', .*'sign-descent'\].*got 'momentum'"):
        topics.get("momentum")


def test_every_topic_keeps_to_its_folder_and_the_core_to_itself():
    """No module imports another topic's, the core imports no topic and no tooling, and a module at the
    top level is there because more than one topic (or the tooling and a topic) uses it."""
    users = {}
    for path in _sources():
        here = _module_name(path)
        for target in _imports(path):
            users.setdefault(target, set()).add(here)
        area = here.split(".")[1] if "." in here else "core"
        if area == "topics" and here.count(".") >= 2:
            own = here.split(".")[2]
            others = {t for t in _imports(path) if t.startswith("icl_course.topics.") and t.split(".")[2] != own}
            assert not others, f"{here} imports another topic's code: {sorted(others)}"
        elif area not in ("topics", "course", "_moved") and here != "icl_course":
            upward = {t for t in _imports(path) if t.startswith(("icl_course.topics", "icl_course.course"))}
            assert not upward, f"the core module {here} imports {sorted(upward)}"
    core = [p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "_moved.py")]
    for path in core:
        name = _module_name(path)
        topics_using = {u.split(".")[2] for u in users.get(name, ()) if u.startswith("icl_course.topics.") and u.count(".") >= 3}
        others = {u for u in users.get(name, ()) if not u.startswith("icl_course.topics.")} - {"icl_course"}
        assert len(topics_using) >= 2 or (topics_using and others), (
            f"{name} is used by {sorted(topics_using) or 'no topic'} and {sorted(others) or 'nothing else'}: "
            "a module one topic uses belongs in that topic's folder")


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_module_names_still_import_the_same_module(old):
    assert importlib.import_module(old) is importlib.import_module(_moved.MOVED[old])


def test_old_imports_of_downloaded_notebooks_work_in_a_fresh_interpreter():
    code = (
        "import icl_course as icl\n"
        "from icl_course.checks import looped as checks\n"
        "from icl_course.experiments import preconditioning as pre\n"
        "from icl_course import preconditioners as pc, ttt\n"
        "from icl_course.optimizers import UpdateRule\n"
        "import icl_course.topics.looped.checks as new\n"
        "assert checks is new and icl.looped.load is icl.topics.looped.models.load\n"
        "assert pre.run and pc.optimal_preconditioner and ttt.__name__ == 'icl_course.topics.ttt.layers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_an_unknown_attribute_of_the_package_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        icl_course.nonsense  # noqa: B018
