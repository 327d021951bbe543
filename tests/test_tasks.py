import pytest
import torch

import icl_course as icl


def test_shapes_and_targets():
    task = icl.RegressionTask(d=4, n_ctx=7)
    b = task.sample(5, icl.generator(0))
    assert b.xs.shape == (5, 7, 4) and b.ys.shape == (5, 7) and b.x_query.shape == (5, 4)
    assert torch.allclose(b.ys, torch.einsum("bnd,bd->bn", b.xs, b.w))  # no noise
    assert torch.allclose(b.y_query, (b.x_query * b.w).sum(-1))
    assert b.xs.abs().max() <= 0.5


def test_same_seed_same_batch_and_different_seed_differs():
    task = icl.RegressionTask(d=3, n_ctx=4, noise=icl.Uniform(0.0, 2.0))
    a, b, c = (task.sample(8, icl.generator(s)) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert not torch.equal(a.xs, c.xs)


def test_per_sequence_noise_level():
    task = icl.RegressionTask(d=2, n_ctx=2000, noise=icl.Choice((1.0, 3.0)))
    b = task.sample(64, icl.generator(0))
    assert set(b.sigma.tolist()) == {1.0, 3.0}
    residual_std = (b.ys - torch.einsum("bnd,bd->bn", b.xs, b.w)).std(dim=1)
    assert torch.allclose(residual_std, b.sigma, rtol=0.1)


def test_gaussian_inputs_have_the_requested_covariance():
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    task = icl.RegressionTask(d=2, n_ctx=100, inputs=icl.Gaussian(cov=cov))
    xs = task.sample(1000, icl.generator(0), dtype=torch.float64).xs.reshape(-1, 2)
    assert torch.allclose(xs.T @ xs / len(xs), cov.double(), atol=0.03)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(d=0, n_ctx=3), "d"),
        (dict(d=2, n_ctx=0), "n_ctx"),
        (dict(d=2, n_ctx=3, noise=-0.1), "noise"),
        (dict(d=2, n_ctx=3, noise=icl.Uniform(-1.0, 1.0)), "noise"),
        (dict(d=3, n_ctx=3, inputs=icl.Gaussian(cov=torch.eye(2))), "inputs"),
    ],
)
def test_bad_task_parameters_name_the_parameter(kwargs, word):
    with pytest.raises(ValueError, match=word):
        icl.RegressionTask(**kwargs)


def test_bad_distributions_and_batch_size():
    with pytest.raises(ValueError, match="low < high"):
        icl.Uniform(1.0, 0.0)
    with pytest.raises(ValueError, match="symmetric"):
        icl.Gaussian(cov=torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="batch_size"):
        icl.RegressionTask(d=2, n_ctx=2).sample(0, icl.generator(0))
    with pytest.raises(ValueError, match="seed"):
        icl.generator(1.5)
