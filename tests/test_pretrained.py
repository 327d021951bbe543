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


def selection_problems(records: dict) -> list[str]:
    """What is wrong with how the models of ``records`` (``{name: provenance}``) were chosen: every
    record says how (``selection``); a model chosen among several runs was chosen on validation data
    (drawn apart from its test data, at a length other than the longest test length it reports),
    by the best validation score, and every run of the set carries the same record."""
    problems, groups = [], {}
    for name, record in records.items():
        selection = record.get("selection")
        if not isinstance(selection, dict) or not {"rule", "runs", "chosen"} <= set(selection):
            problems.append(f"{name}: no selection record (rule, runs, chosen)")
            continue
        runs = selection["runs"]
        if str(selection["chosen"]) not in runs:
            problems.append(f"{name}: the chosen run {selection['chosen']} is not among the runs {sorted(runs)}")
            continue
        if selection["rule"] != pretrained.ONE_RUN:  # seeds all reported, none chosen: nothing to share
            groups.setdefault(name.rsplit("-seed", 1)[0], []).append((name, selection))
        if len(runs) < 2:
            continue
        # a run whose training diverged ships no model and cannot be chosen; it is reported as such
        scores = {int(seed): run.get("validation") for seed, run in runs.items() if "diverged" not in run}
        if any(not isinstance(v, (int, float)) for v in scores.values()):
            problems.append(f"{name}: chosen among {len(runs)} runs without a validation score for each")
            continue
        sign = -1 if selection.get("better", "higher") == "lower" else 1  # a loss is better lower
        if selection["chosen"] != max(scores, key=lambda seed: (sign * scores[seed], -seed)):
            problems.append(f"{name}: run {selection['chosen']} chosen, but the best validation score is another run's")
        validation, test = selection.get("validation", {}), selection.get("test", {})
        if not validation or validation.get("generator") == test.get("generator"):
            problems.append(f"{name}: chosen on the inputs its test numbers come from (validation {validation}, test {test})")
        if "length" in validation and validation["length"] == test.get("lengths", [None, None])[1]:
            problems.append(f"{name}: chosen at the length it reports ({validation.get('length')})")
    for stem, members in groups.items():
        if len(members) > 1 and any(sel != members[0][1] for _, sel in members):
            problems.append(f"{stem}: the runs of one set carry different selection records")
    return problems


def test_no_shipped_model_was_chosen_on_the_metric_it_reports():
    records = {name: pretrained.provenance(name) for name in pretrained.available()}
    assert selection_problems(records) == []
    several = [name for name, record in records.items() if len(record["selection"]["runs"]) > 1]
    assert several, "chapter 6 ships its paper-style models and clocks as sets of runs"


def test_the_selection_check_catches_a_model_chosen_on_its_test():
    good = {"rule": "r", "runs": {"0": {"validation": 0.9}, "1": {"validation": 0.5}}, "chosen": 0,
            "validation": {"length": 18, "generator": "1 + 5 + 1000 n"}, "test": {"lengths": [1, 24], "generator": "1 + 2 + 1000 n"}}
    assert selection_problems({"a-seed0": {"selection": good}, "a-seed1": {"selection": good}}) == []
    bad = [
        {**good, "chosen": 1},  # not the best on validation
        {**good, "validation": {"length": 18, "generator": "1 + 2 + 1000 n"}},  # validated on the test inputs
        {**good, "validation": {"length": 24, "generator": "1 + 5 + 1000 n"}},  # at the reported length
        {**good, "runs": {"0": {"test_at_24": 0.9}, "1": {"test_at_24": 0.5}}},  # no validation score
        {"rule": "r", "runs": {"0": {}}, "chosen": 3},
    ]
    for selection in bad:
        assert len(selection_problems({"a": {"selection": selection}})) == 1, selection
    # a loss: the lowest validation score must be the one chosen
    loss = {"rule": "r", "runs": {"0": {"validation": 0.9}, "1": {"validation": 0.5}}, "better": "lower",
            "validation": {"generator": 1600}, "test": {"generator": 1007}}
    assert selection_problems({"a": {"selection": {**loss, "chosen": 1}}}) == []
    assert len(selection_problems({"a": {"selection": {**loss, "chosen": 0}}})) == 1
    failed = {**loss, "runs": {**loss["runs"], "2": {"diverged": "the training loss blew up"}}}
    assert selection_problems({"a": {"selection": {**failed, "chosen": 1}}}) == []
    assert len(selection_problems({"a": {"selection": {**failed, "chosen": 2}}})) == 1  # not a candidate
    assert selection_problems({"a": {}}) == ["a: no selection record (rule, runs, chosen)"]
    other = {**good, "runs": {"0": {"validation": 0.9}, "1": {"validation": 0.6}}}
    assert selection_problems({"a-seed0": {"selection": good}, "a-seed1": {"selection": other}}) == [
        "a: the runs of one set carry different selection records"]


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


def test_a_record_says_how_its_sequences_were_drawn(tmp_path):
    """``save`` stamps the stream of Gaussian draws (float32, or float64 inside ``float64_draws``), and
    ``drawn_as`` draws the same sequences again; records without the field (shipped before it) mean float64."""
    from icl_course.tasks import Gaussian, float64_draws, generator

    model = linear_transformer(3, 1, 1)
    pretrained.save("demo/now", model, {}, folder=tmp_path)
    with float64_draws():
        pretrained.save("demo/before", model, {}, folder=tmp_path)
        before = Gaussian().draw((5, 4), generator(0))
    now = Gaussian().draw((5, 4), generator(0))
    assert not torch.equal(before, now)
    for name, expected in (("demo/now", now), ("demo/before", before)):
        record = pretrained.provenance(name, folder=tmp_path)
        with pretrained.drawn_as(record):
            assert torch.equal(Gaussian().draw((5, 4), generator(0)), expected), name
    assert pretrained.provenance("demo/now", folder=tmp_path)["draws"] == "float32"
    assert "draws" not in pretrained.provenance(SHIPPED)  # shipped before the field: float64
    with pretrained.drawn_as(pretrained.provenance(SHIPPED)):
        assert torch.equal(Gaussian().draw((5, 4), generator(0)), before)
    with pytest.raises(RecordError, match="draws must be"):
        pretrained.drawn_as({"draws": "float16"})


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
