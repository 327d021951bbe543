import pytest
import torch

import icl_course as icl


@pytest.fixture
def batch():
    return icl.RegressionTask(d=4, n_ctx=12, noise=0.3).sample(50, icl.generator(0), dtype=torch.float64)


def test_one_gd_step_closed_form(batch):
    w = icl.GradientDescent(eta=2.5).weights(batch.xs, batch.ys)
    assert torch.allclose(w, 2.5 / 12 * torch.einsum("bnd,bn->bd", batch.xs, batch.ys))


def test_many_gd_steps_converge_to_least_squares(batch):
    xs = batch.xs * 2  # inputs U(-1, 1): the curvature stays below 2, so step size 1 converges
    w_gd = icl.GradientDescent(eta=1.0, n_steps=5000).weights(xs, batch.ys)
    w_ls = icl.LeastSquares().weights(xs, batch.ys)
    assert torch.allclose(w_gd, w_ls, atol=1e-8)


def test_least_squares_and_ridge(batch):
    w_ls = icl.LeastSquares().weights(batch.xs, batch.ys)
    normal = torch.linalg.solve(batch.xs.transpose(1, 2) @ batch.xs, torch.einsum("bnd,bn->bd", batch.xs, batch.ys))
    assert torch.allclose(w_ls, normal, atol=1e-10)
    assert torch.allclose(icl.Ridge(0.0).weights(batch.xs, batch.ys), w_ls, atol=1e-10)
    lam = torch.rand(50, dtype=torch.float64)
    w_r = icl.Ridge(lam).weights(batch.xs, batch.ys)
    gram = batch.xs.transpose(1, 2) @ batch.xs + lam[:, None, None] * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(gram @ w_r[..., None], torch.einsum("bnd,bn->bd", batch.xs, batch.ys)[..., None])
    with pytest.raises(ValueError, match="lam"):
        icl.Ridge(-1.0).weights(batch.xs, batch.ys)


def test_least_squares_recovers_w_without_noise():
    b = icl.RegressionTask(d=3, n_ctx=5).sample(20, icl.generator(2), dtype=torch.float64)
    assert torch.allclose(icl.LeastSquares().predict(b.xs, b.ys, b.x_query), b.y_query, atol=1e-10)


def test_line_search_finds_the_quadratic_minimum(batch):
    # One step's prediction is eta * a, so the best eta is mean(a y) / mean(a^2).
    a = icl.GradientDescent(eta=1.0).predict(batch.xs, batch.ys, batch.x_query)
    eta_exact = ((a * batch.y_query).sum() / (a * a).sum()).item()
    eta, loss = icl.tune_step_size(batch, n_steps=1)
    assert eta == pytest.approx(eta_exact, rel=1e-3)
    assert loss == pytest.approx(icl.evaluate(icl.GradientDescent(eta_exact), batch), rel=1e-6)


def test_metrics(batch):
    gd = icl.GradientDescent(eta=2.0)
    w = gd.weights(batch.xs, batch.ys)
    assert torch.allclose(icl.implicit_weights(gd, batch.xs, batch.ys, batch.x_query), w)
    assert icl.model_cosine(gd, gd, batch) == pytest.approx(1.0)
    assert icl.model_distance(gd, gd, batch) == pytest.approx(0.0)
    assert icl.prediction_distance(gd, icl.GradientDescent(eta=4.0), batch) == pytest.approx(
        gd.predict(batch.xs, batch.ys, batch.x_query).abs().mean().item()
    )
    assert icl.mse_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="y_hat"):
        icl.mse_loss(torch.zeros(3), torch.zeros(4))


def test_solver_shape_errors(batch):
    with pytest.raises(ValueError, match="x_query"):
        icl.GradientDescent(eta=1.0).predict(batch.xs, batch.ys, batch.x_query[:, :2])
    with pytest.raises(ValueError, match="n_steps"):
        icl.GradientDescent(eta=1.0, n_steps=-1)
    with pytest.raises(ValueError, match="bounds"):
        icl.tune_step_size(batch, bounds=(1.0, 0.1))


def test_evaluate_with_error_is_the_loss_and_its_standard_error_over_sequences():
    task = icl.RegressionTask(d=3, n_ctx=8)
    batch = task.sample(500, icl.generator(0))
    solver = icl.GradientDescent(0.5, 2)
    loss, se = icl.evaluate_with_error(solver, batch)
    per_sequence = 0.5 * (solver.predict(batch.xs, batch.ys, batch.x_query) - batch.y_query).double() ** 2
    assert loss == pytest.approx(icl.evaluate(solver, batch), rel=1e-6)
    assert se == pytest.approx(per_sequence.std().item() / 500**0.5, rel=1e-9)
    assert icl.standard_error(per_sequence) == se
    one = type(batch)(*(t[:1] for t in batch.tensors()))
    assert icl.evaluate_with_error(solver, one)[1] != icl.evaluate_with_error(solver, one)[1]  # NaN for one sequence
