"""Bad input to the public API fails early, with a ValueError or TypeError naming the parameter."""

import math

import pytest
import torch

import icl_course as icl
from icl_course.metrics import implicit_weights_per_layer
from icl_course.runtime import require_finite
from icl_course.tasks import IllConditioned
from icl_course.topics.looped import models as looped
from icl_course.topics.looped.tasks import Parity
from icl_course.topics.mixed_noise.discovered_algorithm import DiscoveredAlgorithm, LayerCoefficients
from icl_course.topics.mixed_noise.ridge import ConstRR, OracleRidge, TunedRR, tune_const_ridge, tune_tuned_ridge
from icl_course.topics.newton import matrix_inverse as newton
from icl_course.topics.newton.logistic import LogisticNewton, LogisticTask, TokenMLP
from icl_course.topics.preconditioning import preconditioners as pc
from icl_course.topics.sign_descent import optimizers
from icl_course.topics.sign_descent.signal_noise import SoftmaxAttentionClassifier
from icl_course.topics.ttt import layers as ttt
from icl_course.topics.ttt.models import SequenceModel, TTTMixer, Views
from icl_course.topics.ttt.task import SequenceRegressionTask

nan, inf = math.nan, math.inf
B, N, D = 4, 6, 3
xs, ys, xq = torch.randn(B, N, D), torch.randn(B, N), torch.randn(B, D)
batch = icl.RegressionTask(d=D, n_ctx=N).sample(B, icl.generator(0))
empty = icl.RegressionBatch(*(t[:0] for t in batch.tensors()))
model = icl.linear_transformer(D)
wide = torch.randn(2, 2, 5)  # n = 2 < d = 5
qkv = [torch.randn(1, 2, 4, 3, dtype=torch.float64) for _ in range(3)]

