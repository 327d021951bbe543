"""The course's topics, one folder each: everything a chapter needs beyond the shared core.

A topic folder holds the chapter's own models and algorithms, ``experiment.py`` (its experiment:
``CONFIGS`` per profile and ``run(profile=None, progress=False)``, shared by the notebook, the
command line and the tests) and ``checks.py`` (its exercises' checks). The chapter notebook is
``chapters/<stem>.ipynb`` and its exercises ``exercises/<stem>.ipynb`` (the book shows
``exercises/book/<stem>.ipynb``), where ``stem`` is the
number and the folder's name (``03_mixed_noise``).

``TOPICS`` below is the one list of chapters: the command line's topic names, the landing page's
tables, the grader's lookup of a notebook's checks and the book's table of contents (a test compares
it with ``_toc.yml``) all come from it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

__all__ = ["Topic", "TOPICS", "get"]


@dataclass(frozen=True)
class Topic:
    number: int
    name: str  # the folder under icl_course/topics/, e.g. "mixed_noise"
    title: str
    idea: str  # one line for the landing page's path figure
    old_stems: tuple[str, ...] = ()  # earlier notebook names, still accepted by the grader

    @property
    def stem(self) -> str:
        """The notebook's file name without ``.ipynb``, in ``chapters/`` and ``exercises/``."""
        return f"{self.number:02d}_{self.name}"

    @property
    def command(self) -> str:
        """The name ``icl-course reproduce`` takes, e.g. ``mixed-noise``."""
        return self.name.replace("_", "-")

    @property
    def package(self) -> str:
        return f"{__name__}.{self.name}"

    def experiment(self) -> ModuleType:
        return importlib.import_module(f"{self.package}.experiment")

    def checks(self) -> ModuleType:
        return importlib.import_module(f"{self.package}.checks")


TOPICS = (
    Topic(1, "gd_step", "One linear-attention layer is one step of gradient descent", "attention = one GD step"),
    Topic(2, "preconditioning", "Deeper linear transformers run preconditioned gradient descent",
          "depth = preconditioned GD", old_stems=("02_preconditioned_gd",)),
    Topic(3, "mixed_noise", "On noisy data they discover momentum and adaptive rescaling", "noise -> momentum",
          old_stems=("03_momentum",)),
    Topic(4, "newton", "Transformers can emulate Newton's method", "second order: Newton"),
    Topic(5, "ttt", "Test-time training makes the inner loop explicit", "explicit inner loop"),
    Topic(6, "looped", "Looped transformers generalize by looping longer", "loops = more steps"),
    Topic(7, "sign_descent", "How the outer optimizer shapes the learner", "outer optimizer: sign/Adam"),
)


def get(key: str | int) -> Topic:
    """The topic named by ``key``: its number (``3``, ``"03"``), folder name (``mixed_noise``), command
    name (``mixed-noise``), notebook stem (``03_mixed_noise``) or an earlier stem (``03_momentum``)."""
    text = str(key).strip().lower()
    for topic in TOPICS:
        if text in (topic.name, topic.command, topic.stem, *topic.old_stems) or (text.isdigit() and int(text) == topic.number):
            return topic
    raise ValueError(f"topic must be one of {[t.command for t in TOPICS]} (or a chapter number or stem), got {key!r}")
