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


def test_spread_is_mean_and_sample_std_over_seeds():
    from icl_course.results import spread

    assert spread([0.21, 0.22, 0.20]) == "0.2100 ± 0.0100 (3 seeds)"
    assert spread([2.0], ".1f") == "2.0 (1 seed)" and spread([1.0, -1.0], "+.1f") == "+0.0 ± 1.4 (2 seeds)"
    with pytest.raises(ValueError, match="at least one"):
        spread([])


def test_chapter_1_repeats_the_whole_experiment_at_its_spread_seeds():
    smoke = gd_step.CONFIGS["smoke"]
    config = replace(smoke, n_eval=64, n_track=1, train=replace(smoke.train, steps=3, batch_size=8), spread_seeds=(5,))
    m = gd_step.run("smoke", config=config).metrics
    alone = gd_step.run("smoke", config=replace(config, seed=5, spread_seeds=())).metrics
    assert m["by_seed"]["seed"] == [0, 5]
    assert m["by_seed"]["lsa_loss"] == [m["lsa_loss"], alone["lsa_loss"]] and m["lsa_loss"] != alone["lsa_loss"]