CASES = [
    # distributions and tasks
    (lambda: icl.RegressionTask(d=3, n_ctx=5, noise=inf), "noise"),
    (lambda: icl.RegressionTask(d=3, n_ctx=5, noise="0.1"), "noise"),
    (lambda: icl.RegressionTask(d=3, n_ctx=5, inputs="uniform"), "inputs"),
    (lambda: icl.Uniform(0, inf), "high"),
    (lambda: icl.Uniform(nan, 1), "low"),
    (lambda: icl.Gaussian(std=nan), "std"),
    (lambda: icl.Gaussian(cov=torch.tensor([[1.0, 0.0], [0.0, inf]])), "cov"),
    (lambda: icl.Choice((1.0, nan)), "values"),
    (lambda: IllConditioned(3, kappa=inf), "kappa"),
    (lambda: icl.RegressionTask(d=3, n_ctx=5).sample(2, icl.generator(0), dtype=torch.int64), "dtype"),
    (lambda: SequenceRegressionTask(noise=inf), "noise"),
    (lambda: LogisticTask(d=2, n_ctx=5, mu=inf), "mu"),
    (lambda: LogisticTask(d=2, n_ctx=5, newton_steps=0), "newton_steps"),
    # models
    (lambda: icl.linear_transformer(3, init_std=nan), "init_std"),
    (lambda: icl.FullAttention(3, init_std=inf), "init_std"),
    (lambda: icl.DiagAttention(3, init_std=-1.0), "init_std"),
    (lambda: icl.linear_transformer(3, clamp=inf), "clamp"),
    (lambda: icl.gd_transformer(3, eta=nan), "eta"),
    (lambda: icl.gd_transformer(3, 1.0, preconditioner=torch.full((3, 3), nan)), "preconditioner"),
    (lambda: icl.gdpp_transformer(3, eta=1.0, gamma=inf), "gamma"),
    (lambda: newton.newton_transformer(3, 8, 1, alpha=inf), "alpha"),
    (lambda: TokenMLP(3, init_std=nan), "init_std"),
    (lambda: SoftmaxAttentionClassifier(4, init_std=inf), "init_std"),
    (lambda: TTTMixer(8, 2, eta_base=inf), "eta_base"),
    (lambda: Views(8, 0), "n_heads"),
    (lambda: SequenceModel(6, 1, seed=1.5), "seed"),
    (lambda: looped.LoopedTransformer(16, 2, vocab_size=3), "vocab_size"),
    (lambda: looped.Block(16, 0), "n_heads"),
    (lambda: looped.FullAnswerObjective(Parity(), unsure_weight=inf), "unsure_weight"),
    (lambda: looped.HaltingObjective(Parity(), scale=inf), "scale"),
    (lambda: looped.HaltingObjective(Parity(), horizon=nan), "horizon"),
    # model inputs: dtype and shape against the model
    (lambda: model.predict(xs.double(), ys.double(), xq.double()), "xs has dtype torch.float64.*model.double"),
    (lambda: model.predict(xs.long(), ys.long(), xq.long()), "xs has dtype torch.int64"),
    (lambda: model.predict(xs, ys.double(), xq), "ys has dtype"),
    (lambda: model.predict_per_layer(xs.double(), ys.double(), xq.double()), "xs"),
    (lambda: model(torch.zeros(2, 4, D + 1, dtype=torch.float64)), "Z"),
    (lambda: implicit_weights_per_layer(model, xs.double(), ys.double(), xq.double()), "xs"),
    (lambda: model.predict(xs.tolist(), ys, xq), "xs"),
    (lambda: newton.newton_transformer(3, N, 1, alpha=1.0).predict(xs, ys, xq), "xs has dtype torch.float32"),
    (lambda: SequenceModel(6, 1, width=8, n_heads=2)(torch.zeros(2, 4, 6, dtype=torch.float64)), "tokens"),
    (lambda: SoftmaxAttentionClassifier(4)(torch.zeros(2, 2, 4, dtype=torch.float64)), "X"),
    (lambda: looped.LoopedTransformer(16, 2)(torch.zeros(2, 3), 1), "tokens"),
    (lambda: looped.LoopedTransformer(16, 2)(torch.full((2, 3), 7), 1), "tokens"),
    # solvers
    (lambda: icl.GradientDescent(eta=inf), "eta"),
    (lambda: icl.GradientDescent(eta=1.0, preconditioner=torch.eye(2)).predict(xs, ys, xq), "preconditioner"),
    (lambda: icl.GradientDescent(eta=1.0, preconditioner=torch.ones(3)), "preconditioner"),
    (lambda: icl.GradientDescent(eta=1.0, preconditioner=torch.full((3, 3), inf)), "preconditioner"),
    (lambda: icl.GradientDescent(eta=1.0).predict(xs.long(), ys.long(), xq.long()), "xs must be a floating-point"),
    (lambda: icl.GradientDescent(eta=1.0).predict(xs, ys.double(), xq), "ys has dtype"),
    (lambda: icl.GDPlusPlus(nan, 0), "eta"),
    (lambda: icl.GDPlusPlus(1.0, inf), "gamma"),
    (lambda: icl.Ridge(nan), "lam"),
    (lambda: icl.Ridge(-1), "lam"),
    (lambda: icl.Ridge(torch.tensor([1.0, -1.0])), "lam"),
    (lambda: icl.Ridge(torch.ones(2, 2)), "lam"),
    (lambda: icl.Ridge(torch.ones(3)).predict(xs, ys, xq), "lam"),
    (lambda: icl.Ridge(0).weights(wide, torch.randn(2, 2)), "positive lam"),
    (lambda: icl.Ridge(0).weights(torch.ones(1, 4, 2), torch.ones(1, 4)), "positive lam"),
    (lambda: icl.tune_step_size(batch, bounds=(1e-3, inf)), "bounds"),
    (lambda: icl.tune_gdpp(batch, max_iter=0), "max_iter"),
    (lambda: OracleRidge(torch.tensor([1.0, nan])), "sigma"),
    (lambda: ConstRR(inf), "lam"),
    (lambda: TunedRR(scale=inf), "scale"),
    (lambda: tune_const_ridge(batch, bounds=(0.1, inf)), "bounds"),
    (lambda: tune_tuned_ridge(batch, n_grid=1), "n_grid"),
    (lambda: LogisticNewton(inf, 1), "mu"),
    (lambda: LayerCoefficients(nan, 0.0, -1.0, 0.0), "w_xx"),
    (lambda: DiscoveredAlgorithm([{"w_xx": 0.0}]), "layers"),
    (lambda: newton.newton_schulz(torch.eye(2), 1, alpha=inf), "alpha"),
    (lambda: newton.IterativeNewton(2, alpha=inf), "alpha"),
    (lambda: newton.iterations_to_tolerance(torch.eye(2), max_iters=0), "max_iters"),
    # preconditioners
    (lambda: pc.optimal_preconditioner(torch.tensor([[1.0, nan], [nan, 1.0]]), 5), "cov"),
    (lambda: pc.rotated_covariance(scales=(1.0, inf)), "scales"),
    (lambda: pc.preconditioned_step_loss(torch.full((2, 2), inf), torch.eye(2), 5), "gamma"),
    (lambda: pc.relative_error(torch.eye(2), torch.zeros(2, 2)), "b"),
    (lambda: pc.layer_preconditioner(model), "layer"),
    # metrics
    (lambda: icl.evaluate(icl.GradientDescent(1.0), empty), "batch"),
    (lambda: icl.prediction_distance(model, icl.GradientDescent(1.0), empty), "batch"),
    (lambda: icl.model_cosine(model, icl.GradientDescent(1.0), empty), "batch"),
    (lambda: icl.mse_loss(torch.zeros(0), torch.zeros(0)), "y_hat"),
    # ttt and optimizers
    (lambda: ttt.init_inner_params(4, 1, std=nan), "std"),
    (lambda: ttt.init_inner_params(4, 0), "n_heads"),
    (lambda: ttt.one_gd_step_full_batch(*qkv, eta=inf), "eta"),
    (lambda: ttt.nadaraya_watson(*qkv, bandwidth=0.0), "bandwidth"),
    (lambda: ttt.softmax_attention(*qkv, scale=nan), "scale"),
    (lambda: ttt.delta_rule(*qkv, torch.ones(1, 2, 3)), "beta"),
    (lambda: ttt.linear_attention_chunked(qkv[0], qkv[1], qkv[2].float()), "q, k, v"),
    (lambda: optimizers.adam(0.1, eps=inf), "eps"),
    (lambda: optimizers.gd(nan), "lr"),
    # runtime
    (lambda: icl.get_profile(3), "profile"),
    (lambda: require_finite("x", True), "x"),
]


