"""The package's module names before the topics had folders, still importable.

Notebooks that students and readers downloaded earlier import ``icl_course.checks.gd_step``,
``icl_course.experiments.looped``, ``icl_course.ridge`` and so on. An import hook maps each old name
to the module that now holds its code, so the old import gives that very module (the same object
under both names). ``icl_course.checks`` and ``icl_course.experiments`` themselves are empty
packages whose submodules are the topics' ``checks`` and ``experiment``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

from icl_course.topics import TOPICS

TOPIC_NAMES = tuple(t.name for t in TOPICS)

MOVED = {
    "icl_course.preconditioners": "icl_course.topics.preconditioning.preconditioners",
    "icl_course.ridge": "icl_course.topics.mixed_noise.ridge",
    "icl_course.discovered_algorithm": "icl_course.topics.mixed_noise.discovered_algorithm",
    "icl_course.newton": "icl_course.topics.newton.matrix_inverse",
    "icl_course.logistic": "icl_course.topics.newton.logistic",
    "icl_course.ttt": "icl_course.topics.ttt.layers",
    "icl_course.sequence_models": "icl_course.topics.ttt.models",
    "icl_course.sequence_regression": "icl_course.topics.ttt.task",
    "icl_course.looped": "icl_course.topics.looped.models",
    "icl_course.algorithmic_tasks": "icl_course.topics.looped.tasks",
    "icl_course.optimizers": "icl_course.topics.sign_descent.optimizers",
    "icl_course.signal_noise": "icl_course.topics.sign_descent.signal_noise",
    "icl_course.cli": "icl_course.course.cli",
    "icl_course.grading": "icl_course.course.grading",
    "icl_course.notebooks": "icl_course.course.notebooks",
    **{f"icl_course.checks.{t}": f"icl_course.topics.{t}.checks" for t in TOPIC_NAMES},
    **{f"icl_course.experiments.{t}": f"icl_course.topics.{t}.experiment" for t in TOPIC_NAMES},
}
EMPTY_PACKAGES = ("icl_course.checks", "icl_course.experiments")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED or fullname in EMPTY_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in EMPTY_PACKAGES)
        return None

    def create_module(self, spec):
        if spec.name in EMPTY_PACKAGES:
            module = types.ModuleType(spec.name, f"Old name: the topics' modules are in icl_course.topics ({__name__}).")
            module.__path__ = []
            return module
        return None

    def exec_module(self, module):
        if module.__name__ in MOVED:  # the import system returns what sys.modules holds after this
            sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder: a stale folder of an old install must not win


def attribute(name: str):
    """``icl_course.<name>`` for an old submodule name (``icl.looped.load`` in an old notebook)."""
    full = f"icl_course.{name}"
    if full in MOVED or full in EMPTY_PACKAGES:
        return importlib.import_module(full)
    raise AttributeError(f"module 'icl_course' has no attribute {name!r}")
