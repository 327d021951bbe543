"""Each chapter's experiment, as a function the notebook, the command line and the tests share.

An experiment module has ``CONFIGS`` (one per profile) and ``run(profile=None, progress=False)``,
which returns a result with ``.metrics`` (JSON-ready numbers) and ``.figures()`` (named figures).
``TOPICS`` maps the names used by ``icl-course reproduce`` to those modules.
"""

from __future__ import annotations

import importlib

TOPICS = {
    "gd-step": "icl_course.experiments.gd_step",  # chapter 1
    "preconditioning": "icl_course.experiments.preconditioning",  # chapter 2
    "mixed-noise": "icl_course.experiments.mixed_noise",  # chapter 3
    "newton": "icl_course.experiments.newton",  # chapter 4
    "ttt": "icl_course.experiments.ttt",  # chapter 5
    "looped": "icl_course.experiments.looped",  # chapter 6
    "sign-descent": "icl_course.experiments.sign_descent",  # chapter 7
}


def load(topic: str):
    """The experiment module of ``topic``."""
    if topic not in TOPICS:
        raise ValueError(f"topic must be one of {sorted(TOPICS)}, got {topic!r}")
    return importlib.import_module(TOPICS[topic])
