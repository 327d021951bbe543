"""Where and at what scale things run: the device and the profile.

The device is chosen once, here: CUDA when it is available, else the CPU. Nothing else in the
package names a device; models and solvers read it from their inputs.

A *profile* sets the scale of every chapter's experiment:

- ``smoke``: seconds. Tests and CI run every notebook in it.
- ``quick``: a few minutes a chapter on a laptop CPU. The default, on every device (on CUDA it
  runs there: same scale, sooner).
- ``full``: the papers' scale; opt-in (``ICL_COURSE_PROFILE=full``), meant for a GPU: not yet
  timed on one, see the landing page's GPU column.

The environment variable ``ICL_COURSE_PROFILE`` picks one (``auto``, the default, means ``quick``);
an explicit ``profile=`` argument wins over the variable.

``generator(seed, device)`` is the one way randomness enters the package, and ``require_finite`` the one
check every number that comes into the package passes. A generator lives on a device and everything
drawn with it is drawn there (``train`` draws its batches on the model's device): the same seed gives
the same numbers on the same kind of device, but a CUDA generator's stream is not the CPU's.
"""

from __future__ import annotations

import math
import numbers
import operator
import os

import torch

PROFILES = ("smoke", "quick", "full")
PROFILE_ENV = "ICL_COURSE_PROFILE"


def generator(seed: int, device=None) -> torch.Generator:
    """A generator on ``device`` (default: the CPU) seeded with ``seed``: the one way randomness
    enters the package. Tasks draw on the generator's device (``gen.device``).

    >>> generator(0).device
    device(type='cpu')
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda', got {device!r}") from err
    return torch.Generator(device=device).manual_seed(seed)


def get_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_profile(profile: str | None = None) -> str:
    """Resolve a profile name: the argument, else ``$ICL_COURSE_PROFILE``, else automatic.

    >>> get_profile("smoke")
    'smoke'
    """
    if profile is not None and not isinstance(profile, str):
        raise TypeError(f"profile must be a str, one of {PROFILES} or 'auto', got {type(profile).__name__}")
    name = profile if profile is not None else os.environ.get(PROFILE_ENV, "auto")
    name = name.strip().lower()
    if name == "auto":
        return "quick"  # on every device until `full` has been measured on a GPU (make device-check)
    if name not in PROFILES:
        source = "profile" if profile is not None else PROFILE_ENV
        raise ValueError(f"{source} must be one of {PROFILES} or 'auto', got {name!r}")
    return name


_BOUNDS = {"at_least": (">=", operator.ge), "above": (">", operator.gt), "at_most": ("<=", operator.le),
           "below": ("<", operator.lt)}


def require_finite(name: str, value, **bounds):
    """Return ``value`` if it is a finite real number, or a real tensor of them, within ``bounds``.

    ``bounds`` are any of ``at_least``, ``above``, ``at_most``, ``below``. Otherwise raises
    ``TypeError`` (not a real number) or ``ValueError``, naming ``name`` and what was expected.

    >>> require_finite("Ridge: lam", 0.5, at_least=0)
    0.5
    """
    limits = [(*_BOUNDS[key], bound) for key, bound in bounds.items() if bound is not None]
    wanted = "".join(f" {'and ' if i else ''}{sign} {bound}" for i, (sign, _, bound) in enumerate(limits))
    if torch.is_tensor(value):
        v = value.detach()
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a {v.dtype} tensor")
        if not (bool(torch.isfinite(v).all()) and all(bool(op(v, bound).all()) for _, op, bound in limits)):
            shown = v.tolist() if v.numel() <= 8 else f"a {tuple(v.shape)} tensor, entries in [{v.min()}, {v.max()}]"
            raise ValueError(f"{name} must hold finite numbers{wanted}, got {shown}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and all(op(value, bound) for _, op, bound in limits)):
        raise ValueError(f"{name} must be a finite number{wanted}, got {value!r}")
    return value
