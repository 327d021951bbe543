"""The mixed-noise chapter: ridge baselines, the discovered algorithm, the shipped weights, the checks."""

import dataclasses
import functools
import math
import shutil
from dataclasses import replace

import pytest
import torch
from margins import claim

import icl_course as icl
from icl_course import pretrained
from icl_course.solvers import GDPlusPlus, GradientDescent
from icl_course.topics.mixed_noise import checks
from icl_course.topics.mixed_noise import experiment as mn
from icl_course.topics.mixed_noise.discovered_algorithm import DiscoveredAlgorithm, LayerCoefficients
from icl_course.topics.mixed_noise.ridge import AdaRR, ConstRR, OracleRidge, TunedRR, noise_estimate, tune_const_ridge


CHAPTER_SETTINGS = ("U(0,2)", "U(0,5)", "{1,3}")  # the table's settings (mn.SETTINGS has every Table 1 column)


@functools.lru_cache(maxsize=1)
def eval_sets(seed: int = 0) -> dict:
    """Fresh sequences for every setting: ``(batch, tune)`` of 50k and 20k, from eval seed ``seed``.

    Their generators (90 + 10 seed + i and 95 + 10 seed + i) are used neither by the experiment
    (seeds from 1000 on) nor by the provenance; the claims below are measured over eval seeds.
    """
    sets = {}
    for i, setting in enumerate(CHAPTER_SETTINGS):
        task = mn.make_task(setting)
        sets[setting] = (task.sample(50_000, icl.generator(90 + 10 * seed + i)),
                         task.sample(20_000, icl.generator(95 + 10 * seed + i)))
    return sets


def head(batch, n: int):
    """The first ``n`` sequences of ``batch``."""
    return icl.RegressionBatch(*(t[:n] for t in batch.tensors()))


# --- closed forms --------------------------------------------------------------------------------


TABLE_SETTINGS = ("U(0,2)", "U(0,5)")  # the settings of the paper's table 1 that ridge baselines are compared in


# The gaps to the paper's table are bounded by what 50k eval sequences resolve (tests/margins.md): over
# eval seeds ConstRR's adjusted loss at U(0,5) scatters by 0.006, AdaRR's by 0.004, and a 20k-sequence
# tuning set finds lam = E[sigma^2] to within a few percent.
@claim(
    **{"const_rr_table_gap U(0,2)": ("<", 0.015), "const_rr_table_gap U(0,5)": ("<", 0.035)},  # |ConstRR - table 1|
    **{"ada_rr_table_gap U(0,2)": ("<", 0.01), "ada_rr_table_gap U(0,5)": ("<", 0.02)},  # |AdaRR - table 1|
    # |tuned ConstRR penalty / E[sigma^2] - 1|: the best predictor linear in y is ridge with lam = E[sigma^2]
    **{f"const_penalty_rel_error {s}": ("<", 0.1) for s in CHAPTER_SETTINGS},
)
def ridge_claims(seed):
    """The ridge baselines on the eval sets of eval seed ``seed`` (ConstRR tuned on the tuning half)."""
    sets, out = eval_sets(seed), {}
    for setting, (batch, tune) in sets.items():
        const = tune_const_ridge(tune)
        out[f"const_penalty_rel_error {setting}"] = abs(const.lam / mn.mean_noise_variance(setting) - 1)
        if setting in TABLE_SETTINGS:
            out[f"const_rr_table_gap {setting}"] = abs(mn.adjusted_loss(const, batch) - mn.PAPER_TABLE1["ConstRR"][setting])
            out[f"ada_rr_table_gap {setting}"] = abs(mn.adjusted_loss(AdaRR(), batch) - mn.PAPER_TABLE1["AdaRR"][setting])
    return out


@pytest.mark.parametrize("setting", TABLE_SETTINGS)
def test_const_and_ada_ridge_match_the_papers_table(setting):
    ridge_claims.check(keys=[f"const_rr_table_gap {setting}", f"ada_rr_table_gap {setting}"])


@pytest.mark.parametrize("setting", CHAPTER_SETTINGS)
def test_const_ridge_penalty_is_the_mean_noise_variance(setting):
    ridge_claims.check(keys=[f"const_penalty_rel_error {setting}"])


@claim(noise_estimate_rel_error=("<", 0.02))  # |mean of the noise estimate over 100k sequences / (25/3) - 1|
def noise_estimate_claims(seed):
    big = mn.make_task("U(0,5)").sample(100_000, icl.generator(4 + 1000 * seed), dtype=torch.float64)
    return {"noise_estimate_rel_error": abs(noise_estimate(big.xs, big.ys).mean().item() / (25 / 3) - 1)}


def test_noise_estimate_is_unbiased():
    # E[sigma^2] = 25/3 for sigma ~ U(0, 5)
    noise_estimate_claims.check()


