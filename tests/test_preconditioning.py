"""Chapter 2: the optimal preconditioner, GD++, the implicit linear model, and the chapter's claims."""

import json
import math
from dataclasses import replace

import pytest
import torch
from margins import claim

import icl_course as icl
from icl_course import pretrained as icl_pretrained
from icl_course.linear_transformer import gdpp_transformer
from icl_course.metrics import implicit_weights_per_layer
from icl_course.solvers import GDPlusPlus, tune_gdpp
from icl_course.topics.preconditioning import checks
from icl_course.topics.preconditioning import experiment as pre
from icl_course.topics.preconditioning import preconditioners as pc

QUICK = pre.CONFIGS["quick"]
COV = pre.covariance(QUICK)  # the rotated Sigma, condition number 16
N = QUICK.n_ctx


def _mc_loss(gamma, cov, n_seq=100_000, seed=0):
    task = icl.RegressionTask(d=cov.shape[0], n_ctx=N, inputs=icl.Gaussian(cov=cov))
    batch = task.sample(n_seq, icl.generator(seed), dtype=torch.float64)
    return icl.evaluate(icl.GradientDescent(1.0, 1, gamma), batch)


# --- closed forms (float64) ----------------------------------------------------------------------


def test_rotated_covariance_has_the_reference_spectrum():
    evals = torch.linalg.eigvalsh(COV)
    assert torch.allclose(evals, torch.tensor([1 / 16, 1 / 4, 1, 1, 1], dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(COV, torch.diag(COV.diagonal()), atol=1e-3)  # really rotated


def test_gamma_star_isotropic_numbers():
    gamma = pc.optimal_preconditioner(torch.eye(5), 20)
    assert torch.allclose(gamma, torch.eye(5, dtype=torch.float64) / 1.3, atol=1e-12)
    assert 2 * pc.optimal_step_loss(torch.eye(5), 20) == pytest.approx(1.1538, abs=1e-4)  # full MSE


@pytest.mark.parametrize("cov", [torch.eye(5, dtype=torch.float64), COV], ids=["identity", "rotated"])
def test_closed_form_loss_matches_monte_carlo(cov):
    gamma = pc.optimal_preconditioner(cov, N)
    assert _mc_loss(gamma, cov) == pytest.approx(pc.optimal_step_loss(cov, N), rel=0.01)


def test_closed_form_loss_of_any_preconditioner_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    gamma = 0.5 * torch.eye(5, dtype=torch.float64) + 0.3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    assert _mc_loss(gamma, COV, seed=1) == pytest.approx(pc.preconditioned_step_loss(gamma, COV, N), rel=0.015)


def test_gamma_star_is_the_minimum_of_the_closed_form():
    gamma = pc.optimal_preconditioner(COV, N)
    best = pc.preconditioned_step_loss(gamma, COV, N)
    assert best == pytest.approx(pc.optimal_step_loss(COV, N), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        delta = 1e-3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
        assert pc.preconditioned_step_loss(gamma + delta, COV, N) > best
    eta, plain = pc.best_plain_step(COV, N)
    assert plain > best
    for e in (0.99 * eta, 1.01 * eta):
        assert pc.preconditioned_step_loss(e * torch.eye(5), COV, N) > plain


def test_layer_preconditioner_of_the_construction_and_of_a_random_layer():
    gamma = pc.optimal_preconditioner(COV, N)
    layer = icl.gd_transformer(5, 0.7, 1, preconditioner=gamma, dtype=torch.float64).layers[0]
    assert torch.allclose(pc.layer_preconditioner(layer), 0.7 * gamma, atol=1e-12)
    # Any FULL layer: the part of the prediction that is odd in y is exactly x_q^T Gamma h.
    model = icl.linear_transformer(5, 1, n_heads=2, init_std=0.5, seed=1).double()
    b = pre.make_task(QUICK).sample(50, icl.generator(0), dtype=torch.float64)
    odd = (model.predict(b.xs, b.ys, b.x_query) - model.predict(b.xs, -b.ys, b.x_query)) / 2
    h = torch.einsum("bnd,bn->bd", b.xs, b.ys) / b.xs.shape[1]
    G = pc.layer_preconditioner(model.layers[0])
    assert torch.allclose(odd, torch.einsum("bi,ij,bj->b", b.x_query, G, h), atol=1e-12)


# --- GD++ ------------------------------------------------------------------------------------------


def test_distance_to_multiple_is_zero_on_the_ray_and_one_when_orthogonal():
    inv = torch.linalg.inv(COV)
    assert pc.distance_to_multiple(-3 * inv, inv) == (pytest.approx(0, abs=1e-12), pytest.approx(-3))
    other = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    orthogonal = other - (other * inv).sum() / (inv * inv).sum() * inv
    assert pc.distance_to_multiple(orthogonal, inv)[0] == pytest.approx(1)
    assert 0 < pc.distance_to_multiple(pc.optimal_preconditioner(COV, N), inv)[0] < 1  # Gamma* is not on the ray
    with pytest.raises(ValueError, match="shape"):
        pc.distance_to_multiple(torch.eye(2), torch.eye(3))


def test_gdpp_transformer_equals_gdpp_solver_layer_by_layer():
    b = pre.make_task(QUICK).sample(200, icl.generator(0), dtype=torch.float64)
    stack = gdpp_transformer(5, eta=0.8, gamma=0.25, n_steps=4, dtype=torch.float64)
    per_layer = stack.predict_per_layer(b.xs, b.ys, b.x_query)
    for k in range(1, 5):
        want = GDPlusPlus(0.8, 0.25, k).predict(b.xs, b.ys, b.x_query)
        assert torch.allclose(per_layer[k - 1], want, atol=1e-10, rtol=0)
    w = icl.implicit_weights(stack, b.xs, b.ys, b.x_query)
    assert torch.allclose(w, GDPlusPlus(0.8, 0.25, 4).weights(b.xs, b.ys), atol=1e-10, rtol=0)


def test_gdpp_with_gamma_zero_is_gradient_descent():
    b = pre.make_task(QUICK).sample(100, icl.generator(1), dtype=torch.float64)
    a = GDPlusPlus(0.7, 0.0, 3).predict(b.xs, b.ys, b.x_query)
    assert torch.allclose(a, icl.GradientDescent(0.7, 3).predict(b.xs, b.ys, b.x_query), atol=1e-12)


def test_tuned_gdpp_beats_tuned_gd_and_lowers_the_condition_number():
    batch = pre.make_task(QUICK).sample(1000, icl.generator(2), dtype=torch.float64)
    _, gd_loss = icl.tune_step_size(batch, 2)
    eta, gamma, loss = tune_gdpp(batch, 2, max_iter=20)
    assert gamma > 0 and loss < 0.8 * gd_loss
    spectra = pre.gdpp_spectra(batch, gamma, 2)
    kappa = spectra["condition_number"]
    assert kappa[0] > kappa[1] > kappa[2]


# --- the implicit linear model ---------------------------------------------------------------------


def test_implicit_weights_per_layer_match_truncated_stacks():
    model = icl.linear_transformer(5, 3, n_heads=2, init_std=0.3, seed=4).double()
    b = pre.make_task(QUICK).sample(20, icl.generator(0), dtype=torch.float64)
    w = implicit_weights_per_layer(model, b.xs, b.ys, b.x_query)  # (L, B, d)
    preds = model.predict_per_layer(b.xs, b.ys, b.x_query)
    for l in range(3):
        truncated = icl.LinearTransformer(list(model.layers[: l + 1]))
        assert torch.allclose(w[l], icl.implicit_weights(truncated, b.xs, b.ys, b.x_query), atol=1e-12)
        assert torch.allclose(preds[l], torch.einsum("bd,bd->b", w[l], b.x_query), atol=1e-10)


# --- the chapter's claims, at the smallest scale where they hold ------------------------------------


@claim(
    gamma_rel_error=("<", 0.10),  # Frobenius distance of the learned preconditioner to Gamma*
    loss_gap_to_gamma_star=("<", 0.03),  # |L(model) / L(Gamma*) - 1| on the same held-out sequences
    # loss falls with depth, and three layers beat three tuned GD steps: log loss ratios > 0 (ratios of
    # losses spread on a log scale: L2/L3 was 1.9 to 3.2 over seeds 0-4, z 3.7 on a linear scale)
    log_loss1_over_loss2=(">", 0.0),
    log_loss2_over_loss3=(">", 0.0),
    log_gd3_over_loss3=(">", 0.0),
    implicit_identity_error=("<", 1e-10),  # y_hat = <d y_hat / d x_q, x_q> for every trained model
)
def depth_claims(seed):
    """One layer (quick-profile training) and two and three layers (shorter runs), seeded by ``seed``."""
    task = pre.make_task(QUICK)
    schedule = {1: QUICK.train_one_layer}
    schedule[2] = replace(QUICK.train_deep, steps=600, batch_size=512)  # measured: shorter runs leave L2 and L3
    schedule[3] = replace(QUICK.train_deep, steps=1200, batch_size=512)  # too close to each other on some seeds
    models = {}
    for L, cfg in schedule.items():
        model = icl.linear_transformer(5, L, 1, seed=10 * seed + L)
        icl.train(model, task, replace(cfg, seed=10 * seed + 1), device=torch.device("cpu"))
        models[L] = model.eval()
    held_out = task.sample(50_000, icl.generator(10 * seed + 2))
    losses = {L: icl.evaluate(m, held_out) for L, m in models.items()}
    gamma = pc.optimal_preconditioner(COV, N)
    reference = icl.evaluate(icl.GradientDescent(1.0, 1, gamma.float()), held_out)
    tune = task.sample(4096, icl.generator(10 * seed + 3), dtype=torch.float64)
    eta, _ = icl.tune_step_size(tune, 3)
    small = type(held_out)(*(t[:500].double() for t in held_out.tensors()))
    return {
        "gamma_rel_error": pc.relative_error(pc.layer_preconditioner(models[1].layers[0]), gamma),
        "loss_gap_to_gamma_star": abs(losses[1] / reference - 1),
        "log_loss1_over_loss2": math.log(losses[1] / losses[2]),
        "log_loss2_over_loss3": math.log(losses[2] / losses[3]),
        "log_gd3_over_loss3": math.log(icl.evaluate(icl.GradientDescent(eta, 3), held_out) / losses[3]),
        "implicit_identity_error": max(pre.implicit_identity_error(m, small) for m in models.values()),
    }


@claim(
    context_max_rel_gap=("<", 0.03),  # max over n = 5 and 40 of |L(model) / L(Gamma*) - 1|, same sequences
    context_max_closed_form_gap=("<", 0.03),  # the same, both losses in closed form (no sampling noise)
)
def context_claims(seed):
    """A one-layer model trained as the chapter's context-length sweep trains it, at the shortest and the
    longest context of the quick profile, against one step preconditioned by that n's Gamma*: on the same
    20k held-out sequences, and in closed form (the model's preconditioner in the population loss).

    Measured: against Gamma*'s closed-form loss, the 20k-sequence mean itself of Gamma*'s loss is off by
    up to 4% (seeds 0-4), more than the model is; so both sides are measured on the same sequences."""
    gaps, closed_gaps = [], []
    for n in (QUICK.context_lengths[0], QUICK.context_lengths[-1]):
        config = replace(QUICK, n_ctx=n)
        task = pre.make_task(config)
        model = icl.linear_transformer(5, 1, 1, seed=10 * seed)
        icl.train(model, task, replace(QUICK.train_one_layer, steps=QUICK.context_steps, seed=10 * seed + 1),
                  device=torch.device("cpu"))
        held_out = task.sample(20_000, icl.generator(10 * seed + 2))
        gamma = pc.optimal_preconditioner(COV, n)
        reference = icl.evaluate(icl.GradientDescent(1.0, 1, gamma.float()), held_out)
        gaps.append(abs(icl.evaluate(model.eval(), held_out) / reference - 1))
        learned = pc.layer_preconditioner(model.layers[0]).double()
        closed_gaps.append(abs(pc.preconditioned_step_loss(learned, COV, n) / pc.optimal_step_loss(COV, n) - 1))
    return {"context_max_rel_gap": max(gaps), "context_max_closed_form_gap": max(closed_gaps)}


def test_one_layer_follows_gamma_star_across_context_lengths():
    context_claims.check()


def test_one_layer_learns_gamma_star():
    depth_claims.check(keys=["gamma_rel_error", "loss_gap_to_gamma_star"])


def test_loss_falls_with_depth_and_three_layers_beat_three_gd_steps():
    depth_claims.check(keys=["log_loss1_over_loss2", "log_loss2_over_loss3", "log_gd3_over_loss3"])


def test_implicit_identity_holds_for_trained_full_models():
    depth_claims.check(keys=["implicit_identity_error"])


# --- the experiment --------------------------------------------------------------------------------


def test_smoke_run_has_the_issue_metrics():
    result = pre.run("smoke")
    m = result.metrics
    for key in ("gamma_star_loss", "lsa1_loss", "preconditioner_rel_error", "profile", "device"):
        assert key in m
    for key in ("lsa_loss", "gd_loss", "pgd_loss", "gdpp_loss"):
        assert set(m[key]) == {str(L) for L in pre.CONFIGS["smoke"].depths}
    json.dumps(m)
    assert set(result.figures()) >= {"depth", "preconditioner", "implicit_model", "spectrum", "anisotropy", "context_length",
                                      "critical_point"}
    for L in pre.CONFIGS["smoke"].depths:  # every layer of every model against Ahn et al.'s critical points
        assert len(m["critical_point"][L]["distance"]) == L
        assert all(0 <= x <= 1 for x in m["critical_point"][L]["distance"])
    assert set(m["long_trained"]) == {"2"} and m["long_trained"]["2"]["seeds"] == [0]  # the shipped model, loaded
    assert "long_trained" in result.figures()
    c = m["context_length"]
    assert c["n"] == list(pre.CONFIGS["smoke"].context_lengths)
    assert c["gamma_star_closed"] == [pc.optimal_step_loss(COV, n) for n in c["n"]]
    L = c["depth"]
    for key in ("lsa1", "lsa1_se", f"lsa{L}", f"lsa{L}_se", f"lsa{L}_median", f"pgd{L}", f"pgd{L}_se"):
        assert len(c[key]) == len(c["n"]) and all(v > 0 for v in c[key]), key


def test_spread_over_seeds_measures_each_seed_as_the_chapter_does():
    config = replace(pre.CONFIGS["smoke"], spread_seeds=(1,))
    m = pre.run("smoke", config=config).metrics
    alone = pre.run("smoke", config=replace(config, seed=1, spread_seeds=())).metrics
    b = m["by_seed"]
    assert b["seed"] == [0, 1]
    for key in pre.SPREAD_KEYS:
        assert b[key] == [m[key], alone[key]]
    for L in config.depths:
        assert b["lsa_loss"][L] == [m["lsa_loss"][L], alone["lsa_loss"][L]]
        assert b["gdpp_loss"][L][0] == m["gdpp_loss"][L]
        # a standard error over sequences: positive, and small against the loss on 4000 sequences
        assert 0 < m["lsa_loss_se"][L] < 0.25 * m["lsa_loss"][L]
    with pytest.raises(ValueError, match="spread_seeds"):
        replace(config, spread_seeds=(0,))


def test_seed_verdicts_count_the_seeds_on_which_each_claim_holds():
    loss = lambda *v: {"1": [v[0], v[1]], "2": [v[2], v[3]]}  # depth -> one value per seed
    b = {"seed": [0, 1], "lsa_loss": loss(0.3, 0.3, 0.1, 5.0), "lsa_loss_se": loss(0.01, 0.01, 0.001, 4.0),
         "lsa_loss_median": loss(0.2, 0.2, 0.05, 0.06)}
    for name in ("gd", "pgd", "gdpp"):
        b[f"{name}_loss"], b[f"{name}_loss_median"] = loss(0.4, 0.4, 0.2, 0.2), loss(0.3, 0.3, 0.1, 0.1)
    v = pre.seed_verdicts(b, (1, 2))
    assert v["n_seeds"] == 2 and v["falls"] == 1  # seed 1's loss rises from 1 to 2 layers
    assert v["beats"]["gd"] == {"1": 2, "2": 1} and v["beats_median"]["gdpp"] == {"1": 2, "2": 2}
    assert v["fragile"] == [(2, 1)]


# --- the shipped long-trained deep models ----------------------------------------------------------


LONG = [(L, s, False) for s in pre.LONG_SEEDS for L in pre.LONG_DEPTHS]
LONG += [(L, s, True) for L in pre.LONGER_STEPS for s in pre.LONG_SEEDS  # the runs with the longer schedule
         if pre.longer_name(L, s) in icl_pretrained.available("preconditioning/")]


@pytest.mark.parametrize("depth, seed, longer", LONG)
def test_shipped_long_trained_models_remeasure_their_recorded_metrics(depth, seed, longer):
    from icl_course import pretrained

    name = pre.longer_name(depth, seed) if longer else pre.long_name(depth, seed)
    record = pretrained.provenance(name)
    steps = pre.LONGER_STEPS[depth] if longer else pre.LONG_TRAIN.steps
    assert record["selection"] == pretrained.one_run(seed)  # every seed shipped, none chosen
    assert record["train"]["steps"] == steps and record["init"] == {"init_std": QUICK.init_std, "seed": seed}
    model = pretrained.load(name)
    assert model.args["n_layers"] == depth and model.args["d"] == QUICK.d
    config = replace(QUICK, seed=seed, spread_seeds=())
    with pretrained.drawn_as(record):  # the recorded sequences, drawn as when the weights were shipped
        held_out = pre.make_task(config).sample(record["eval"]["n_eval"], icl.generator(record["eval"]["generator"]))
    got, claimed = pre.long_test_metrics(model, held_out), record["metrics"]
    for key in ("mean", "median", "se"):  # float32 predictions: only the summation order may differ
        assert got[key] == pytest.approx(claimed[key], rel=1e-3), key
    curve = record["validation"]["curve"]  # the recorded verdict follows from the recorded curve
    assert pre.plateau(curve) == record["validation"]["plateau"]
    assert curve["step"][-1] == record["train"]["steps"] and curve["median"][-1] < 0.01 * curve["median"][0]


def test_plateau_reads_the_last_fifth_of_a_curve():
    flat = {"step": [0, 50, 80, 90, 100], "mean": [1.0, 0.5, 0.5, 0.499, 0.495], "median": [1.0, 0.2, 0.2, 0.2, 0.21]}
    p = pre.plateau(flat)
    assert p["from_step"] == 80 and p["mean_improvement"] == pytest.approx(0.01) and p["stopped"]
    falling = {**flat, "median": [1.0, 0.2, 0.2, 0.15, 0.1]}
    assert not pre.plateau(falling)["stopped"] and pre.plateau(falling)["median_improvement"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="window"):
        pre.plateau(flat, window=1.5)


def test_long_summary_counts_the_seeds():
    two = lambda a, b: {"2": [a, b]}  # noqa: E731
    b = {"seed": [0, 1], "long_loss": two(0.01, 5.0), "long_loss_se": two(1e-4, 4.0), "long_loss_median": two(1e-3, 2e-3),
         "long_plateau": two(True, False), "lsa_loss": two(0.05, 0.05), "lsa_loss_se": two(1e-3, 1e-3),
         "lsa_loss_median": two(0.01, 0.01)}
    for name in ("gd", "pgd", "gdpp"):
        b[f"{name}_loss"], b[f"{name}_loss_se"], b[f"{name}_loss_median"] = two(0.02, 0.02), two(1e-4, 1e-4), two(0.01, 0.01)
    s = pre.long_summary(b)["2"]
    assert s["seeds"] == [0, 1] and s["below"]["gdpp"] == {"mean": 1, "median": 2} and s["below"]["quick"]["mean"] == 1
    assert s["fragile"] == 1 and s["n_plateau"] == 1 and s["mean_over_median"] == [10.0, 2500.0]
    b["long_loss"]["2"][1] = None  # a seed that ships no model is left out
    for k in ("long_loss_se", "long_loss_median", "long_plateau"):
        b[k]["2"][1] = None
    assert pre.long_summary(b)["2"]["seeds"] == [0]


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: pc.rotated_covariance(scales=(1.0, -1.0)), "scales"),
        (lambda: pc.optimal_preconditioner(torch.ones(2, 3), 5), "cov"),
        (lambda: pc.optimal_preconditioner(torch.eye(3), 0), "n_ctx"),
        (lambda: pc.preconditioned_step_loss(torch.eye(2), torch.eye(3), 5), "gamma"),
        (lambda: pc.relative_error(torch.eye(2), torch.eye(3)), "shape"),
        (lambda: pre.covariance(QUICK, anisotropy=0.0), "anisotropy"),
        (lambda: GDPlusPlus(1.0, 0.1, n_steps=-1), "n_steps"),
        (lambda: gdpp_transformer(3, 1.0, 0.1, n_steps=0), "n_steps"),
        (lambda: tune_gdpp(None, n_steps=0), "n_steps"),
    ],
)
def test_bad_input_raises_value_error(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --- exercise checks ---------------------------------------------------------------------------------


def test_checks_pass_the_reference_solutions():
    assert checks.optimal_preconditioner(lambda cov, n: pc.optimal_preconditioner(cov, n)).passed

    class Solver:
        def __init__(self, eta, n_steps, gamma):
            self.gd = icl.GradientDescent(eta, n_steps, gamma)

        def predict(self, xs, ys, x_query):
            return self.gd.predict(xs, ys, x_query)

    assert checks.preconditioned_gd(Solver).passed
    assert checks.implicit_models_per_layer(implicit_weights_per_layer).passed


def test_checks_explain_planted_mistakes():
    result = checks.optimal_preconditioner(lambda cov, n: torch.linalg.inv(cov))
    assert result.status == "wrong" and "infinitely many" in result.message

    class Transposed:
        def __init__(self, eta, n_steps, gamma):
            self.gd = icl.GradientDescent(eta, n_steps, gamma.T)

        def predict(self, xs, ys, x_query):
            return self.gd.predict(xs, ys, x_query)

    result = checks.preconditioned_gd(Transposed)
    assert result.status == "wrong" and "Gamma^T" in result.message

    result = checks.implicit_models_per_layer(lambda m, xs, ys, xq: icl.implicit_weights(m, xs, ys, xq))
    assert result.status == "wrong" and "not only the last" in result.message

    def unfinished(cov, n):
        raise NotImplementedError

    assert checks.optimal_preconditioner(unfinished).status == "not implemented"


def test_the_implicit_model_check_draws_models_of_moderate_scale(monkeypatch):
    """Its random models once had implicit weights up to 1e38, and wrong answers got feedback in 1e11s."""
    from icl_course.metrics import implicit_weights_per_layer

    seen = []
    real = implicit_weights_per_layer

    def spy(model, xs, ys, xq):
        w = real(model, xs, ys, xq)
        seen.append(w.abs().max().item())
        return w

    monkeypatch.setattr(checks, "implicit_weights_per_layer", spy)
    monkeypatch.delenv("ICL_COURSE_CHECKS", raising=False)
    for _ in range(100):
        checks.implicit_models_per_layer(lambda model, xs, ys, xq: spy(model, xs, ys, xq))
    assert 1e-3 < min(seen) and max(seen) < 1e4, (min(seen), max(seen))
