"""Small pretrained models shipped with the package, each with a provenance record.

A weight file ``NAME.pt`` (a ``state_dict``) lives in ``icl_course/weights/`` next to ``NAME.json``,
its provenance: the architecture (the arguments of ``linear_transformer``), how it was trained
(config, seed, steps, learning rate), what it measured (e.g. its loss and the evaluation set size)
and the file's sha256 checksum. ``load`` checks the checksum before ``torch.load(...,
weights_only=True)`` reads the file, so a corrupted or swapped file fails loudly instead of
quietly giving other numbers.

>>> model = load("mixed_noise/diag-4l-u5")            # doctest: +SKIP
>>> provenance("mixed_noise/diag-4l-u5")["metrics"]   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .linear_transformer import LinearTransformer, linear_transformer

__all__ = ["WEIGHTS_DIR", "ChecksumError", "save", "load", "provenance", "available"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


class ChecksumError(RuntimeError):
    """A weight file's sha256 differs from the one its provenance records."""


def _paths(name: str, folder: Path | None) -> tuple[Path, Path]:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"name must be a relative name such as 'mixed_noise/diag-4l-u5', got {name!r}")
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    return base / f"{name}.pt", base / f"{name}.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(name: str, model: LinearTransformer, provenance: dict, folder: Path | None = None) -> Path:
    """Write ``model``'s weights and ``provenance`` (plus architecture and checksum); return the .pt path.

    ``provenance`` must be JSON-ready; ``architecture`` and ``sha256`` are filled in here.
    """
    if not isinstance(model, LinearTransformer):
        raise ValueError(f"model must be a LinearTransformer, got {type(model).__name__}")
    weights, record = _paths(name, folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    layer = model.layers[0]
    attention = {"FullAttention": "full", "DiagAttention": "diag", "GDPPAttention": "gdpp"}[type(layer).__name__]
    architecture = {
        "d": model.d,
        "n_layers": len(model.layers),
        "n_heads": layer.n_heads,
        "attention": attention,
        "clamp": model.clamp,
    }
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    full = {**provenance, "architecture": architecture, "sha256": _sha256(weights)}
    record.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return weights


def provenance(name: str, folder: Path | None = None) -> dict:
    """The provenance record of ``name``."""
    _, record = _paths(name, folder)
    if not record.exists():
        raise FileNotFoundError(f"no pretrained model {name!r} (looked for {record})")
    return json.loads(record.read_text())


def load(name: str, folder: Path | None = None, dtype=torch.float32) -> LinearTransformer:
    """The model ``name``, after checking its file against the recorded sha256 (CPU, eval mode)."""
    weights, _ = _paths(name, folder)
    record = provenance(name, folder)
    digest = _sha256(weights)
    if digest != record["sha256"]:
        raise ChecksumError(
            f"{weights} has sha256 {digest[:12]}..., but its provenance records {record['sha256'][:12]}...: "
            "the file was changed or damaged. Reinstall the package, or regenerate the weights with the "
            "experiment that made them (icl-course reproduce TOPIC --write-weights)."
        )
    model = linear_transformer(**record["architecture"], init_std=0.0)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(dtype).eval()


def available(prefix: str = "", folder: Path | None = None) -> list[str]:
    """Names of the shipped models whose name starts with ``prefix`` (e.g. ``'mixed_noise/'``)."""
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    names = sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.pt"))
    return [n for n in names if n.startswith(prefix)]
