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
    ood_max_rel_gap=("<", 0.15),  # max over the test input ranges of |LSA loss / GD loss - 1| (0.025 +- 0.021)
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
        "loss_curve", "alignment", "matrices", "step_size", "out_of_distribution", "interpolation", "recurrent"
    }


# --- recurrent LSA against GD and GD++ ------------------------------------------------------------

from icl_course import pretrained  # noqa: E402
from icl_course.linear_transformer import read_gdpp  # noqa: E402
from icl_course.topics.gd_step import recurrent, softmax  # noqa: E402

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from icl_course.metrics import evaluate  # noqa: E402


@claim(
    recurrent_over_gdpp=("<", 1.05),  # held-out loss of the trained two-loop model / tuned two-step GD++
    recurrent_over_gd2=("<", 0.8),  # ... / tuned two-step plain GD: it beats plain GD clearly
    gamma_positive=(">", 0.1),  # the learned gamma (paper's convention) / tuned GD++'s: positive, same sign
    gamma_rel_error=("<", 0.2),  # |learned gamma / tuned GD++ gamma - 1|
    cosine_gdpp=(">", 0.99),  # implicit-model cosine with tuned GD++
)
def recurrent_claims(seed):
    """A recurrent two-loop LSA at n = 10, trained 1500 steps (half the shipped models' run) from ``seed``."""
    model, _ = recurrent.train_recurrent(recurrent.RecurrentSpec(10, 2, seed), device="cpu", steps=1500)
    config = recurrent.RecurrentConfig(seeds=(seed,), n_eval=5000, n_tune=5000)
    row = recurrent.compare(10, 2, [model], config)
    gamma = row["gamma"]["mean"]
    return {
        "recurrent_over_gdpp": row["model_loss"]["mean"] / row["gdpp_loss"],
        "recurrent_over_gd2": row["model_loss"]["mean"] / row["gd_loss"],
        "gamma_positive": gamma / row["gdpp_gamma"],
        "gamma_rel_error": abs(gamma / row["gdpp_gamma"] - 1),
        "cosine_gdpp": row["cosine_gdpp"]["mean"],
    }


def test_recurrent_two_loop_lsa_matches_gdpp_not_plain_gd():
    recurrent_claims.check()


@claim(
    n25_recurrent_over_gdpp=("<", 1.1),  # at n = 25: held-out loss / tuned two-step GD++'s
    n25_gamma_rel_error=("<", 0.1),  # |learned gamma / tuned GD++ gamma - 1|
)
def recurrent_n25_claims(seed):
    """The two-loop recipe at n = 25, where the first recipe stalled, trained 1500 steps (half the shipped run):
    two runs (seeds ``2 seed`` and ``2 seed + 1``), the one with the lower loss on the recipe's validation
    sequences scored on the held-out ones.

    One run is not enough: the recipe still stalls now and then at n = 25 (with float32 draws, seed 2 of
    0-6 ended at 11.8x GD++'s loss, gamma off by 105%, and stayed there at 3000 steps); the other six came
    within 7% of GD++. A stalled run is plain on validation, so a restart chosen there is the recipe."""
    runs = [recurrent.train_recurrent(recurrent.RecurrentSpec(25, 2, s), device="cpu", steps=1500)[0]
            for s in (2 * seed, 2 * seed + 1)]
    validation = recurrent.validation_set(25)
    model = min(runs, key=lambda m: evaluate(m, validation))
    row = recurrent.compare(25, 2, [model], recurrent.RecurrentConfig(seeds=(seed,), n_eval=5000, n_tune=5000))
    return {"n25_recurrent_over_gdpp": row["model_loss"]["mean"] / row["gdpp_loss"],
            "n25_gamma_rel_error": abs(row["gamma"]["mean"] / row["gdpp_gamma"] - 1)}


def test_recurrent_recipe_learns_gdpp_at_n25():
    recurrent_n25_claims.check()


@pytest.fixture(scope="module")
def shipped_two_loop():
    """The shipped two-loop models at every n (3 seeds each) against tuned GD and GD++ (3000 sequences)."""
    return recurrent.run_recurrent(recurrent.RecurrentConfig(deep_loops=None, n_eval=3000, n_tune=3000))


