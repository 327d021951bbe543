"""Experiment metrics fail loudly on a misspelt key, at every level, and stay plain JSON."""

import json
from dataclasses import replace

import pytest

from icl_course.results import Lookup
from icl_course.topics.gd_step import experiment as gd_step


def test_a_missing_key_names_the_keys_there_are():
    m = Lookup.deep({"accuracy": {"looped": {"parity": {"13": 0.98}}}, "runs": [{"seed": 0}]})
    assert m["accuracy"]["looped"]["parity"][13] == m["accuracy"]["looped"]["parity"]["13"] == 0.98
    with pytest.raises(KeyError, match=r"no 'loped' here; the keys are 'looped'"):
        m["accuracy"]["loped"]
    with pytest.raises(KeyError, match=r"no 14 here; the keys are '13'"):
        m["accuracy"]["looped"]["parity"][14]
    with pytest.raises(KeyError, match="no 'sed' here"):
        m["runs"][0]["sed"]
    assert json.loads(json.dumps(m)) == m and type(json.loads(json.dumps(m))) is dict


def test_a_chapter_result_raises_on_a_misspelt_metric():
    smoke = gd_step.CONFIGS["smoke"]
    config = replace(smoke, n_eval=64, n_track=1, train=replace(smoke.train, steps=2, batch_size=8))
    result = gd_step.run("smoke", config=config)
    assert isinstance(result.metrics, Lookup) and result.metrics["lsa_loss"] > 0
    with pytest.raises(KeyError, match="lsa_loss"):
        result.metrics["lsa_los"]
