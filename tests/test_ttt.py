"""Chapter 5: the TTT layer equals the closed forms it should, its two forms agree, and the claim holds."""

import math
import statistics
import time

import pytest
import torch
from margins import claim

from icl_course import pretrained
from icl_course.tasks import generator
from icl_course.topics.ttt import checks, experiment, recall
from icl_course.topics.ttt import layers as ttt
from icl_course.topics.ttt.models import SequenceModel, TTTMixer, make_mixer
from icl_course.topics.ttt.task import SequenceRegressionTask, ridge_by_position
from icl_course.training import TrainConfig, train


def qkv(seed=0, B=2, H=2, T=48, f=8, dtype=torch.float64):
    gen = generator(seed)
    return tuple(torch.randn(B, H, T, f, generator=gen, dtype=dtype) / f**0.5 for _ in range(3))


# --- the identities, float64 ----------------------------------------------------------------------


def test_one_full_batch_gd_step_from_zero_is_linear_attention():
    q, k, v = qkv()
    z = ttt.one_gd_step_full_batch(q, k, v, eta=0.5)
    assert (z - q @ k.transpose(-1, -2) @ v).abs().max() < 1e-10
    # another eta scales the answer by 2 eta: the identity is not an accident of eta = 1/2
    assert (ttt.one_gd_step_full_batch(q, k, v, eta=0.2) - 0.4 * z).abs().max() < 1e-10


def test_mini_batch_T_is_causal_linear_attention_and_b_1_is_the_delta_rule():
    q, k, v = qkv(1)
    B, H, T, f = q.shape
    zero = [(torch.zeros(H, f, f, dtype=torch.float64), None)]
    for form in (ttt.ttt_primal, ttt.ttt_dual):
        z, _ = form(q, k, v, torch.full((B, H, T), 0.5, dtype=torch.float64), zero, mini_batch=T)
        assert (z - ttt.linear_attention(q, k, v)).abs().max() < 1e-10
        eta = 0.5 * torch.rand(B, H, T, generator=generator(2), dtype=torch.float64)
        z, _ = form(q, k, v, eta, zero, mini_batch=1)
        assert (z - ttt.delta_rule(q, k, v, beta=2 * eta)).abs().max() < 1e-10
    # a mini-batch in between is neither
    z, _ = ttt.ttt_primal(q, k, v, torch.full((B, H, T), 0.5, dtype=torch.float64), zero, mini_batch=8)
    assert (z - ttt.linear_attention(q, k, v)).abs().max() > 1e-3


def test_nadaraya_watson_is_softmax_attention():
    q, k, v = qkv(3)
    for causal in (True, False):
        nw = ttt.nadaraya_watson(q, k, v, causal=causal)
        assert (nw - ttt.softmax_attention(q, k, v, causal=causal)).abs().max() < 1e-10


def test_chunked_forms_equal_their_recurrences():
    q, k, v = (torch.nn.functional.normalize(t, dim=-1) for t in qkv(4, T=37))
    beta = torch.rand(q.shape[:3], generator=generator(5), dtype=torch.float64)
    assert (ttt.delta_rule_chunked(q, k, v, beta, chunk=8)[0] - ttt.delta_rule(q, k, v, beta)).abs().max() < 1e-10
    assert (ttt.linear_attention_chunked(q, k, v, chunk=8)[0] - ttt.linear_attention(q, k, v)).abs().max() < 1e-10


def test_experiment_reports_the_identities():
    errors = experiment.identity_errors()
    assert len(errors) == 4 and max(errors.values()) < 1e-10


# --- primal and dual forms, float32 ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_primal_and_dual_forms_agree_with_layer_norm_bias_and_residual(kind):
    q, k, v = qkv(6, T=40, dtype=torch.float32)
    H, f = q.shape[1], q.shape[3]
    gen = generator(7)
    eta = 0.1 * torch.rand(q.shape[:3], generator=gen)
    params = ttt.init_inner_params(f, H, kind, std=0.3, gen=gen)
    ln = (1 + 0.1 * torch.randn(H, f, generator=gen), 0.1 * torch.randn(H, f, generator=gen))
    z_p, s_p = ttt.ttt_primal(q, k, v, eta, params, mini_batch=16, ln=ln, residual=True)  # 40 = 16 + 16 + 8
    z_d, s_d = ttt.ttt_dual(q, k, v, eta, params, mini_batch=16, ln=ln, residual=True)
    assert (z_p - z_d).abs().max() < 1e-5
    for (W_p, b_p), (W_d, b_d) in zip(s_p, s_d):
        assert (W_p - W_d).abs().max() < 1e-5 and (b_p - b_d).abs().max() < 1e-5