@pytest.mark.parametrize("n", [10, 25, 50, 100])
def test_shipped_two_loop_models_remeasure_their_provenance(n):
    """Each shipped two-loop model gives back the gamma and the validation loss its record claims, and
    was trained with the recipe the pilot chose (the same for every n)."""
    for seed in (0, 1, 2):
        spec = recurrent.RecurrentSpec(n, 2, seed)
        record, model = pretrained.provenance(spec.name), pretrained.load(spec.name)
        assert record["task"]["n_ctx"] == n and record["selection"] == pretrained.one_run(seed)
        assert record["train"]["lr"] == recurrent.TWO_LOOP_RECIPE["lr"] and record["train"]["steps"] == recurrent.TRAIN.steps
        assert record["train"]["init_std"] == recurrent.TWO_LOOP_RECIPE["init_std"]
        eta, gamma = read_gdpp(model.layer)
        assert gamma / n == pytest.approx(record["metrics"]["gamma_paper_convention"], rel=1e-4)
        assert eta == pytest.approx(record["metrics"]["eta"], rel=1e-4)
        with pretrained.drawn_as(record):  # the recorded validation sequences, drawn as when the weights were shipped
            loss = evaluate(model, recurrent.validation_set(n))
        assert loss == pytest.approx(record["metrics"]["validation_loss"], rel=1e-3)


def test_recipe_is_the_pilots_choice_on_validation():
    pilot = recurrent.RECIPE_PILOT
    total = {r: sum(math.log(v) for v in vals.values()) for r, vals in pilot["validation"].items()}
    assert pilot["chosen"] == min(total, key=total.get) and set(pilot["validation"][pilot["chosen"]]) == {"10", "25", "50", "100"}


@pytest.mark.parametrize("n", [10, 25, 50])
def test_shipped_two_loop_models_learn_gdpp_with_the_papers_gamma(shipped_two_loop, n):
    """At n = 10, 25, 50 every seed's gamma lies within 10% of tuned two-step GD++'s and the mean
    within 10% of the paper's trained gamma; every seed's loss within 5% of GD++'s, below plain GD's."""
    r = shipped_two_loop.row(n, 2)
    assert max(r["off_gdpp_by_seed"]) < 0.05, r
    assert all(abs(g / r["gdpp_gamma"] - 1) < 0.1 for g in r["gamma_by_seed"]), r
    assert abs(r["gamma"]["mean"] / recurrent.PAPER_GAMMA[n] - 1) < 0.1, r
    assert max(r["model_loss_by_seed"]) / r["gdpp_loss"] < 1.05, r
    assert max(r["model_loss_by_seed"]) / r["gd_loss"] < 0.8, r


def test_shipped_two_loop_models_at_n100_learn_gdpp_or_stall(shipped_two_loop):
    """What the chapter reports at n = 100: each seed either learns GD++ (gamma within 10% of tuned
    GD++'s, loss within 5%, no off-GD++ part) or stalls above two plain GD steps' loss with one input
    direction on a path of its own (off-GD++ part above 0.3); two of the three seeds stall."""
    r = shipped_two_loop.row(100, 2)
    rows = list(zip(r["gamma_by_seed"], r["model_loss_by_seed"], r["off_gdpp_by_seed"]))
    learned = [abs(g / r["gdpp_gamma"] - 1) < 0.1 and loss / r["gdpp_loss"] < 1.05 and off < 0.05 for g, loss, off in rows]
    stalled = [loss > r["gd_loss"] and off > 0.3 for g, loss, off in rows]
    assert all(a != b for a, b in zip(learned, stalled)), rows
    assert sum(stalled) == 2 and shipped_two_loop.metrics["recurrent_stalled_by_n"]["100"] == 2, rows


