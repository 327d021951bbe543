"""Small pretrained models shipped with the package, each with a provenance record.

A weight file ``NAME.pt`` (a ``state_dict``) lives in ``icl_course/weights/`` next to ``NAME.json``,
its provenance: the architecture (the arguments that rebuild the model), how it was trained
(config, seed, steps, learning rate), what it measured (e.g. its loss and the evaluation set size)
and two checksums:

- ``sha256``: the sha256 of the ``.pt`` file (its bytes, as ``sha256sum`` prints it);
- ``digest``: the sha256 of the canonical JSON of ``{"architecture": ..., "sha256": ...}``
  (``json.dumps(..., sort_keys=True, separators=(",", ":"))``, UTF-8), see :func:`digest`. It ties
  the architecture record to the tensors: an edited ``clamp`` or layer count fails to load.

``load`` checks both before ``torch.load(..., weights_only=True)`` reads the file, and refuses
non-finite tensors, so a corrupted, swapped or edited model fails loudly instead of quietly giving
other numbers: :class:`ChecksumError` for a checksum that differs, :class:`RecordError` for a
provenance file that is not JSON, lacks a field loading needs, or holds non-finite weights; both
name the file. :func:`save_state` and :func:`load_state` are the shared implementation, given a
model's architecture record and a function that builds the model from it (``icl_course.topics.looped.models``
uses them for its models).

>>> model = load("mixed_noise/diag-4l-u5")            # doctest: +SKIP
>>> provenance("mixed_noise/diag-4l-u5")["metrics"]   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .linear_transformer import LinearTransformer, linear_transformer

__all__ = ["WEIGHTS_DIR", "ChecksumError", "RecordError", "save", "load", "provenance", "available", "digest",
           "save_state", "load_state"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
ARCHITECTURE = ("d", "n_layers", "n_heads", "attention", "clamp")  # the fields linear_transformer is rebuilt from
REGENERATE = "regenerate the weights with the experiment that made them (icl-course reproduce TOPIC --write-weights)"


class ChecksumError(RuntimeError):
    """A weight file's sha256, or its record's digest, differs from the one its provenance records."""


class RecordError(ValueError):
    """A provenance file that is not JSON, lacks a field loading needs, or holds non-finite weights."""


def _paths(name: str, folder: Path | None) -> tuple[Path, Path]:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"name must be a relative name such as 'mixed_noise/diag-4l-u5', got {name!r}")
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    return base / f"{name}.pt", base / f"{name}.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(architecture: dict, sha256: str) -> str:
    """The record's ``digest``: sha256 of the canonical JSON of the architecture and the file's sha256."""
    canonical = json.dumps({"architecture": architecture, "sha256": sha256}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then move it over ``path``: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_state(name: str, model: nn.Module, architecture: dict, provenance: dict, folder: Path | None = None) -> Path:
    """Write ``model``'s ``state_dict`` and ``provenance`` plus ``architecture``, ``sha256`` and ``digest``."""
    weights, record = _paths(name, folder)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"model has non-finite values (NaN or inf) in {', '.join(bad)}: refusing to save {weights}")
    weights.parent.mkdir(parents=True, exist_ok=True)
    _write(weights, lambda tmp: torch.save(state, tmp))
    sha256 = _sha256(weights)
    full = {**provenance, "architecture": architecture, "sha256": sha256, "digest": digest(architecture, sha256)}
    _write(record, lambda tmp: tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n"))
    return weights


def _check_finite(state: dict, weights: Path) -> None:
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise RecordError(f"{weights}: entry {key!r} is a {type(value).__name__}, not a tensor; {REGENERATE}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RecordError(f"{weights}: tensor {key!r} has non-finite values (NaN or inf); {REGENERATE}")


def provenance(name: str, folder: Path | None = None) -> dict:
    """The provenance record of ``name``."""
    _, record = _paths(name, folder)
    if not record.exists():
        raise FileNotFoundError(f"no pretrained model {name!r} (looked for {record})")
    try:
        data = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{record} is not valid JSON ({err}); {REGENERATE}") from None
    if not isinstance(data, dict):
        raise RecordError(f"{record} must hold a JSON object, got {type(data).__name__}")
    return data


def load_state(name: str, build: Callable[[dict], nn.Module], fields: Iterable[str] | Callable[[dict], Iterable[str]],
               folder: Path | None = None) -> nn.Module:
    """Check ``name``'s files and return ``build(architecture)`` with the weights loaded (CPU, eval mode).

    ``fields``: the architecture fields ``build`` needs (or a function of the architecture giving them).
    """
    weights, path = _paths(name, folder)
    record = provenance(name, folder)
    for field, kind in (("sha256", str), ("digest", str), ("architecture", dict)):
        if not isinstance(record.get(field), kind):
            what = "lacks" if field not in record else f"has a {type(record[field]).__name__} as"
            raise RecordError(f"{path} {what} field {field!r} (a {kind.__name__}); {REGENERATE}")
    sha256 = _sha256(weights)
    if sha256 != record["sha256"]:
        raise ChecksumError(
            f"{weights} has sha256 {sha256[:12]}..., but its provenance records {record['sha256'][:12]}...: "
            f"the file was changed or damaged. Reinstall the package, or {REGENERATE}."
        )
    architecture = record["architecture"]
    if digest(architecture, sha256) != record["digest"]:
        raise ChecksumError(
            f"{path}: its 'digest' does not match its fields 'architecture' and 'sha256': the record was "
            f"edited (e.g. its architecture) or damaged. Reinstall the package, or {REGENERATE}."
        )
    needed = fields(architecture) if callable(fields) else fields
    missing = [f for f in needed if f not in architecture]
    if missing:
        raise RecordError(f"{path}: field 'architecture' lacks {', '.join(map(repr, missing))}; {REGENERATE}")
    try:
        model = build(dict(architecture))
    except (TypeError, ValueError) as err:
        raise RecordError(f"{path}: field 'architecture' does not describe a model: {err}") from None
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RecordError(f"{weights} holds a {type(state).__name__}, not a state_dict; {REGENERATE}")
    _check_finite(state, weights)
    model.load_state_dict(state)
    return model.eval()


def save(name: str, model: LinearTransformer, provenance: dict, folder: Path | None = None) -> Path:
    """Write ``model``'s weights and ``provenance`` (plus architecture and checksums); return the .pt path.

    ``provenance`` must be JSON-ready; ``architecture``, ``sha256`` and ``digest`` are filled in here.
    """
    if not isinstance(model, LinearTransformer):
        raise ValueError(f"model must be a LinearTransformer, got {type(model).__name__}")
    layer = model.layers[0]
    attention = {"FullAttention": "full", "DiagAttention": "diag", "GDPPAttention": "gdpp"}[type(layer).__name__]
    architecture = {"d": model.d, "n_layers": len(model.layers), "n_heads": layer.n_heads, "attention": attention,
                    "clamp": model.clamp}
    return save_state(name, model, architecture, provenance, folder)


def load(name: str, folder: Path | None = None, dtype=torch.float32) -> LinearTransformer:
    """The model ``name``, after checking its file and record against the recorded checksums (CPU, eval mode)."""
    build = lambda a: linear_transformer(**{k: a[k] for k in ARCHITECTURE}, init_std=0.0)  # noqa: E731
    return load_state(name, build, ARCHITECTURE, folder).to(dtype)


def available(prefix: str = "", folder: Path | None = None) -> list[str]:
    """Names of the shipped models whose name starts with ``prefix`` (e.g. ``'mixed_noise/'``)."""
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    names = sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.pt"))
    return [n for n in names if n.startswith(prefix)]
