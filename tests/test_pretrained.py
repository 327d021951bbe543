"""Shipped weights: the checksums cover the tensors and the architecture record; malformed records,
edited records and non-finite tensors fail to load with a message naming the file and field."""

import json
import shutil

import pytest
import torch

from icl_course import pretrained
from icl_course.linear_transformer import linear_transformer
from icl_course.pretrained import ChecksumError, RecordError
from icl_course.topics.looped import models as looped

SHIPPED = "mixed_noise/diag-2l-u5"


def copy_shipped(name, folder):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".pt", ".json"):
        shutil.copy(pretrained.WEIGHTS_DIR / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder / f"{name}.json"


def edit(path, change, restamp=False):
    """Apply ``change`` to the record at ``path``; with ``restamp`` recompute its checksums as save would."""
    record = json.loads(path.read_text())
    change(record)
    if restamp:
        record["sha256"] = pretrained._sha256(path.with_suffix(".pt"))
        record["digest"] = pretrained.digest(record["architecture"], record["sha256"])
    path.write_text(json.dumps(record))


def test_every_shipped_record_carries_a_digest_of_its_architecture_and_file():
    names = pretrained.available()
    assert len(names) >= 16
    for name in names:
        record = pretrained.provenance(name)
        sha256 = pretrained._sha256(pretrained.WEIGHTS_DIR / f"{name}.pt")
        assert record["sha256"] == sha256 and record["digest"] == pretrained.digest(record["architecture"], sha256)


def test_the_digest_is_the_sha256_of_the_canonical_json():
    import hashlib

    arch = {"n_layers": 2, "d": 3, "clamp": None}
    canonical = '{"architecture":{"clamp":null,"d":3,"n_layers":2},"sha256":"ab"}'
    assert pretrained.digest(arch, "ab") == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize("field, value", [("clamp", 50.0), ("n_layers", 1), ("attention", "full")])
def test_an_edited_architecture_record_fails_to_load(tmp_path, field, value):
    record = copy_shipped(SHIPPED, tmp_path)
    pretrained.load(SHIPPED, folder=tmp_path)  # an intact copy loads
    edit(record, lambda r: r["architecture"].update({field: value}))
    with pytest.raises(ChecksumError, match="architecture") as err:
        pretrained.load(SHIPPED, folder=tmp_path)
    assert str(record) in str(err.value)


def test_an_edited_looped_architecture_fails_to_load(tmp_path):
    name = "looped/parity-next-token"
    record = copy_shipped(name, tmp_path)
    looped.load(name, tmp_path)
    edit(record, lambda r: r["architecture"].update(n_layers=3))
    with pytest.raises(ChecksumError, match="digest"):
        looped.load(name, tmp_path)


FAMILIES = {  # a small model of every family that ships weights, and an input it maps to outputs
    "LinearTransformer": (lambda: linear_transformer(d=3, n_layers=2, attention="gdpp", clamp=5.0, init_std=0.3, seed=1),
                          lambda m: m.predict(*(torch.randn(*s, generator=torch.Generator().manual_seed(0)) for s in ((2, 4, 3), (2, 4), (2, 3))))),
    "LoopedTransformer": (lambda: looped.LoopedTransformer(width=16, n_heads=2, seed=1), lambda m: m(TOKENS, n_loops=3)),
    "Clock": (lambda: looped.Clock(width=16, n_heads=4, seed=2), lambda m: m(TOKENS, n_loops=2)),
    "NextTokenTransformer": (lambda: looped.NextTokenTransformer(width=8, n_heads=2, n_layers=3, seed=3), lambda m: m(TOKENS)),
}
TOKENS = torch.tensor([[0, 1, 1, 3, 4], [1, 0, 0, 3, 4]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_round_trips_through_one_save_and_load(tmp_path, family):
    make, outputs = FAMILIES[family]
    model = make().eval()
    pretrained.save(f"demo/{family}", model, {"note": "test"}, folder=tmp_path)
    record = pretrained.provenance(f"demo/{family}", folder=tmp_path)
    assert record["note"] == "test" and record["architecture"]["model"].endswith(f".{family}")
    assert record["digest"] == pretrained.digest(record["architecture"], record["sha256"])
    loaded = pretrained.load(f"demo/{family}", folder=tmp_path)
    assert type(loaded) is type(model) and loaded.args == model.args
    with torch.no_grad():
        assert torch.equal(outputs(model), outputs(loaded))


def test_a_record_cannot_make_load_import_or_build_another_class(tmp_path):
    record = copy_shipped(SHIPPED, tmp_path)
    for model in ("os.system", "icl_course.course.cli.main", "icl_course.nowhere.Model"):
        edit(record, lambda r, model=model: r["architecture"].update(model=model), restamp=True)
        with pytest.raises(RecordError, match="model") as err:
            pretrained.load(SHIPPED, folder=tmp_path)
        assert str(record) in str(err.value) and model in str(err.value)
    with pytest.raises(ValueError, match="model must be one of the registered"):
        pretrained.save("demo/block", looped.Block(8, 2), {}, folder=tmp_path)


def test_non_finite_tensors_are_refused(tmp_path):
    model = linear_transformer(d=3, n_layers=1, attention="diag")
    pretrained.save("demo/nan", model, {}, folder=tmp_path)
    state = model.state_dict()
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    weights = tmp_path / "demo" / "nan.pt"
    torch.save(state, weights)
    edit(weights.with_suffix(".json"), lambda r: None, restamp=True)  # checksums match: only the values are bad
    with pytest.raises(RecordError, match="non-finite") as err:
        pretrained.load("demo/nan", folder=tmp_path)
    assert str(weights) in str(err.value) and repr(key) in str(err.value)
    model.load_state_dict(state)
    with pytest.raises(ValueError, match="non-finite"):
        pretrained.save("demo/nan2", model, {}, folder=tmp_path)
    assert not (tmp_path / "demo" / "nan2.pt").exists()


@pytest.mark.parametrize("change, restamp, field", [
    (lambda r: r.pop("sha256"), False, "'sha256'"),
    (lambda r: r.pop("digest"), False, "'digest'"),
    (lambda r: r.pop("architecture"), False, "'architecture'"),
    (lambda r: r.update(architecture=[1, 2]), False, "'architecture'"),
    (lambda r: r["architecture"].pop("clamp"), True, "'clamp'"),
    (lambda r: r["architecture"].update(attention="sparse"), True, "attention"),
])
def test_an_incomplete_record_names_the_file_and_field(tmp_path, change, restamp, field):
    record = copy_shipped(SHIPPED, tmp_path)
    edit(record, change, restamp)
    with pytest.raises(RecordError) as err:
        pretrained.load(SHIPPED, folder=tmp_path)
    assert str(record) in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("change, field", [
    (lambda r: r["architecture"].pop("n_layers"), "'n_layers'"),
    (lambda r: r["architecture"].pop("model"), "'model'"),
    (lambda r: r["architecture"].update(model="icl_course.topics.looped.models.Transformer"), "Transformer"),
])
def test_an_incomplete_looped_record_names_the_file_and_field(tmp_path, change, field):
    name = "looped/parity-next-token"
    record = copy_shipped(name, tmp_path)
    edit(record, change, restamp=True)
    with pytest.raises(RecordError) as err:
        looped.load(name, tmp_path)
    assert str(record) in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("text", ['{"sha256": ', "[1, 2]", "\xff\xfe"])
def test_a_record_that_is_not_json_names_the_file(tmp_path, text):
    record = copy_shipped(SHIPPED, tmp_path)
    record.write_bytes(text.encode("latin-1"))
    with pytest.raises(RecordError) as err:
        pretrained.load(SHIPPED, folder=tmp_path)
    assert str(record) in str(err.value)