def test_tuned_gdpp_gamma_falls_with_n_like_the_papers(shipped_two_loop):
    """Tuned two-step GD++'s gamma falls with n and lies within 10% of the paper's trained gamma at
    every n (both in the paper's convention, without 1/n)."""
    result = shipped_two_loop
    gammas = [result.gdpp_gamma[n] for n in sorted(result.gdpp_gamma)]
    assert gammas == sorted(gammas, reverse=True), gammas
    for n, gamma in result.gdpp_gamma.items():
        assert abs(gamma / recurrent.PAPER_GAMMA[n] - 1) < 0.1, (n, gamma)
    m = result.metrics  # metrics.json keys: recurrent_gamma keyed by n, with its spread
    assert set(m["recurrent_gamma"]) == {"10", "25", "50", "100"}
    assert m["recurrent_gamma"]["25"]["by_seed"] == result.row(25, 2)["gamma_by_seed"]


def test_shipped_five_loop_models_beat_five_gd_steps():
    config = recurrent.RecurrentConfig(n_ctxs=(), gdpp_n_ctxs=(), n_eval=3000, n_tune=3000)
    row = recurrent.run_recurrent(config).row(10, 5)
    assert max(row["model_loss_by_seed"]) < row["gd_loss"], row


# --- one softmax attention layer ------------------------------------------------------------------


def test_softmax_layer_shapes_and_the_flat_attention_closed_form():
    """With Q = 0 every score ties: the layer adds the mean of P c_j over the context (float64)."""
    model = softmax.softmax_transformer(d=4, n_heads=2, init_std=0.3, seed=1).double()
    b = gd_step.make_task(replace(gd_step.CONFIGS["smoke"], d=4)).sample(50, gd_step.generator(0), dtype=torch.float64)
    assert model.predict(b.xs, b.ys, b.x_query).shape == (50,)
    with torch.no_grad():
        model.layer.Q.zero_()
    C = torch.cat([b.xs, b.ys[..., None]], dim=-1)  # (B, n, D)
    want = -(C.mean(dim=1) @ model.layer.P.sum(dim=0).T)[:, -1]
    assert torch.allclose(model.predict(b.xs, b.ys, b.x_query), want, atol=1e-12, rtol=0)


def test_softmax_query_is_no_key_and_output_follows_the_inputs_device():
    model = softmax.softmax_transformer(d=3, n_heads=2, init_std=0.5)
    Z = torch.randn(2, 6, 4)
    Z2 = Z.clone()
    Z2[:, -1] += 1.0
    assert torch.equal(model(Z)[:, :-1], model(Z2)[:, :-1])  # the query changes no other token
    meta = softmax.softmax_transformer(d=3).to("meta")
    out = meta.predict(*(torch.zeros(s, device="meta") for s in ((2, 5, 3), (2, 5), (2, 3))))
    assert out.device.type == "meta"


def test_softmax_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="d must"):
        softmax.softmax_transformer(d=0)
    with pytest.raises(ValueError, match="n_heads"):
        softmax.softmax_transformer(d=3, n_heads=0)
    with pytest.raises(ValueError, match="init_std"):
        softmax.softmax_transformer(d=3, init_std=-1.0)
    model = softmax.softmax_transformer(d=3)
    with pytest.raises(ValueError, match="Z must"):
        model(torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="xs"):
        model.predict(torch.zeros(2, 5, 4), torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        model.predict(torch.zeros(2, 5, 3, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64),
                      torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer"):
        softmax.SoftmaxTransformer(torch.nn.Linear(2, 2))


def test_shipped_softmax_models_one_head_falls_short_two_heads_come_closer():
    """Re-measures the shipped softmax layers on fresh held-out sequences against the best GD step."""
    config = gd_step.CONFIGS["quick"]
    task = gd_step.make_task(config)
    batch = task.sample(5000, gd_step.generator(7))
    gd, *_ = gd_step.best_one_step(task.sample(5000, gd_step.generator(8)), batch)
    m = softmax.run_softmax(softmax.SoftmaxConfig(), batch, gd)
    worst = {h: max(v) for h, v in m["softmax_loss_by_seed"].items()}
    best_gd = gd_step.evaluate(gd, batch)
    assert min(m["softmax_loss_by_seed"]["1"]) / best_gd > 1.2, m  # one head: clearly worse than one GD step
    assert worst["2"] < min(m["softmax_loss_by_seed"]["1"]), m  # two heads: better than one on every seed
