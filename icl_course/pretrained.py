"""Small pretrained models shipped with the package, each with a provenance record.

A weight file ``NAME.pt`` (a ``state_dict``) lives in ``icl_course/weights/`` next to ``NAME.json``,
its provenance: the architecture, how it was trained (config, seed, steps, learning rate), what it
measured (e.g. its loss and the evaluation set size), how its Gaussian inputs were drawn (``draws``,
float32 or float64: the same seed gives other sequences, see :func:`drawn_as`) and two checksums:

- ``architecture``: ``{"model": "MODULE.CLASS", **args}``, the model's class and the arguments
  that rebuild it, as nanoGPT's checkpoints store ``model_args``. Every model that ships
  weights carries them as ``model.args``: its architecture (sizes, attention type, clamp), not its
  initialisation, which the weights replace;
- ``sha256``: the sha256 of the ``.pt`` file (its bytes, as ``sha256sum`` prints it);
- ``digest``: the sha256 of the canonical JSON of ``{"architecture": ..., "sha256": ...}``
  (``json.dumps(..., sort_keys=True, separators=(",", ":"))``, UTF-8), see :func:`digest`. It ties
  the architecture record to the tensors: an edited ``clamp`` or layer count fails to load.

**One save and load for every model family.** :data:`MODELS` maps a class's full name to what
rebuilds it from its ``args`` (``LinearTransformer`` -> :func:`linear_transformer`). The core knows
only its own models; a topic adds its classes with :func:`register` when its module is imported
(``icl_course.topics.looped.models`` registers the looped transformer, the clock and the next-token
baseline). Because the record names the class's module, ``load`` imports that module first if its
class is not registered yet, but only a module of this package (the allow-list is the
``icl_course.`` prefix), and then builds only a registered class: a record can never make ``load``
import or call anything else.

``load`` checks both checksums before ``torch.load(..., weights_only=True)`` reads the file, and
refuses non-finite tensors, so a corrupted, swapped or edited model fails loudly instead of quietly
giving other numbers: :class:`ChecksumError` for a checksum that differs, :class:`RecordError` for a
provenance file that is not JSON, lacks a field loading needs, or holds non-finite weights; both
name the file.

**Re-stamping.** When a class moves or the record's format changes, :func:`restamp` rewrites a
record's architecture and digest for the same ``.pt`` (its sha256 is checked, the file untouched).
The shipped records of flat fields (``{"d": 10, "n_layers": 4, ...}``, ``{"model": "Clock", ...}``)
were given their class's full name as ``model`` with::

    python -c "from icl_course import pretrained as p
    for n in p.available():
        a = dict(p.provenance(n)['architecture']); c = a.pop('model', 'LinearTransformer')
        m = 'icl_course.linear_transformer' if c == 'LinearTransformer' else 'icl_course.topics.looped.models'
        p.restamp(n, {'model': f'{m}.{c}', **a})"

>>> model = load("mixed_noise/diag-4l-u5")            # doctest: +SKIP
>>> provenance("mixed_noise/diag-4l-u5")["metrics"]   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .linear_transformer import LinearTransformer, RecurrentLinearTransformer, linear_transformer, recurrent_transformer
from .tasks import _FLOAT64_DRAWS, float64_draws

__all__ = ["WEIGHTS_DIR", "MODELS", "ChecksumError", "RecordError", "register", "save", "load", "provenance",
           "available", "digest", "restamp", "set_selection", "ONE_RUN", "one_run", "drawn_as"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGENERATE = "regenerate the weights with the experiment that made them (icl-course reproduce TOPIC --write-weights)"
ALLOWED = "icl_course."  # load imports a record's module only inside this package


# Every record says how its model was chosen (``selection``): the rule, the runs it was chosen from
# and the chosen seed. A model chosen among several runs is chosen on validation data, never on the
# data its reported metrics come from (``tests/test_pretrained.py`` checks every shipped record).
ONE_RUN = "the only run with these settings: nothing was chosen"


def one_run(seed: int) -> dict:
    """The ``selection`` record of a model that is the only run of its settings."""
    return {"rule": ONE_RUN, "runs": {str(seed): {}}, "chosen": seed}


class ChecksumError(RuntimeError):
    """A weight file's sha256, or its record's digest, differs from the one its provenance records."""


class RecordError(ValueError):
    """A provenance file that is not JSON, lacks a field loading needs, or holds non-finite weights."""


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


MODELS: dict[str, Callable[..., nn.Module]] = {_key(LinearTransformer): linear_transformer,
                                               _key(RecurrentLinearTransformer): recurrent_transformer}


def register(*classes: type, build: Callable[..., nn.Module] | None = None) -> None:
    """Let :func:`save` and :func:`load` handle ``classes``: each is rebuilt by ``build(**model.args)``
    (default: the class itself), and its instances carry ``args``."""
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"classes must be nn.Module subclasses, got {cls!r}")
        MODELS[_key(cls)] = build or cls


def architecture(model: nn.Module) -> dict:
    """The record that rebuilds ``model``: its class's full name and its ``args``."""
    key = _key(type(model))
    if key not in MODELS:
        raise ValueError(f"model must be one of the registered classes {sorted(MODELS)}, got {key}")
    return {"model": key, **model.args}


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