@pytest.mark.parametrize("call, name", CASES)
def test_bad_input_fails_early_naming_the_parameter(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: icl.get_profile(3), TypeError),
        (lambda: icl.RegressionTask(d=3, n_ctx=5, noise="0.1"), TypeError),
        (lambda: icl.Ridge(-1), ValueError),
        (lambda: model.predict(xs.double(), ys.double(), xq.double()), ValueError),
    ],
)
def test_a_wrong_type_is_a_type_error_and_a_wrong_value_a_value_error(call, error):
    with pytest.raises(error):
        call()


def test_valid_calls_still_pass_and_give_the_same_numbers():
    assert require_finite("lam", 0.0, at_least=0) == 0.0
    assert icl.RegressionTask(d=3, n_ctx=5, noise=icl.Uniform(0.0, 5.0)).noise.high == 5.0
    assert TunedRR(cap=inf).cap == inf  # no cap is allowed
    assert looped.stable_stop(torch.zeros(3, 1, 1, 5))[1].item() == 1  # min_confidence defaults to -inf
    model64 = icl.gd_transformer(D, 0.5, dtype=torch.float64)
    b64 = batch.to(dtype=torch.float64)
    want = icl.GradientDescent(0.5).predict(b64.xs, b64.ys, b64.x_query)
    assert torch.allclose(model64.predict(b64.xs, b64.ys, b64.x_query), want, atol=1e-12)
    assert torch.allclose(icl.Ridge(torch.zeros(B)).weights(b64.xs, b64.ys), icl.LeastSquares().weights(b64.xs, b64.ys))
