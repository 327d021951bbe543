"""Chapter 4, Giannou et al.'s logistic setup: damped Newton, sign labels, weights read out by basis
queries, and one trained model per depth (shipped) against Newton on the paper's layer axis."""

import pytest
import torch
from margins import claim

import icl_course as icl
from icl_course import pretrained
from icl_course.topics.newton import logistic_depth as ld
from icl_course.topics.newton.logistic import (
    LogisticNewton,
    LogisticTask,
    predicted_weights,
    regularized_gradient,
    regularized_loss,
)


@pytest.fixture(scope="module")
def batch():
    return ld.make_task().sample(64, icl.generator(3), dtype=torch.float64)


def test_sign_labels_and_basis_queries_give_the_optimums_coordinate_as_target(batch):
    margins = torch.einsum("bnd,bd->bn", batch.xs, batch.w)
    assert torch.equal(batch.ys, torch.where(margins > 0, 1.0, -1.0).double())
    m = batch.x_query.argmax(-1)
    assert torch.equal(batch.x_query, torch.nn.functional.one_hot(m, ld.D).double())
    w_star = LogisticNewton(ld.MU, 60).weights(batch.xs, batch.ys)  # full steps converge here too
    assert (batch.z_star - w_star.gather(1, m[:, None])[:, 0]).abs().max() < 1e-10
    assert regularized_gradient(batch.xs, batch.ys, w_star, ld.MU).abs().max() < 1e-12


def test_damped_newton_shortens_the_step_by_the_decrement_rule_and_descends(batch):
    xs, ys, mu = batch.xs, batch.ys, ld.MU
    full = LogisticNewton(mu, 1).weights(xs, ys)  # the full step from w = 0 is -H^{-1} g
    g = regularized_gradient(xs, ys, torch.zeros_like(full), mu)
    decrement = (-(g * full).sum(-1)).sqrt()  # sqrt(g^T H^{-1} g)
    expected = full * (2 * mu**0.5 / (2 * mu**0.5 + decrement))[:, None]
    damped = LogisticNewton(mu, 1, damped=True).weights(xs, ys)
    assert (damped - expected).abs().max() < 1e-12
    losses = [regularized_loss(xs, ys, w, mu) for w in LogisticNewton(mu, 30, damped=True).iterates(xs, ys)]
    assert all(bool((b <= a + 1e-12).all()) for a, b in zip(losses, losses[1:]))  # every step descends
    assert (losses[-1] - losses[-2]).abs().max() < 1e-13  # and it has converged


def test_predicted_weights_reads_a_linear_predictor_back_exactly(batch):
    solver = LogisticNewton(ld.MU, 5)
    expected = solver.weights(batch.xs, batch.ys)
    assert (predicted_weights(solver, batch.xs, batch.ys) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("kwargs, name", [({"labels": "clean"}, "labels"), ({"query": "e1"}, "query")])
def test_logistic_task_options_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LogisticTask(d=2, n_ctx=5, **kwargs)


def test_damped_is_checked():
    with pytest.raises(ValueError, match="damped"):
        LogisticNewton(0.1, 1, damped="yes")


# --- trained models ----------------------------------------------------------------------------


@claim(
    one_block_minus_newton1=("<", 0),  # L(w) of a 1-block model minus damped Newton's after 1 step: ahead of it
    three_blocks_minus_newton3=("<", 0),  # the same at 3 blocks / 3 steps
    depth_gain=(">", 0),  # L(w) of the 1-block model minus the 3-block model's: depth helps
)
def logistic_depth_claims(seed):
    """At a small scale: 1 and 3 blocks, 300 steps of batch 512 each (~20 CPU-s); ``seed`` seeds init and data."""
    config = ld.DepthConfig(depths=(1, 3), seeds=(seed,), source="train", train_steps=300, n_eval=2000,
                            newton_steps=3)
    result = ld.run_depths(config)
    one, three = (r["loss"]["mean"] for r in result.rows)
    newton = result.newton["damped_loss"]
    return {"one_block_minus_newton1": one - newton[1], "three_blocks_minus_newton3": three - newton[3],
            "depth_gain": one - three}


def test_trained_models_are_ahead_of_damped_newton_layer_for_step_and_depth_helps():
    logistic_depth_claims.check()


def test_every_shipped_depth_model_remeasures_its_recorded_validation_loss():
    for depth in ld.DEPTHS:
        for seed in (0, 1, 2):
            spec = ld.DepthSpec(depth, seed)
            record = pretrained.provenance(spec.name)
            validation = ld.held_out(record["metrics"]["validation"]["size"], record["metrics"]["validation"]["seed"])
            loss, _ = ld._scores(pretrained.load(spec.name), validation, ld.optimum(validation))
            assert loss.mean().item() == pytest.approx(record["metrics"]["validation_loss"], rel=1e-4), spec.name