def _write_record(path: Path, record: dict, architecture: dict, sha256: str) -> None:
    full = {**record, "architecture": architecture, "sha256": sha256, "digest": digest(architecture, sha256)}
    _write(path, lambda tmp: tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n"))


def save(name: str, model: nn.Module, provenance: dict, folder: Path | None = None) -> Path:
    """Write ``model``'s weights and ``provenance`` (plus architecture and checksums); return the .pt path.

    ``model`` is any registered model (:data:`MODELS`); ``provenance`` must be JSON-ready.
    """
    arch = architecture(model)
    weights, record = _paths(name, folder)
    provenance = {"draws": "float64" if _FLOAT64_DRAWS[0] else "float32", **provenance}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"model has non-finite values (NaN or inf) in {', '.join(bad)}: refusing to save {weights}")
    weights.parent.mkdir(parents=True, exist_ok=True)
    _write(weights, lambda tmp: torch.save(state, tmp))
    _write_record(record, provenance, arch, _sha256(weights))
    return weights


def drawn_as(record: dict) -> contextlib.AbstractContextManager:
    """A context in which sequences are drawn as they were for ``record``'s numbers: its ``draws`` field
    (``save`` stamps it), and for the records written before it existed (December 2026), Gaussian draws
    in float64 rounded to float32 (:func:`icl_course.tasks.float64_draws`), as every batch then was.

    >>> with drawn_as(provenance("mixed_noise/diag-4l-u5")):   # doctest: +SKIP
    ...     held_out = task.sample(n_eval, generator(record_seed))
    """
    draws = record.get("draws", "float64")
    if draws not in ("float64", "float32"):
        raise RecordError(f"a record's draws must be 'float64' or 'float32', got {draws!r}")
    return float64_draws() if draws == "float64" else contextlib.nullcontext()


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


def _checked(name: str, folder: Path | None) -> tuple[Path, Path, dict]:
    """The paths and the record of ``name`` once its fields and both checksums are right."""
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
    if digest(record["architecture"], sha256) != record["digest"]:
        raise ChecksumError(
            f"{path}: its 'digest' does not match its fields 'architecture' and 'sha256': the record was "
            f"edited (e.g. its architecture) or damaged. Reinstall the package, or {REGENERATE}."
        )
    return weights, path, record


def _builder(arch: dict, path: Path) -> Callable[..., nn.Module]:
    """What rebuilds the record's ``model``, importing its module (of this package only) if need be."""
    key = arch.get("model")
    if not isinstance(key, str):
        raise RecordError(f"{path}: field 'architecture' lacks 'model' (its class's full name); {REGENERATE}")
    module = key.rpartition(".")[0]
    if key not in MODELS and module.startswith(ALLOWED):
        try:
            importlib.import_module(module)  # a topic registers its classes when imported
        except ImportError:
            pass
    if key not in MODELS:
        raise RecordError(f"{path}: field 'architecture' names model {key!r}, not one of {sorted(MODELS)}")
    return MODELS[key]


def _build(arch: dict, path: Path) -> nn.Module:
    build, args = _builder(arch, path), {k: v for k, v in arch.items() if k != "model"}
    try:
        model = build(**args)
    except (TypeError, ValueError) as err:
        raise RecordError(f"{path}: field 'architecture' does not describe a model: {err}") from None
    missing = [k for k in model.args if k not in args]
    if missing:
        raise RecordError(f"{path}: field 'architecture' lacks {', '.join(map(repr, missing))}; {REGENERATE}")
    return model


def _check_finite(state: dict, weights: Path) -> None:
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise RecordError(f"{weights}: entry {key!r} is a {type(value).__name__}, not a tensor; {REGENERATE}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RecordError(f"{weights}: tensor {key!r} has non-finite values (NaN or inf); {REGENERATE}")


def load(name: str, folder: Path | None = None, dtype=torch.float32) -> nn.Module:
    """The model ``name``, after checking its file and record against the recorded checksums (CPU,
    eval mode, ``dtype``): a ``LinearTransformer`` for ``mixed_noise/*``, a looped model for ``looped/*``."""
    weights, path, record = _checked(name, folder)
    model = _build(record["architecture"], path)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RecordError(f"{weights} holds a {type(state).__name__}, not a state_dict; {REGENERATE}")
    _check_finite(state, weights)
    model.load_state_dict(state)
    return model.to(dtype).eval()


def restamp(name: str, architecture: dict, folder: Path | None = None) -> None:
    """Give ``name``'s record a new ``architecture`` (and digest) for the same, checked ``.pt`` file."""
    _, path, record = _checked(name, folder)
    _write_record(path, record, architecture, record["sha256"])
    load(name, folder)  # the new record must rebuild the model


def set_selection(name: str, selection: dict, folder: Path | None = None) -> None:
    """Give ``name``'s record a new ``selection`` (how it was chosen) for the same, checked ``.pt`` file."""
    _, path, record = _checked(name, folder)
    _write_record(path, {**record, "selection": selection}, record["architecture"], record["sha256"])


def available(prefix: str = "", folder: Path | None = None) -> list[str]:
    """Names of the shipped models whose name starts with ``prefix`` (e.g. ``'mixed_noise/'``)."""
    base = Path(folder) if folder is not None else WEIGHTS_DIR
    names = sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.pt"))
    return [n for n in names if n.startswith(prefix)]
