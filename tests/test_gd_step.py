"""Chapter 1's headline claim, at the quick profile: a trained LSA layer is one step of GD."""

import pytest

from icl_course.experiments import gd_step


@pytest.fixture(scope="module")
def quick():
    return gd_step.run("quick")


def test_trained_layer_matches_the_best_gd_step(quick):
    m = quick.metrics
    assert m["lsa_loss"] <= 1.02 * m["best_gd_loss"]  # within 2% of the best one-step GD loss
    assert m["model_cosine"] >= 0.99  # implicit models aligned
    assert m["best_gd_loss"] < 0.6 * m["zero_predictor_loss"]  # and GD does learn something
    assert m["implied_eta"] == pytest.approx(m["best_gd_eta"], rel=0.1)


def test_the_loss_scales_by_four_with_the_papers_inputs(quick):
    m = quick.metrics
    assert m["best_gd_loss_inputs_U(-1,1)"] / m["best_gd_loss"] == pytest.approx(4.0, rel=0.08)


def test_out_of_distribution_lsa_moves_with_gd(quick):
    for lsa, gd in zip(quick.ood["lsa_loss"], quick.ood["gd_loss"]):
        assert lsa == pytest.approx(gd, rel=0.1)
    assert max(quick.interpolation["loss"]) <= 1.02 * quick.metrics["best_gd_loss"]


def test_smoke_profile_result_and_figures():
    result = gd_step.run("smoke")
    assert result.metrics["profile"] == "smoke" and result.metrics["train_steps"] == 60
    assert set(result.figures()) == {
        "loss_curve", "alignment", "matrices", "step_size", "out_of_distribution", "interpolation"
    }
