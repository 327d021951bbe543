"""Colab as students find it: the package installs beside Colab's own packages without changing any of
them, and a chapter and an exercise notebook run there, sliders and progress bars included.

A virtual environment with Colab's versions (its public package list of 2026-08) that pip can install
here is built once into ``.colab-venv`` (kept between runs while the pins stay the same). Differences
from Colab that remain: this machine's Python (Colab has 3.13) and torch (Colab has 2.11 with CUDA).
The package is installed the way the notebooks' install cell does it, from a copy of this checkout
instead of the repository.
"""

import hashlib
import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".colab-venv"
COLAB = [  # what Colab has preinstalled and the course touches
    "ipywidgets==7.7.1", "numpy==2.1.3", "matplotlib==3.10.0", "ipython==7.34.0", "tqdm==4.67.1",
    "ipykernel==6.17.1",
]
TORCH = f"torch=={torch.__version__.split('+')[0]}"  # the torch this machine has (Colab: 2.11)
RUNNER = ["nbclient>=0.9", "nbformat>=5.9"]  # to run notebooks in that environment; installed first
EXECUTE = """
import json, sys, nbformat
from icl_course.course.notebooks import execute
nb = nbformat.read(sys.argv[1], as_version=4)
execute(nb, sys.argv[2], timeout=600)
print(json.dumps([o for c in nb.cells for o in c.get("outputs", [])]))
"""


def _pip(*args, timeout=900):
    result = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def colab_python():
    """The environment's python; built when missing or when the pins changed."""
    pins = [*COLAB, TORCH, *RUNNER]
    stamp, key = VENV / ".pins", hashlib.sha256(json.dumps(pins).encode()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == key):
        shutil.rmtree(VENV, ignore_errors=True)
        venv.create(VENV, with_pip=True)
        _pip("install", "--quiet", *pins)
        stamp.write_text(key)
    return VENV / "bin" / "python"


def _copy_of_checkout(dst: Path) -> Path:
    skip = shutil.ignore_patterns(".git", ".venv", ".colab-venv", "_build", "build", "*.egg-info", "__pycache__",
                                  ".pytest_cache", "results")
    return shutil.copytree(ROOT, dst / "icl-course", ignore=skip)


def _install_cell_target() -> str:
    """What the notebooks' install cell asks pip for, with the repository swapped for a local copy."""
    install = json.loads((ROOT / "chapters" / "01_gd_step.ipynb").read_text())["cells"][1]
    text = "".join(install["source"])
    spec = text.split('"icl-course')[1].split(" @ ")[0]  # e.g. "[widgets]"
    return f"icl-course{spec}"


def _run(python: Path, notebook: Path, cwd: Path) -> list[dict]:
    result = subprocess.run([str(python), "-c", EXECUTE, str(notebook), str(cwd)], capture_output=True, text=True,
                            cwd=cwd, timeout=900, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd),
                                                       "ICL_COURSE_PROFILE": "smoke", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{notebook.name} failed in the Colab-like environment:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.splitlines()[-1])


def test_install_leaves_colab_alone_and_chapter_one_runs_with_widgets(colab_python, tmp_path):
    _pip("uninstall", "--yes", "--quiet", "icl-course")  # a fresh Colab runtime does not have it
    before = _pip("freeze")
    source = _copy_of_checkout(tmp_path)
    _pip("install", "--quiet", f"{_install_cell_target()} @ {source.as_uri()}")
    after = _pip("freeze")
    changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
    assert [line for line in changed if not line.startswith("icl-course")] == [], (
        f"installing the course changed Colab's packages: {changed}"
    )

    work = tmp_path / "work"  # run away from the checkout, so the installed package is the one imported
    work.mkdir()
    chapter = _run(colab_python, ROOT / "chapters" / "01_gd_step.ipynb", work)
    mimes = {mime for o in chapter for mime in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes, "no slider or progress widget was drawn"
    assert "image/png" in mimes
    text = "".join(o.get("text", "") for o in chapter if o.get("output_type") == "stream")
    assert "IProgress not found" not in text, "tqdm fell back to text: ipywidgets is not usable"

    exercise = _run(colab_python, ROOT / "exercises" / "01_gd_step.ipynb", work)
    said = "".join(o.get("text", "") for o in exercise) + json.dumps([o.get("data", {}) for o in exercise])
    assert "not implemented" in said.lower() or "⏳" in said, "the unfinished exercises gave no feedback"
    assert not any(o.get("output_type") == "error" for o in exercise)