def test_hand_written_inner_gradient_matches_autograd(float64):
    q, k, v = qkv(8, T=6)
    H, f = q.shape[1], q.shape[3]
    params = ttt.init_inner_params(f, H, "mlp", std=0.5, gen=generator(9))
    params = [(W.double(), b.double()) for W, b in params]
    ln = (torch.rand(H, f, generator=generator(10)) + 0.5, torch.zeros(H, f))
    inputs, grads = ttt.inner_loss_grads(k, v, params, ln=ln, residual=True)
    for i in range(k.shape[2]):  # token by token, autograd on l_i(W)
        leaves = [(W.expand(2, -1, -1, -1).clone().requires_grad_(True), b.expand(2, -1, -1).clone().requires_grad_(True))
                  for W, b in params]
        out, _, _ = ttt._forward(k[:, :, i:i + 1], leaves)
        out = k[:, :, i:i + 1] + ttt._layer_norm(out, ln)[0]
        loss = ((out - v[:, :, i:i + 1]) ** 2).sum()
        auto = torch.autograd.grad(loss, [W for W, _ in leaves])
        for layer, (x, g) in enumerate(zip(inputs, grads)):
            by_hand = x[:, :, i, :, None] * g[:, :, i, None, :]  # x_i^T g_i
            assert (by_hand - auto[layer]).abs().max() < 1e-10