def test_ridge_family_closed_forms():
    batch = mn.make_task("U(0,5)").sample(256, icl.generator(3), dtype=torch.float64)
    xs, ys = batch.xs, batch.ys
    # the oracle is the posterior mean (X^T X + sigma^2 I)^{-1} X^T y, sequence by sequence
    b = 7
    A = xs[b].T @ xs[b] + batch.sigma[b] ** 2 * torch.eye(10, dtype=torch.float64)
    w = torch.linalg.solve(A, xs[b].T @ ys[b])
    assert torch.allclose(OracleRidge(batch.sigma).weights(xs, ys)[b], w, atol=1e-12)
    # TunedRR without cap and with scale 1 is AdaRR; a tiny cap and scale make it least squares-like
    assert torch.allclose(TunedRR().weights(xs, ys), AdaRR().weights(xs, ys))
    ols = icl.LeastSquares().weights(xs, ys)
    assert torch.allclose(TunedRR(cap=1e-12, scale=1e-3).weights(xs, ys), ols, atol=1e-9)
    assert torch.allclose(ConstRR(0.0).weights(xs, ys), ols, atol=1e-9)


def test_discovered_algorithm_reproduces_a_random_diag_stack_in_float64():
    # several heads and large coefficients, so every term of the algorithm matters
    model = icl.linear_transformer(10, n_layers=4, n_heads=3, attention="diag", init_std=0.3, seed=5).double()
    batch = mn.make_task("U(0,5)").sample(500, icl.generator(6), dtype=torch.float64)
    algorithm = DiscoveredAlgorithm.from_model(model)
    got = algorithm.predict(batch.xs, batch.ys, batch.x_query)
    want = model.predict(batch.xs, batch.ys, batch.x_query)
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    # and its weights are the model's implicit model d y_hat / d x_q
    w = icl.implicit_weights(model, batch.xs, batch.ys, batch.x_query)
    assert torch.allclose(algorithm.weights(batch.xs, batch.ys), w, atol=1e-8)


def test_discovered_algorithm_contains_gd_and_gdpp():
    batch = mn.make_task("U(0,2)").sample(300, icl.generator(7), dtype=torch.float64)
    args = (batch.xs, batch.ys, batch.x_query)
    gd_only = DiscoveredAlgorithm([LayerCoefficients(0.0, 0.0, -0.3, 0.0)] * 3)
    assert torch.allclose(gd_only.predict(*args), GradientDescent(0.3, n_steps=3).predict(*args), atol=1e-10)
    gdpp = DiscoveredAlgorithm([LayerCoefficients(-0.05, 0.0, -0.3, 0.0)] * 3)
    assert torch.allclose(gdpp.predict(*args), GDPlusPlus(0.3, 0.05, n_steps=3).predict(*args), atol=1e-10)


# --- the shipped weights -------------------------------------------------------------------------


SHIPPED_NAMES = pretrained.available("mixed_noise/")


def trained_seed_runs() -> tuple:
    """The headline model's other seeds whose training did not diverge (those ship weights)."""
    runs = pretrained.provenance(mn.SHIPPED[3].name)["selection"]["runs"]
    return tuple(spec for spec in mn.SEED_RUNS if "diverged" not in runs[str(spec.seed)])


# DIAG-4L on U(0,3): 0.27 on its provenance's 50k test sequences, above ConstRR's 0.16, but 0.077 on the
# 50k validation sequences: a few test sequences blow it up (the chapter and the sweep claims say so).
HEAVY_TAILED = {"mixed_noise/diag-4l-u3"}


def test_every_shipped_model_is_there_with_provenance():
    assert mn.SHIPPED[3] == replace(mn.SEED_RUNS[0], seed=0)  # the headline model is seed 0 of its set
    expected = (mn.SHIPPED + (mn.RANDOM_INIT,) + trained_seed_runs() + mn.DEEP + mn.DEEP_SEED_RUNS + mn.SWEEP_FILES
                + mn.TWO_LEVEL)
    assert sorted(SHIPPED_NAMES) == sorted(spec.name for spec in expected)
    assert len(trained_seed_runs()) >= 2  # the spread over seeds needs runs to spread over
    for spec in mn.CONFIGS["quick"].models + mn.CONFIGS["quick"].sweep_models + mn.SWEEP_FILES + mn.DEEP_SEED_RUNS:
        # what `full` retrains is what shipped
        recorded = pretrained.provenance(spec.name)["spec"]  # (older records have no "init": they used "gd")
        assert {**dataclasses.asdict(spec), **recorded} == dataclasses.asdict(spec), spec.name
    for name in SHIPPED_NAMES:
        record = pretrained.provenance(name)
        for key in ("spec", "train_config", "metrics", "eval", "sha256", "architecture", "train_seconds"):
            assert key in record, (name, key)
        assert record["eval"]["n_eval"] >= 50_000
        # a sanity floor that a training blow-up would break: from 2 layers on, DIAG and FULL beat
        # the best constant ridge, and GD++ stays near it
        const = mn.PAPER_TABLE1["ConstRR"][record["setting"]]
        claimed, spec = record["metrics"]["adjusted_loss"], record["spec"]
        if spec["attention"] == "gdpp":
            assert claimed < 1.25 * const, name
        elif name in HEAVY_TAILED:  # its test mean is carried by a few blown-up sequences: check validation
            chosen = record["selection"]["runs"][str(record["selection"]["chosen"])]
            assert chosen["validation"] < const, name
        elif spec["n_layers"] >= 2:  # (where ConstRR is itself near the oracle, sigma_max <= 1: below 0.05;
            # a shallow sweep model where the paper's own model of that depth is above ConstRR: below twice it)
            paper = mn.PAPER_TABLE1[record["method"]][record["setting"]]
            assert claimed < max(const, 0.05, 2 * paper), name


