"""Where and at what scale things run: the device and the profile.

The device is chosen once, here: CUDA when it is available, else the CPU. Nothing else in the
package names a device; models and solvers read it from their inputs.

A *profile* sets the scale of every chapter's experiment:

- ``smoke``: seconds. Tests and CI run every notebook in it.
- ``quick``: a few minutes a chapter on a laptop CPU. The default without a GPU.
- ``full``: the papers' scale. The default with CUDA.

The environment variable ``ICL_COURSE_PROFILE`` picks one (``auto``, the default, picks ``full``
on CUDA and ``quick`` otherwise); an explicit ``profile=`` argument wins over the variable.
"""

from __future__ import annotations

import os

import torch

PROFILES = ("smoke", "quick", "full")
PROFILE_ENV = "ICL_COURSE_PROFILE"


def get_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_profile(profile: str | None = None) -> str:
    """Resolve a profile name: the argument, else ``$ICL_COURSE_PROFILE``, else automatic.

    >>> get_profile("smoke")
    'smoke'
    """
    name = profile if profile is not None else os.environ.get(PROFILE_ENV, "auto")
    name = name.strip().lower()
    if name == "auto":
        return "full" if torch.cuda.is_available() else "quick"
    if name not in PROFILES:
        source = "profile" if profile is not None else PROFILE_ENV
        raise ValueError(f"{source} must be one of {PROFILES} or 'auto', got {name!r}")
    return name