@claim(
    primal_over_dual_seconds=(">", 1.0),  # median over 9 back-to-back pairs of primal time / dual time
    max_abs_err=("<", 1e-5),  # largest |primal - dual| over outputs and final states, float32
)
def dual_form_timing_claims(seed):
    """One sequence of 1024 tokens, one head of 64 features, mini-batch 16, TTT-Linear, on the CPU.

    Timed on one thread, primal and dual back to back and the median of the 9 ratios, so that a
    change of load (the tests share the CPU with whatever else runs) hits both forms of a pair
    alike. Measured: about 2.4 on one thread and 1.8 on two, whose difference alone puts a bound of 1
    at z < 4 when the thread count is left to the caller. The inputs are fixed (seed 0): ``seed``
    only repeats the timing.
    """
    args, kwargs = experiment._ttt_inputs(1024, 64, 1, "linear", torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            z_p, s_p = ttt.ttt_primal(*args, 16, **kwargs)  # also the warm-up
            z_d, s_d = ttt.ttt_dual(*args, 16, **kwargs)
            ratios = []
            for _ in range(9):
                start = time.perf_counter()
                ttt.ttt_primal(*args, 16, **kwargs)
                middle = time.perf_counter()
                ttt.ttt_dual(*args, 16, **kwargs)
                ratios.append((middle - start) / (time.perf_counter() - middle))
    finally:
        torch.set_num_threads(threads)
    diffs = [(z_p - z_d).abs().max()] + [(a - b).abs().max() for pa, pd in zip(s_p, s_d) for a, b in zip(pa, pd)]
    return {"primal_over_dual_seconds": statistics.median(ratios), "max_abs_err": max(d.item() for d in diffs)}


def test_dual_form_is_faster_on_1024_tokens():
    dual_form_timing_claims.check()


# --- the outer loop: the delta rule beats linear attention ----------------------------------------


@claim(
    # log of linear attention's held-out error over the delta rule's (the ratio, 2.2-3.3 over seeds 0-4,
    # spreads on a log scale; on a linear one its z was 3.3)
    log_linear_attention_over_delta_rule=(">", 0.0),
    best_error_over_variance=("<", 0.5),  # the best mixer's error relative to Var(y): something was learned
)
def mixer_regression_claims(seed):
    """One block of width 16 per mixer, 500 outer steps (see the chapter for the quick profile); error
    on the last 4 of 16 points, 512 held-out sequences. ``seed`` seeds the models' init (seed),
    training data (seed + 1) and held-out data (seed + 2).

    Measured but not bounded: linear attention's error over TTT-Linear's, about 1.2-1.5 on four seeds
    of five but 0.3 on seed 2, where TTT-Linear had not left the plateau after 500 steps (1000 steps:
    1.2-1.5 on all five, still z < 4). At this scale only the delta rule reliably beats linear attention."""
    task = SequenceRegressionTask(d=4, n_points=16, noise=0.1)
    held_out = task.sample(512, generator(seed + 2))
    config = TrainConfig(steps=500, batch_size=32, lr=1e-2, warmup=0.05, schedule="cosine", seed=seed + 1)
    errors = {}
    for mixer in ("linear-attention", "delta-rule", "ttt-linear"):
        model = SequenceModel(task.token_dim, 1, mixer, width=16, n_layers=1, n_heads=1, mini_batch=4, seed=seed)
        train(model, task, config, device=torch.device("cpu"))
        errors[mixer] = task.error_by_position(model, held_out)[-4:].mean().item()
    return {
        "log_linear_attention_over_delta_rule": math.log(errors["linear-attention"] / errors["delta-rule"]),
        "linear_attention_over_ttt_linear": errors["linear-attention"] / errors["ttt-linear"],
        "best_error_over_variance": min(errors.values()) / task.y_variance,
    }


def test_delta_rule_beats_linear_attention_on_regression():
    mixer_regression_claims.check(keys=["log_linear_attention_over_delta_rule"])


def test_the_trained_mixers_learn_something():
    mixer_regression_claims.check(keys=["best_error_over_variance"])


@claim(
    late_over_first_error=("<", 0.2),  # error on the last 8 of 32 points over the error on the first (W0 = 0)
    late_error_over_ridge=(">", 1.0),  # ... over the Bayes-optimal ridge predictor's on the same points
)
def hand_made_inner_loop_claims(seed):
    """Online GD (b = 1, eta = 0.05) with hand-made views on 256 sequences drawn from ``seed + 3``."""
    task = SequenceRegressionTask(d=4, n_points=32, noise=0.1)
    batch = task.sample(256, generator(seed + 3))
    errors = experiment.inner_loop_errors(batch, eta=0.05, mini_batch=1)
    assert errors.shape == (32,)
    late = errors[-8:].mean().item()
    return {"late_over_first_error": late / errors[0].item(),
            "late_error_over_ridge": late / ridge_by_position(task, batch)[-8:].mean().item()}


def test_hand_made_inner_loop_learns_in_context():
    hand_made_inner_loop_claims.check()  # online GD on (x_i, y_i) learns w, but not better than Bayes


# --- determinism, bad input, the experiment ---------------------------------------------------------


def test_same_seed_same_model_and_same_batch():
    a, b = SequenceModel(6, 1, "ttt-mlp", width=8, n_heads=2, seed=3), SequenceModel(6, 1, "ttt-mlp", width=8, n_heads=2, seed=3)
    assert all(torch.equal(p, r) for p, r in zip(a.parameters(), b.parameters()))
    task = SequenceRegressionTask(d=4, n_points=8)
    assert torch.equal(task.tokens(task.sample(3, generator(1))), task.tokens(task.sample(3, generator(1))))


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: SequenceRegressionTask(d=0), "d"),
        (lambda: SequenceRegressionTask(n_points=-1), "n_points"),
        (lambda: SequenceRegressionTask(noise=-0.1), "noise"),
        (lambda: make_mixer("mamba", 8, 2), "mixer"),
        (lambda: TTTMixer(8, 2, mini_batch=0), "mini_batch"),
        (lambda: TTTMixer(8, 2, eta_base=0.0), "eta_base"),
        (lambda: TTTMixer(8, 3), "n_heads"),
        (lambda: ttt.init_inner_params(4, 1, "rnn"), "kind"),
        (lambda: SequenceModel(6, 1, width=0), "width"),
        (lambda: ttt.ttt_dual(*qkv(T=4), torch.ones(2, 2, 5), [], 2), "eta"),
        (lambda: ttt.ttt_primal(*qkv(T=4), torch.ones(2, 2, 4), [], 0), "mini_batch"),
        (lambda: ttt.linear_attention_chunked(*qkv(T=4)[:2], torch.ones(2, 2, 4, 3)), "q, k, v"),
        (lambda: ttt.linear_attention_chunked(*qkv(T=4), chunk=0), "chunk"),
        (lambda: ttt.delta_rule_chunked(*qkv(T=4), torch.ones(2, 2, 3)), "beta"),
    ],
)
def test_bad_input_names_the_parameter(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_smoke_profile_runs_and_reports_every_metric():
    result = experiment.run("smoke")
    m = result.metrics
    for key in ("linear_attention_equivalence_max_abs_err", "delta_rule_equivalence_max_abs_err",
                "softmax_equivalence_max_abs_err", "primal_dual_max_abs_err", "dual_speedup", "profile", "device"):
        assert key in m
    assert {"linear-attention", "ttt-linear", "delta-rule", "ttt-mlp", "softmax"} <= set(m["icl_error"])
    # each error with its standard error over the held-out sequences: positive, and below the error itself
    assert set(m["icl_error_se"]) == set(m["icl_error"])
    assert all(0 < m["icl_error_se"][k] < m["icl_error"][k] for k in m["icl_error"])
    assert m["primal_dual_max_abs_err"] < 1e-5 and m["linear_attention_equivalence_max_abs_err"] < 1e-10
    assert m["state_floats"]["softmax"][-1] > m["state_floats"]["softmax"][0]  # the cache grows ...
    assert m["state_floats"]["ttt-linear"][-1] == m["state_floats"]["ttt-linear"][0]  # ... TTT's state does not
    assert set(result.figures()) == {"inner_loop_dial", "training", "error_by_position", "gap_to_ridge", "icl_error",
                                     "mini_batch", "recall", "cost"}
    # the shipped recall models, measured on a few sequences: every mixer, every pair count, one value per seed
    assert set(m["recall_accuracy"]) == {*recall.MIXERS, "ttt-mlp-long"}
    assert all(set(by) == {str(k) for k in recall.EVAL_PAIRS} and all(len(v) == len(recall.SEEDS) for v in by.values())
               for by in m["recall_accuracy"].values())
    # where each mixer stands against ridge: a curve per mixer over the seeds, a ratio per seed
    assert set(m["error_by_position_mean"]) == set(m["icl_error"]) == set(m["icl_error_over_ridge_by_seed"])
    assert len(m["ridge_by_position"]) == result.config.n_points
    assert m["icl_error_by_mini_batch_trained"] == {} and m["icl_error_by_knob"] == {}  # smoke loads no weights


# --- the exercise checks ------------------------------------------------------------------------------


def test_checks_pass_the_solutions_and_flag_planted_mistakes():
    assert checks.inner_gradient(lambda W, K, V: 2 * K.T @ (K @ W - V)).passed
    half = checks.inner_gradient(lambda W, K, V: K.T @ (K @ W - V))
    assert half.status == "wrong" and "factor 2" in half.message
    assert "transpose" in checks.inner_gradient(lambda W, K, V: 2 * (K @ W - V).T @ K).message

    assert checks.one_step_is_linear_attention(lambda Q, K, V, eta: 2 * eta * Q @ K.T @ V).passed
    assert "eta = 1/2" in checks.one_step_is_linear_attention(lambda Q, K, V, eta: Q @ K.T @ V).message
    assert "sign" in checks.one_step_is_linear_attention(lambda Q, K, V, eta: -2 * eta * Q @ K.T @ V).message

    def dual(Q, K, V, eta, W, mask=True):
        G = 2 * (K @ W - V)
        A = (torch.tril(Q @ K.T) if mask else Q @ K.T) * eta[None, :]
        return Q @ W - A @ G, W - K.T @ (eta[:, None] * G)

    assert checks.dual_mini_batch(dual).passed
    assert "tril" in checks.dual_mini_batch(lambda *a: dual(*a, mask=False)).message
    assert checks.dual_mini_batch(lambda *a: 1 / 0).status == "error"


def test_one_step_check_names_the_eta_one_half_mistake_at_every_eta(capsys):
    # It once did not: for eta within 5e-4 of 1/2 the check skipped the diagnosis and reported an
    # unexplained difference in the 4th digit (about one call in 1000). The check now draws eta away from 1/2.
    results = [checks.one_step_is_linear_attention(lambda Q, K, V, eta: Q @ K.T @ V) for _ in range(10_000)]
    assert all("eta = 1/2" in r.message for r in results), [r.message for r in results if "eta = 1/2" not in r.message][:3]


# --- the inner loop's knobs: inner epochs, fixed W0 --------------------------------------------------


def test_inner_epochs_agree_in_both_forms_and_each_extra_step_is_full_batch_gd():
    q, k, v = qkv(11, T=20)
    H, f = q.shape[1], q.shape[3]
    gen = generator(12)
    eta = 0.2 * torch.rand(q.shape[:3], generator=gen, dtype=torch.float64)
    params = [(W.double(), b.double()) for W, b in ttt.init_inner_params(f, H, "mlp", std=0.3, gen=gen)]
    ln = (1 + 0.1 * torch.randn(H, f, generator=gen, dtype=torch.float64), torch.zeros(H, f, dtype=torch.float64))
    for steps in (1, 3):
        z_p, s_p = ttt.ttt_primal(q, k, v, eta, params, mini_batch=8, ln=ln, residual=True, inner_steps=steps)
        z_d, s_d = ttt.ttt_dual(q, k, v, eta, params, mini_batch=8, ln=ln, residual=True, inner_steps=steps)
        assert (z_p - z_d).abs().max() < 1e-10
    z_1, _ = ttt.ttt_dual(q, k, v, eta, params, mini_batch=8, ln=ln, residual=True)
    assert (z_1 - ttt.ttt_dual(q, k, v, eta, params, 8, ln=ln, residual=True, inner_steps=1)[0]).abs().max() == 0
    assert (z_1 - z_d)[:, :, :8].abs().max() < 1e-12  # the first mini-batch's outputs come from its one step
    assert (z_1 - z_d)[:, :, 8:].abs().max() > 1e-3  # the next ones see the extra steps
    # one extra step = one GD step (autograd) on sum_i eta_i l_i(W) over the mini-batch, from the state
    B = q.shape[0]
    state = ttt._expand(params, B)
    leaves = [(W.clone().requires_grad_(True), b.clone().requires_grad_(True)) for W, b in state]
    h, _, _ = ttt._forward(k[:, :, :8], leaves)
    out = k[:, :, :8] + ttt._layer_norm(h, ln)[0]
    loss = (eta[:, :, :8] * ((out - v[:, :, :8]) ** 2).sum(-1)).sum()
    grads = torch.autograd.grad(loss, [t for pair in leaves for t in pair])
    by_hand = ttt._more_steps(k[:, :, :8], v[:, :, :8], eta[:, :, :8], state, ln, True, 1)
    for (W, b), (W1, b1), gW, gb in zip(state, by_hand, grads[0::2], grads[1::2]):
        assert (W1 - (W - gW)).abs().max() < 1e-10 and (b1 - (b - gb)).abs().max() < 1e-10


def test_fixed_w0_stays_zero_and_is_not_trained():
    mixer = TTTMixer(8, 2, inner_ln=False, learn_w0=False)
    assert all((W == 0).all() and not W.requires_grad for W in mixer.W0)
    assert all(p.requires_grad for n, p in mixer.named_parameters() if not n.startswith("W0"))


@pytest.mark.parametrize("make", [lambda: TTTMixer(8, 2, inner_steps=0), lambda: TTTMixer(8, 2, learn_w0=1),
                                  lambda: ttt.ttt_dual(*qkv(T=4), torch.ones(2, 2, 4), [], 2, inner_steps=0)])
def test_knobs_bad_input_names_the_parameter(make):
    with pytest.raises(ValueError, match="inner_steps|learn_w0"):
        make()


def test_ridge_points_to_match():
    curve = [1.0, 0.5, 0.2, 0.1]
    assert experiment.ridge_points_to_match(curve, 0.3) == 2  # position 3 has seen 2 pairs
    assert experiment.ridge_points_to_match(curve, 1.0) == 0 and experiment.ridge_points_to_match(curve, 0.05) is None


def test_value_scale_on_a_bare_and_an_ln_model():
    task = SequenceRegressionTask(d=4, n_points=8)
    batch = task.sample(64, generator(0))
    for mixer in ("ttt-linear", "ttt-linear-ln"):
        model = SequenceModel(task.token_dim, 1, mixer, width=8, n_layers=1, n_heads=2, seed=0)
        stats = experiment.value_scale(model, task, batch)
        assert set(stats) == {"corr_abs_y_target_norm", "target_norm_cv", "output_norm_cv"}
        assert -1 <= stats["corr_abs_y_target_norm"] <= 1 and stats["target_norm_cv"] > 0
    with pytest.raises(ValueError, match="model"):
        experiment.value_scale(SequenceModel(task.token_dim, 1, "softmax", width=8, n_heads=2), task, batch)


# --- the shipped models: the mini-batch sweep and the knobs (icl_course/weights/ttt) -------------------

SHIPPED = [*(experiment.sweep_name(b, s) for b in experiment.SWEEP_MINI_BATCHES for s in experiment.SWEEP_SEEDS),
           *(experiment.knob_name(k, s) for k in experiment.KNOBS for s in experiment.SWEEP_SEEDS)]


def _held_out(record, gen_seed=None, n=None):
    """The record's held-out sequences (drawn as when shipped: ``pretrained.drawn_as``), or fresh ones from ``gen_seed``."""
    task = SequenceRegressionTask(**record["task"])
    if gen_seed is not None:
        return task, task.sample(n or record["eval"]["n_eval"], generator(gen_seed))
    with pretrained.drawn_as(record):
        return task, task.sample(n or record["eval"]["n_eval"], generator(record["eval"]["generator"]))


def _last_quarter(task, model, batch):
    n = task.n_points
    return task.error_by_position(model, batch)[n - n // 4:].mean().item()


@claim(max_provenance_rel_gap=("<", 1e-3))
def shipped_ttt_claims(seed):
    """|held-out error of each shipped TTT model on its provenance's sequences / the recorded one - 1|,
    the largest over the 42 models (``load`` checks every checksum). The inputs are fixed: ``seed`` only
    repeats the measurement."""
    gaps = []
    for name in SHIPPED:
        record = pretrained.provenance(name)
        task, batch = _held_out(record)
        gaps.append(abs(_last_quarter(task, pretrained.load(name), batch) / record["metrics"]["icl_error"] - 1))
    return {"max_provenance_rel_gap": max(gaps)}


def test_shipped_ttt_models_measure_what_their_provenance_says():
    assert all(name in pretrained.available("ttt/") for name in SHIPPED)
    shipped_ttt_claims.check()


def _fresh(seed, n=512):
    """512 fresh sequences of the shipped models' task (generator 100 + seed: neither their validation nor held-out)."""
    record = pretrained.provenance(experiment.sweep_name(1, 0))
    return _held_out(record, gen_seed=100 + seed, n=n)


@claim(
    b64_over_b1=(">", 1.2),  # the smallest, over the 3 training seeds, of error(b = 64) / error(b = 1)
    b8_over_b1=("<", 1.05),  # the largest, over the 3 training seeds, of error(b = 8) / error(b = 1)
)
def mini_batch_sweep_claims(seed):
    """The shipped TTT-Linear models trained at b = 1, 8, 64 (quick task and budget, 3 training seeds),
    last-quarter error on 512 fresh sequences drawn from ``100 + seed``. As the paper reports for
    perplexity, a smaller b is better; here the gain stops below b = 8 (64 tokens per sequence).
    Measured when shipped, on the held-out sequences: b = 64 / b = 1 1.70, 1.59, 1.54 and
    b = 8 / b = 1 1.011, 1.008, 1.001 (seeds 0, 1, 2)."""
    task, batch = _fresh(seed)
    err = {b: [_last_quarter(task, pretrained.load(experiment.sweep_name(b, s)), batch) for s in experiment.SWEEP_SEEDS]
           for b in (1, 8, 64)}
    return {"b64_over_b1": min(a / b for a, b in zip(err[64], err[1])),
            "b8_over_b1": max(a / b for a, b in zip(err[8], err[1]))}


def test_trained_ttt_linear_is_better_at_small_inner_mini_batches():
    mini_batch_sweep_claims.check()


@claim(
    epochs_4_over_base=("<", 0.7),  # the largest, over the 3 training seeds, of error(E = 4 inner epochs) / error(baseline)
    eta_4_over_base=("<", 1.0),  # the largest of error(eta_base = 4) / error(baseline)
    eta_0_25_over_base=(">", 1.1),  # the smallest of error(eta_base = 0.25) / error(baseline)
    inner_ln_over_base=(">", 2.0),  # the smallest of error(x + LN(f_res(x))) / error(baseline)
    best_over_ridge=(">", 3.0),  # the best shipped model's error over ridge's (Bayes optimal), same sequences
)
def knob_claims(seed):
    """The shipped knob models against the baseline (TTT-Linear, b = 16, the sweep's models), seed by
    training seed, last-quarter error on 512 fresh sequences drawn from ``100 + seed``. More inner
    optimisation (more inner epochs, a larger inner learning rate) helps on this task; a smaller inner
    rate and the paper's inner LayerNorm hurt; no TTT-Linear variant comes near ridge. Measured when
    shipped, on the held-out sequences (seeds 0, 1, 2): baseline 0.162, 0.152, 0.168; E = 4 0.081,
    0.081, 0.083; eta_base 4 0.120, 0.130, 0.121; eta_base 0.25 0.856, 0.208, 0.946; inner LN 0.566,
    0.951, 0.950."""
    task, batch = _fresh(seed)
    n = task.n_points
    err = lambda name: _last_quarter(task, pretrained.load(name), batch)  # noqa: E731
    base = [err(experiment.sweep_name(16, s)) for s in experiment.SWEEP_SEEDS]
    knob = {k: [err(experiment.knob_name(k, s)) for s in experiment.SWEEP_SEEDS]
            for k in ("epochs-4", "eta-4", "eta-0.25", "inner-ln", "fixed-w0")}
    ratio = {k: [a / b for a, b in zip(v, base)] for k, v in knob.items()}
    best = min(err(name) for name in SHIPPED)
    ridge = ridge_by_position(task, batch)[n - n // 4:].mean().item()
    return {"epochs_4_over_base": max(ratio["epochs-4"]), "eta_4_over_base": max(ratio["eta-4"]),
            "eta_0_25_over_base": min(ratio["eta-0.25"]), "inner_ln_over_base": min(ratio["inner-ln"]),
            "fixed_w0_over_base_max": max(ratio["fixed-w0"]), "fixed_w0_over_base_min": min(ratio["fixed-w0"]),
            "best_over_ridge": best / ridge}


def test_inner_epochs_and_a_larger_inner_rate_help_and_the_inner_layer_norm_hurts():
    knob_claims.check(keys=["epochs_4_over_base", "eta_4_over_base", "eta_0_25_over_base", "inner_ln_over_base"])


def test_no_shipped_ttt_linear_comes_near_ridge():
    knob_claims.check(keys=["best_over_ridge"])


# --- associative recall ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, word", [
    ({"n_keys": 0}, "n_keys"), ({"n_values": 2.5}, "n_values"), ({"pairs": ()}, "pairs"),
    ({"pairs": [4, 8]}, "pairs"), ({"n_keys": 8, "pairs": (4, 9)}, "pairs"), ({"n_queries": True}, "n_queries"),
])
def test_recall_task_rejects_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        recall.AssociativeRecallTask(**kwargs)


def test_recall_task_asks_keys_of_the_context_and_answers_with_their_values():
    task = recall.AssociativeRecallTask(n_keys=12, n_values=5, pairs=(3, 7), n_queries=6)
    with pytest.raises(ValueError, match="pairs"):
        task.sample_pairs(2, 13, generator(0))
    batch = task.sample_pairs(50, 7, generator(0))
    keys, values = batch.tokens[:, 0:14:2], batch.tokens[:, 1:14:2] - task.n_keys
    assert (keys < task.n_keys).all() and ((values >= 0) & (values < task.n_values)).all()
    assert all(len(set(row.tolist())) == 7 for row in keys)  # keys do not repeat within a sequence
    for b in range(50):
        lookup = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert [lookup[q] for q in batch.tokens[b, 14:].tolist()] == batch.answers[b].tolist()
    assert task.sample(4, generator(1)).tokens.shape[1] in (2 * 3 + 6, 2 * 7 + 6)


RECALL = [*(recall.model_name(m, s) for m in recall.MIXERS for s in recall.SEEDS), *map(recall.long_name, recall.SEEDS)]


def test_shipped_recall_models_measure_what_their_provenance_says():
    """Every shipped recall model, on its provenance's test sequences at 16 and 32 pairs (``load`` checks
    the checksums): the recorded accuracy up to a few queries of 16 384 (a near-tie of two logits may
    fall the other way on another CPU)."""
    assert set(RECALL) <= set(pretrained.available("ttt/"))
    for name in RECALL:
        recorded = pretrained.provenance(name)["metrics"]["accuracy"]
        measured = recall.accuracy_by_pairs(pretrained.load(name), pairs=(16, 32))
        for k, (accuracy, _) in measured.items():
            assert abs(accuracy - recorded[str(k)]) < 4e-4, (name, k, accuracy, recorded[str(k)])


@claim(
    softmax_at_32=(">", 0.97),  # the worst softmax run at 32 pairs
    linear_attention_drop_4_to_32=(">", 0.15),  # the smallest, over seeds, of accuracy(4) - accuracy(32)
    matrix_best_at_32=("<", 0.95),  # the best run of linear attention, the delta rule and TTT-Linear, 32 pairs
    ttt_mlp_best_over_matrix_best_at_32=(">", 0.04),  # the best TTT-MLP run minus the best matrix-state run
)
def recall_claims(seed):
    """The shipped recall models (three training seeds each, TTT-MLP also with the longer budget) on 512 fresh
    sequences per pair count, drawn from ``generator(600 + 100 seed + pairs)`` (neither their validation nor
    test sequences). Softmax attention keeps every token and recalls everything; the mixers with an f x f
    matrix as state (linear attention, the delta rule, TTT-Linear) lose accuracy once the pairs outnumber the
    f = 16 features per head; TTT-MLP's larger state can keep more, but only some of its runs train well
    (so the claim is about its best run; the chapter reports every run). Measured when shipped, at 32 pairs
    (seeds 0, 1, 2): linear attention 0.724, 0.772, 0.763; delta rule 0.704, 0.832, 0.852; TTT-Linear
    0.761, 0.759, 0.881; TTT-MLP 0.973, 0.185 (diverged, retried at half the rate), 0.298; softmax 1.0."""
    def acc(name, k):
        return recall.accuracy_by_pairs(pretrained.load(name), pairs=(k,), n=512, seed=600 + 100 * seed)[k][0]

    at32 = {m: [acc(recall.model_name(m, s), 32) for s in recall.SEEDS] for m in recall.MIXERS}
    at32["ttt-mlp"] += [acc(recall.long_name(s), 32) for s in recall.SEEDS]
    at4 = [acc(recall.model_name("linear-attention", s), 4) for s in recall.SEEDS]
    matrix = [a for m in ("linear-attention", "delta-rule", "ttt-linear") for a in at32[m]]
    return {"softmax_at_32": min(at32["softmax"]),
            "linear_attention_drop_4_to_32": min(a - b for a, b in zip(at4, at32["linear-attention"])),
            "matrix_best_at_32": max(matrix),
            "ttt_mlp_best_over_matrix_best_at_32": max(at32["ttt-mlp"]) - max(matrix)}


def test_a_matrix_state_fills_up_and_a_richer_inner_model_can_recall_more():
    recall_claims.check()