@functools.lru_cache(maxsize=3)
def provenance_eval_set(setting: str, n_eval: int, seed: int, draws: str | None = None):
    """The sequences a provenance record was measured on, drawn as when the weights were shipped (``draws``:
    the record's field, see ``pretrained.drawn_as``)."""
    with pretrained.drawn_as({} if draws is None else {"draws": draws}):
        return mn.make_task(setting).sample(n_eval, icl.generator(seed))


# On fresh sequences the shipped models' losses scatter by ~0.01 around the provenance at 20k sequences,
# and FULL-4L's mean is carried by a few sequences (one eval seed gave 743): the claim is checked on the
# provenance's own evaluation sequences instead, which makes it seed-independent (std 0, z inf).
@claim(**{f"provenance_rel_gap {name}": ("<", 1e-3) for name in SHIPPED_NAMES})
def shipped_claims(seed):
    """|adjusted loss of each shipped model on its provenance's eval sequences / the recorded one - 1|.
    The sequences do not depend on ``seed``, so the values are measured once per thread count."""
    return _provenance_gaps(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _provenance_gaps(threads: int) -> dict:
    out = {}
    for name in sorted(SHIPPED_NAMES, key=lambda n: pretrained.provenance(n)["setting"]):  # eval sets cached
        record = pretrained.provenance(name)
        batch = provenance_eval_set(record["setting"], record["eval"]["n_eval"], record["eval"]["seed"],
                                    record.get("draws"))
        value = mn.adjusted_loss(pretrained.load(name), batch)  # load verifies the checksum
        out[f"provenance_rel_gap {name}"] = abs(value / record["metrics"]["adjusted_loss"] - 1)
    return out


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_shipped_model_has_the_loss_its_provenance_claims(name):
    shipped_claims.check(keys=[f"provenance_rel_gap {name}"])


@pytest.mark.parametrize("n_layers", mn.SWEEP_DEPTHS)
def test_every_sweep_column_chose_between_the_same_two_runs_on_validation(n_layers):
    """The noise sweep's protocol at every depth: two runs per column (the sweep's recipe, the clamped
    one; run 0 only at the depths of SWEEP_ONE_RUN), each with a validation and a test score, the lower
    validation score chosen, and SWEEP_MODELS naming that run; run 0's recipe is the same on every column
    (SHIPPED's, where the column shares it)."""
    assert n_layers in mn.SWEEP_CHOSEN, f"DIAG-{n_layers}L's sweep is not shipped"
    assert mn.SWEEP_RULE == mn.sweep_rule(4) and all(f"DIAG-{n}L" in mn.sweep_rule(n) for n in mn.SWEEP_DEPTHS)
    for setting in mn.SETTINGS:
        selection = pretrained.provenance(mn.sweep_record_file(setting, n_layers).name)["selection"]
        n_runs = 1 if n_layers in mn.SWEEP_ONE_RUN else 2
        assert len(mn.sweep_runs(setting, n_layers)) == n_runs
        assert selection["rule"] == mn.sweep_rule(n_layers), setting
        assert sorted(selection["runs"]) == [str(k) for k in range(n_runs)], setting
        scores = {int(k): r["validation"] for k, r in selection["runs"].items()}
        assert all("test" in r for r in selection["runs"].values()), setting
        chosen_k = mn.SWEEP_CHOSEN[n_layers][setting]
        assert selection["chosen"] == min(scores, key=lambda k: (scores[k], k)) == chosen_k, setting
        assert selection["validation"] == {"generator": mn.EVAL_SEED + 600, "n_eval": 50_000}
        assert selection["validation"]["generator"] != selection["test"]["generator"]
        for k in range(n_runs):  # what each run's record says it trained with is the protocol's recipe
            spec = mn.sweep_run(setting, k, n_layers)
            assert selection["runs"][str(k)]["recipe"] == {a: getattr(spec, a) for a in ("lr", "steps", "clamp")}
            assert (spec.n_layers, spec.setting, spec.seed, spec.init) == (n_layers, setting, 0, "gd")
        chosen = mn.sweep_model(setting, n_layers)
        assert chosen in mn.SWEEP_MODELS and chosen == mn.sweep_run(setting, chosen_k, n_layers)
        record = pretrained.provenance(chosen.name)  # the file that ships is the chosen run's
        assert record["spec"]["lr"] == chosen.lr and record["spec"]["steps"] == chosen.steps, setting
        assert record["metrics"]["adjusted_loss"] == selection["runs"][str(chosen_k)]["test"], setting
    run0 = {(r.lr, r.steps, r.clamp) for c in mn.SETTINGS if (c, n_layers) not in mn.SWEEP_SHARED
            for r in mn.sweep_runs(c, n_layers)[:1]}
    assert len(run0) == 1  # one recipe for every column's run 0 (before a retry)


def test_sweep_runs_checks_its_arguments():
    with pytest.raises(ValueError, match="n_layers"):
        mn.sweep_runs("U(0,2)", 5)
    with pytest.raises(ValueError, match="setting"):
        mn.sweep_runs("U(0,9)", 2)


def test_deep_seed_sets_share_one_record_chosen_on_validation():
    for base in mn.DEEP_SEEDED:
        records = [pretrained.provenance(s.name)["selection"] for s in (base, *mn.DEEP_SEED_RUNS) if s.method == base.method]
        assert len(records) == 1 + len(mn.DEEP_SEEDS) and all(r == records[0] for r in records)
        runs = records[0]["runs"]
        assert sorted(runs) == [str(s) for s in (0, *mn.DEEP_SEEDS)]
        scores = {int(k): r["validation"] for k, r in runs.items()}
        assert records[0]["chosen"] == min(scores, key=scores.get)


def test_seed_spread_reports_every_seed_and_chooses_on_validation():
    config = replace(mn.CONFIGS["quick"], n_eval=2_000)
    specs = (mn.SHIPPED[3], *trained_seed_runs())
    models = {(mn.SHIPPED[3].method if s.seed == 0 else mn._seed_method(s), s.setting): pretrained.load(s.name)
              for s in specs}
    test = mn.make_task("U(0,5)").sample(2_000, icl.generator(123))
    table = {m: {"U(0,5)": mn.adjusted_loss(model, test)} for (m, _), model in models.items()}
    se = {m: {"U(0,5)": 0.01} for m in table}
    out = mn.seed_spread(config, models, table, se, torch.device("cpu"))
    assert out["seeds"] == [s.seed for s in specs] and out["attempted"] == [0, 1, 2, 3, 4]
    assert sorted(out["seeds"] + list(out["diverged"])) == out["attempted"]
    assert out["test"] == [table[m]["U(0,5)"] for (m, _) in models]
    best = out["seeds"][min(range(len(specs)), key=out["validation"].__getitem__)]
    assert out["chosen_seed"] == best and out["chosen_test"] == out["test"][out["seeds"].index(best)]
    assert out["validation"] != out["test"]  # chosen on sequences of its own


def test_a_damaged_weight_file_is_refused(tmp_path):
    name = SHIPPED_NAMES[0]
    target = tmp_path / "mixed_noise"
    target.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(pretrained.WEIGHTS_DIR / f"{name}{suffix}", target)
    pretrained.load(name, folder=tmp_path)  # an intact copy loads
    data = bytearray((tmp_path / f"{name}.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / f"{name}.pt").write_bytes(bytes(data))
    with pytest.raises(pretrained.ChecksumError, match="sha256"):
        pretrained.load(name, folder=tmp_path)


def test_save_and_load_round_trip(tmp_path):
    model = icl.linear_transformer(4, n_layers=2, attention="gdpp", n_heads=2, clamp=50.0, seed=1)
    pretrained.save("demo/gdpp", model, {"note": "test"}, folder=tmp_path)
    loaded = pretrained.load("demo/gdpp", folder=tmp_path)
    batch = icl.RegressionTask(d=4, n_ctx=8).sample(16, icl.generator(0))
    args = (batch.xs, batch.ys, batch.x_query)
    assert torch.equal(loaded.predict(*args), model.predict(*args))
    assert pretrained.provenance("demo/gdpp", folder=tmp_path)["architecture"]["clamp"] == 50.0


# --- the headline claim, with the shipped weights ------------------------------------------------


def _deepest(attention):
    specs = [s for s in mn.SHIPPED if s.attention == attention and s.setting == "U(0,5)"]
    return max(specs, key=lambda s: s.n_layers)


@claim(
    diag_over_gdpp=("<", 0.5),  # deepest DIAG / deepest GD++ adjusted loss, U(0,5) (the paper: 0.047 / 0.344)
    gdpp_over_const_rel_error=("<", 0.15),  # |GD++ / tuned ConstRR - 1|: GD++ behaves like one fixed ridge penalty
    algorithm_max_abs_diff=("<", 1e-5),  # the algorithm read from the deepest DIAG model against it, float64
)
def deep_diag_claims(seed):
    batch, tune = eval_sets(seed)["U(0,5)"]
    batch = head(batch, 20_000)
    diag = mn.adjusted_loss(pretrained.load(_deepest("diag").name), batch)
    gdpp = mn.adjusted_loss(pretrained.load(_deepest("gdpp").name), batch)
    const = mn.adjusted_loss(tune_const_ridge(tune), batch)
    model = pretrained.load(_deepest("diag").name, dtype=torch.float64)
    b = head(batch, 2000).to(dtype=torch.float64)
    got = DiscoveredAlgorithm.from_model(model).predict(b.xs, b.ys, b.x_query)
    return {
        "diag_over_gdpp": diag / gdpp,
        "gdpp_over_const_rel_error": abs(gdpp / const - 1),
        "algorithm_max_abs_diff": (got - model.predict(b.xs, b.ys, b.x_query)).abs().max().item(),
    }


def test_deep_diag_beats_gdpp_which_lands_near_const_ridge():
    deep_diag_claims.check(keys=["diag_over_gdpp", "gdpp_over_const_rel_error"])


def test_discovered_algorithm_reproduces_the_deepest_diag_model():
    deep_diag_claims.check(keys=["algorithm_max_abs_diff"])


def test_per_layer_read_out_of_a_gd_stack_is_gd_after_each_step():
    """float64: the read-out after layer l of the exact GD transformer is l GD steps (the closed form)."""
    batch = mn.make_task("U(0,2)").sample(500, icl.generator(5), dtype=torch.float64)
    model = icl.gd_transformer(10, eta=0.3, n_steps=4, dtype=torch.float64)
    values, errors = mn.per_layer_adjusted(model, batch)
    expected = [mn.adjusted_loss(GradientDescent(0.3, n_steps=l), batch) for l in range(1, 5)]
    assert values == pytest.approx(expected, abs=1e-10)
    assert values[-1] == pytest.approx(mn.adjusted_loss(model, batch), abs=1e-12)
    assert len(errors) == 4 and all(e > 0 for e in errors)
    with pytest.raises(ValueError, match="model"):
        mn.per_layer_adjusted(GradientDescent(0.3, n_steps=2), batch)


def _u5_stacks():
    """The shipped DIAG and GD++ stacks trained on U(0,5) with two or more layers. FULL is left out: its
    mean over sequences is carried by rare sequences where it blows up (one eval seed gave 1924 for
    FULL-4L's last read-out), so a ratio of its means says nothing stable."""
    return [s for s in mn.CONFIGS["quick"].models if s.setting == "U(0,5)" and s.n_layers >= 2 and s.attention != "full"]


# The last read-out of every shipped stack is its best: the layers before it are not trained to predict.
# For GD++ and the deepest DIAG the gain of the last layer is small (GDPP-4L: 0.36 after 4 layers, 0.41
# after 3; DIAG-6L: about two thirds of its best earlier read-out).
@claim(**{f"last_over_best_earlier {s.method}": ("<", 1.0) for s in _u5_stacks()})
def per_layer_claims(seed):
    """Each shipped U(0,5) stack's last read-out over its best earlier one, on 20k sequences of eval seed ``seed``."""
    batch = head(eval_sets(seed)["U(0,5)"][0], 20_000)
    out = {}
    for spec in _u5_stacks():
        values, _ = mn.per_layer_adjusted(pretrained.load(spec.name), batch)
        out[f"last_over_best_earlier {spec.method}"] = values[-1] / min(values[:-1])
    return out


def test_the_last_read_out_of_every_shipped_stack_is_its_best():
    per_layer_claims.check()


# The models trained on {1,3} at fixed noise levels (the chapter's section on two noise levels): at
# sigma = 1 DIAG-4L adapts (well below ConstRR, which suits sigma^2 ~ 5), and far beyond its training
# levels it blows up (adjusted loss above 10 at sigma = 6, where ConstRR is near 3; its size is carried by a
# few sequences, 5e14 to 3e17 over eval seeds, so the claim is on its log10).
@claim(diag_over_const_at_sigma_1=("<", 0.6), log10_diag_at_sigma_6=(">", 1.0))
def two_level_claims(seed):
    """DIAG-4L and ConstRR tuned on {1,3}, on 4000 sequences at sigma = 1 and at sigma = 6."""
    tune = eval_sets(seed)["{1,3}"][1]
    const = tune_const_ridge(tune)
    diag = pretrained.load(mn.ModelSpec("diag", 4, "{1,3}").name)
    at = {s: mn._fixed_noise_batch(s, 4000, 500 + 10 * seed + k) for k, s in enumerate((1.0, 6.0))}
    return {"diag_over_const_at_sigma_1": mn.adjusted_loss(diag, at[1.0]) / mn.adjusted_loss(const, at[1.0]),
            "log10_diag_at_sigma_6": math.log10(mn.adjusted_loss(diag, at[6.0]))}


def test_diag_trained_on_two_levels_adapts_between_them_and_blows_up_beyond():
    two_level_claims.check()


# Depth 5-7 on U(0,5) and FULL-4L (clamped, lr 5e-3): each within 2x of the paper's Table 1 entry
# at its depth (the paper: 200k steps, best of 5 seeds; ours: 3000 steps, one seed; both means), and the
# 7-layer DIAG below the 4-layer one (trimmed means, as the depth sweep's: see mn.trimmed_adjusted_loss).
# FULL-6L's mean is not bounded: it is 1.0-1.3x the paper's at four eval seeds and 1.9x at the fifth, where
# one sequence of the 20k carries it (adjusted error 608); its trimmed mean is 0.038-0.049 at all five.
_DEPTH_SPECS = [s for s in mn.SHIPPED + mn.DEEP if s.setting == "U(0,5)" and s.clamp is not None]
_OVER_PAPER = [s for s in _DEPTH_SPECS if s.method != "FULL-6L"]


@claim(**{f"over_paper {s.method}": ("<", 2.0) for s in _OVER_PAPER}, diag_7l_over_4l=("<", 0.9))
def deep_models_claims(seed):
    """Each clamped U(0,5) model's adjusted loss over the paper's, on 20k sequences of eval seed ``seed``."""
    batch = head(eval_sets(seed)["U(0,5)"][0], 20_000)
    out = {f"over_paper {s.method}": mn.adjusted_loss(pretrained.load(s.name), batch) / mn.PAPER_TABLE1[s.method]["U(0,5)"]
           for s in _OVER_PAPER}
    deep = pretrained.load(next(s.name for s in _DEPTH_SPECS if s.method == "DIAG-7L"))
    shallow = pretrained.load(mn._diag(4).name)
    out["diag_7l_over_4l"] = mn.trimmed_adjusted_loss(deep, batch) / mn.trimmed_adjusted_loss(shallow, batch)
    return out


def test_deep_models_come_within_a_factor_of_the_paper():
    deep_models_claims.check()


# Every column of the paper's Table 1 (the noise sweep): ConstRR and AdaRR are closed forms (ConstRR tuned
# on 10k sequences of the column) and land on the paper's rows; each column's own DIAG-4L beats ConstRR
# once the noise levels spread (sigma_max >= 2 and the categorical columns), except U(0,3): that model's
# mean is carried by a few sequences where it blows up (over eval seeds its ratio to ConstRR is 1.2 +- 1.5,
# 0.27 on the provenance's 50k test sequences against a validation score of 0.077), so it is not claimed.
_SWEEP_COLUMNS = list(mn.SETTINGS)
_BEATS = [s for s in _SWEEP_COLUMNS if s not in ("U(0,0)", "U(0,1)", "U(0,3)")]


@claim(
    **{f"sweep_const_rr_gap {s}": ("<", 0.05) for s in _SWEEP_COLUMNS if s != "U(0,0)"},
    **{f"sweep_ada_rr_gap {s}": ("<", 0.05) for s in _SWEEP_COLUMNS if s != "U(0,0)"},
    **{f"sweep_diag_over_const {s}": ("<", 0.8) for s in _BEATS},
)
def sweep_claims(seed):
    """|ConstRR - Table 1| and |AdaRR - Table 1| on 20k sequences of every column (eval seed ``seed``), and
    each column's shipped DIAG-4L over ConstRR."""
    out = {}
    for k, setting in enumerate(_SWEEP_COLUMNS):
        task = mn.make_task(setting)
        batch, tune = task.sample(20_000, icl.generator(600 + 20 * seed + k)), task.sample(10_000, icl.generator(610 + 20 * seed + k))
        const = mn.adjusted_loss(tune_const_ridge(tune), batch)
        if setting != "U(0,0)":  # no noise: every ridge baseline is exact (0 in the paper)
            out[f"sweep_const_rr_gap {setting}"] = abs(const - mn.PAPER_TABLE1["ConstRR"][setting])
            out[f"sweep_ada_rr_gap {setting}"] = abs(mn.adjusted_loss(AdaRR(), batch) - mn.PAPER_TABLE1["AdaRR"][setting])
        if setting in _BEATS:  # (U(0,3) is measured by the provenance claim only)
            model = pretrained.load(mn.sweep_model(setting).name)  # the column's chosen DIAG-4L
            out[f"sweep_diag_over_const {setting}"] = mn.adjusted_loss(model, batch) / const
    return out


def test_ridge_baselines_match_table_1_at_every_column():
    sweep_claims.check(keys=[k for k in sweep_claims.bounds if "_rr_gap" in k])


def test_each_columns_diag_beats_const_ridge():
    sweep_claims.check(keys=[k for k in sweep_claims.bounds if "diag_over_const" in k])


# The sweep along depth (the paper's DIAG rows, 1 to 4 layers, on every column): each added layer lowers
# the adjusted loss of the column's chosen model, on 20k fresh sequences per column (a new eval seed per
# claim seed). The second layer at least halves it everywhere (the paper: to 0.15-0.3 of one layer's), and
# DIAG-1L and DIAG-2L land on the paper's rows on every column but one (by 0.3-6% on average over eval seeds; 20k
# sequences scatter by up to 5%, hence a bound of 25%).
# Depth is compared on the trimmed mean (the 20 worst of the 20k sequences left out, mn.trimmed_adjusted_loss):
# the deep models have heavy tails, and a single sequence can carry the mean (measured with float32 draws,
# eval seeds 0-4: DIAG-4L/DIAG-3L on U(0,3) was 0.74-0.77 at four seeds and 58738 at the fifth, where one
# sequence's adjusted error reached 1.2e8; 3L/2L on {1,3,5} 0.40-0.46 and 31 once). The paper's rows are
# compared on the mean, the paper's statistic.
# Not claimed (measured over eval seeds 0-4 at 20k sequences, and on the records' 50k validation ones):
# - DIAG-4L over DIAG-3L on U(0,7) and {1,3}: trimmed 1.28-1.35 and 0.99-1.06 (the paper: 0.59 and 0.43);
#   our DIAG-4L falls furthest short of the paper's there (the chapter prints it); on U(0,7) it is above
#   DIAG-3L on the 50k validation sequences too (0.161 against 0.117);
# - DIAG-4L over DIAG-3L on U(0,2): trimmed 0.86 to 0.91 on every seed, too close to 1 for a bound;
# - DIAG-2L's mean against the paper's on {1,3,5}: 1.5-6% off at four eval seeds, 22% at the fifth, where
#   one sequence's adjusted error reached 806.
_DEPTHS = sorted(mn.SWEEP_CHOSEN)
_DEPTH_FALLS_SHORT = {(3, 4): ("U(0,7)", "{1,3}", "U(0,2)")}
_PAPER_GAP_TAILS = {(2, "{1,3,5}")}
_DEPTH_PAIRS = [(a, b, s) for a, b in zip(_DEPTHS, _DEPTHS[1:]) for s in mn.SETTINGS
                if s not in _DEPTH_FALLS_SHORT.get((a, b), ())]


@claim(**{f"sweep_depth_ratio {b}L/{a}L {s}": ("<", 0.5 if a == 1 else 1.0) for a, b, s in _DEPTH_PAIRS},
       **{f"sweep_paper_gap {n}L {s}": ("<", 0.25) for n in (1, 2) for s in mn.SETTINGS if (n, s) not in _PAPER_GAP_TAILS})
def sweep_depth_claims(seed):
    """DIAG-bL over DIAG-aL (consecutive swept depths, trimmed means), the sweep's chosen models of each
    column, on the same 20k fresh sequences; and DIAG-1L's and DIAG-2L's |mean / the paper's - 1|."""
    out = {}
    for k, setting in enumerate(mn.SETTINGS):
        batch = mn.make_task(setting).sample(20_000, icl.generator(700 + 20 * seed + k))
        models = {n: pretrained.load(mn.sweep_model(setting, n).name) for n in _DEPTHS}
        trimmed = {n: mn.trimmed_adjusted_loss(model, batch) for n, model in models.items()}
        out.update({f"sweep_depth_ratio {b}L/{a}L {setting}": trimmed[b] / trimmed[a]
                    for a, b in zip(_DEPTHS, _DEPTHS[1:])})
        out.update({f"sweep_paper_gap {n}L {setting}":
                    abs(mn.adjusted_loss(models[n], batch) / mn.PAPER_TABLE1[f"DIAG-{n}L"][setting] - 1) for n in (1, 2)})
    return out


def test_each_added_layer_lowers_the_sweeps_loss_on_every_column():
    sweep_depth_claims.check()


# --- the experiment ------------------------------------------------------------------------------


def test_smoke_run_metrics_and_figures():
    result = mn.run("smoke")
    m = result.metrics
    assert m["profile"] == "smoke" and m["source"] == "train"
    assert set(m["adjusted_loss"]) == {"ConstRR", "AdaRR", "TunedRR", "DIAG-2L", "GDPP-2L"}
    assert set(m["adjusted_loss"]["ConstRR"]) == set(result.config.settings)
    assert m["algorithm_vs_model_max_abs_diff"] < 1e-5
    # the read-out after the last layer is the table's number (same sequences)
    assert m["per_layer_adjusted_loss"]["DIAG-2L"][-1] == pytest.approx(m["adjusted_loss"]["DIAG-2L"]["U(0,5)"], abs=1e-6)
    assert len(m["per_layer_adjusted_loss_se"]["GDPP-2L"]) == 2
    assert set(result.figures()) >= {"depth", "sigma", "coefficients", "rescaling", "per_layer", "gdpp_layers"}
    assert m["gdpp_layers"]["gdpp_vs_kappa"][0] < m["gdpp_layers"]["gd_vs_kappa"][0]


def test_training_is_deterministic():
    spec = mn.ModelSpec("diag", 2, "{1,3}", steps=5, batch_size=64)
    a, _ = mn.train_model(spec, device=torch.device("cpu"))
    b, _ = mn.train_model(spec, device=torch.device("cpu"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_names_the_parameter():
    xs, ys = torch.randn(2, 5, 8), torch.randn(2, 5)
    cases = [
        (lambda: mn.ModelSpec("softmax", 2, "U(0,5)"), "attention"),
        (lambda: mn.ModelSpec("diag", 0, "U(0,5)"), "n_layers"),
        (lambda: mn.ModelSpec("diag", 2, "U(0,5)", init="zeros"), "init"),
        (lambda: mn.make_task("U(0,9)"), "setting"),
        (lambda: mn.mean_noise_variance("U(0,9)"), "setting"),
        (lambda: noise_estimate(xs, ys), "n > d"),
        (lambda: OracleRidge(torch.tensor([-1.0])), "sigma"),
        (lambda: ConstRR(-1.0), "lam"),
        (lambda: TunedRR(cap=0.0), "cap"),
        (lambda: TunedRR(scale=-1.0), "scale"),
        (lambda: tune_const_ridge(None, bounds=(1.0, 0.5)), "bounds"),
        (lambda: DiscoveredAlgorithm.from_model(icl.linear_transformer(3, attention="full")), "model"),
        (lambda: DiscoveredAlgorithm([]), "layers"),
        (lambda: mn.run("smoke", config=mn.MixedNoiseConfig(source="web")), "source"),
        (lambda: pretrained.load("../etc/passwd"), "name"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError, match=word):
            fn()
    with pytest.raises(FileNotFoundError):
        pretrained.load("mixed_noise/no-such-model")


# --- exercise checks -----------------------------------------------------------------------------


def discovered_layer(X, r, xq, s, c):
    """The solution of exercise 3: one DIAG layer on the tokens, written out."""
    n = X.shape[1]
    sigma, g = X.transpose(1, 2) @ X / n, torch.einsum("bnd,bn->bd", X, r) / n
    scale = 1 + c["w_yy"] * r.pow(2).sum(-1) / n
    X_new = X + c["w_xx"] * X @ sigma + c["w_xy"] * r[..., None] * g[:, None]
    r_new = scale[:, None] * r + c["w_yx"] * torch.einsum("bnd,bd->bn", X, g)
    xq_new = xq + c["w_xx"] * torch.einsum("bij,bj->bi", sigma, xq) + c["w_xy"] * s[:, None] * g
    s_new = scale * s + c["w_yx"] * (xq * g).sum(-1)
    return X_new, r_new, xq_new, s_new


def test_checks_pass_the_solutions():
    assert checks.noise_estimate(noise_estimate).passed
    assert checks.const_ridge_penalty(lambda batch: tune_const_ridge(batch).lam).passed

    assert checks.discovered_layer(discovered_layer).passed


def test_checks_give_specific_feedback():
    def divide_by_n(xs, ys):
        return noise_estimate(xs, ys) * (xs.shape[1] - xs.shape[2]) / xs.shape[1]

    result = checks.noise_estimate(divide_by_n)
    assert result.status == "wrong" and "n - d" in result.message
    assert "variance" in checks.noise_estimate(lambda xs, ys: noise_estimate(xs, ys).sqrt()).message

    result = checks.const_ridge_penalty(lambda batch: 100.0)
    assert result.status == "wrong" and "too large" in result.message

    good = discovered_layer

    def stale_order(X, r, xq, s, c):  # uses the updated residuals in the input update
        X_new, r_new, xq_new, s_new = good(X, r, xq, s, c)
        n = X.shape[1]
        g = torch.einsum("bnd,bn->bd", X, r) / n
        return X_new + c["w_xy"] * (r_new - r)[..., None] * g[:, None], r_new, xq_new, s_new

    assert "updated" in checks.discovered_layer(stale_order).message

    def no_rescale(X, r, xq, s, c):
        return good(X, r, xq, s, {**c, "w_yy": 0.0})

    result = checks.discovered_layer(no_rescale)
    assert result.status == "wrong" and "r_new" in result.message
    assert checks.discovered_layer(lambda *a: (_ for _ in ()).throw(NotImplementedError)).status == "not implemented"


def test_the_paper_column_holds_table_1_at_every_depth_we_show():
    assert len(mn.PAPER_TABLE1) == 3 * 7 + 3 and all(len(row) == 10 for row in mn.PAPER_TABLE1.values())
    assert mn.PAPER_TABLE1["DIAG-4L"]["U(0,5)"] == 0.059 and mn.PAPER_TABLE1["FULL-7L"]["{1,3,5}"] == 0.035
    assert mn.PAPER_TABLE1["GDPP-4L"]["U(0,0)"] == 9.91e-05
    ours = {m: {"U(0,5)": 0.1} for m in ("DIAG-3L", "FULL-4L", "GDPP-2L", "ConstRR", "AdaRR", "TunedRR")}
    rows = mn.table_markdown(ours, {m: {"U(0,5)": 0.01} for m in ours}, settings=("U(0,5)",)).splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["FULL-4L", "DIAG-3L", "GDPP-2L", "ConstRR", "AdaRR", "TunedRR"]
    assert all(r.split(" | ")[1] == "0.100 ± 0.010" and r.split(" | ")[2].strip(" |") != "-" for r in rows)


def test_compare_says_level_within_two_standard_errors():
    assert mn.compare(0.065, 0.068, 0.002, 0.002) == "level with"
    assert mn.compare(0.060, 0.068, 0.002, 0.002) == "below" and mn.compare(0.08, 0.068, 0.002, 0.002) == "above"
