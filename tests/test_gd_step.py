"""Chapter 1's headline claim, at the quick profile: a trained LSA layer is one step of GD."""

from dataclasses import replace

from margins import claim

from icl_course.topics.gd_step import experiment as gd_step


@claim(
    lsa_over_best_gd=("<", 1.02),  # held-out loss of the trained layer / that of the best one-step GD
    model_cosine=(">", 0.99),  # cosine of the implicit models d y_hat / d x_q of the two learners
    best_gd_over_zero=("<", 0.6),  # the best GD step's loss / the zero predictor's: GD does learn something
    implied_eta_rel_error=("<", 0.1),  # |eta read from the trained P / the best GD step size - 1|
    paper_inputs_scaling_error=("<", 0.08),  # |(GD loss with U(-1,1) inputs / with U(-0.5,0.5)) / 4 - 1|
    ood_max_rel_gap=("<", 0.1),  # max over the test input ranges of |LSA loss / GD loss - 1|
    interpolation_max_over_best_gd=("<", 1.02),  # worst loss on the path construction -> trained, / best GD
)
def gd_step_claims(seed):
    """The quick profile, with ``seed`` for the initialisation and both data streams."""
    result = gd_step.run("quick", config=replace(gd_step.CONFIGS["quick"], seed=seed, spread_seeds=()))
    m = result.metrics
    return {
        "lsa_over_best_gd": m["lsa_loss"] / m["best_gd_loss"],
        "model_cosine": m["model_cosine"],
        "best_gd_over_zero": m["best_gd_loss"] / m["zero_predictor_loss"],
        "implied_eta_rel_error": abs(m["implied_eta"] / m["best_gd_eta"] - 1),
        "paper_inputs_scaling_error": abs(m["best_gd_loss_inputs_U(-1,1)"] / m["best_gd_loss"] / 4 - 1),
        "ood_max_rel_gap": max(abs(lsa / gd - 1) for lsa, gd in zip(result.ood["lsa_loss"], result.ood["gd_loss"])),
        "interpolation_max_over_best_gd": max(result.interpolation["loss"]) / m["best_gd_loss"],
    }


def test_trained_layer_matches_the_best_gd_step():
    gd_step_claims.check(keys=["lsa_over_best_gd", "model_cosine", "best_gd_over_zero", "implied_eta_rel_error"])


def test_the_loss_scales_by_four_with_the_papers_inputs():
    gd_step_claims.check(keys=["paper_inputs_scaling_error"])


def test_out_of_distribution_lsa_moves_with_gd():
    gd_step_claims.check(keys=["ood_max_rel_gap", "interpolation_max_over_best_gd"])


def test_smoke_profile_result_and_figures():
    result = gd_step.run("smoke")
    assert result.metrics["profile"] == "smoke" and result.metrics["train_steps"] == 60
    assert set(result.figures()) == {
        "loss_curve", "alignment", "matrices", "step_size", "out_of_distribution", "interpolation"
    }
