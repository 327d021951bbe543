"""Sampling on the generator's device, in the batch's dtype: same seed, same data on the same device.

``train`` draws its batches with ``generator(config.seed, device)`` on the model's device. On the CPU
here that is the CPU; the CUDA cases run where a GPU is (``make device-check``).
"""

import dataclasses

import pytest
import torch

import icl_course as icl
from icl_course.tasks import Choice, Gaussian, IllConditioned, RegressionTask, Uniform
from icl_course.topics.looped.tasks import make_task as looped_task
from icl_course.topics.newton.logistic import LogisticTask
from icl_course.topics.sign_descent.signal_noise import SignalNoiseTask
from icl_course.topics.ttt.recall import AssociativeRecallTask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TASKS = {
    "uniform": RegressionTask(d=3, n_ctx=5),
    "gaussian, noisy levels": RegressionTask(d=3, n_ctx=5, inputs=Gaussian(std=2.0), noise=Choice((1.0, 3.0))),
    "gaussian cov": RegressionTask(d=2, n_ctx=5, inputs=Gaussian(cov=torch.tensor([[2.0, 0.5], [0.5, 1.0]])),
                                   noise=Uniform(0.0, 1.0)),
    "ill-conditioned": RegressionTask(d=3, n_ctx=5, inputs=IllConditioned(d=3, kappa=5.0)),
    "logistic": LogisticTask(d=3, n_ctx=6),
    "signal-noise": SignalNoiseTask(d=20, snr=0.5, sparsity=3),
    "recall": AssociativeRecallTask(),
    "looped addition": looped_task("addition", (2, 5), (2, 8)),
}


def tensors(batch):
    """Every tensor of a batch (a dataclass, or a list of them), in order."""
    if torch.is_tensor(batch):
        return [batch]
    if isinstance(batch, (list, tuple)):
        return [t for item in batch for t in tensors(item)]
    if dataclasses.is_dataclass(batch):
        return [t for f in dataclasses.fields(batch) for t in tensors(getattr(batch, f.name))]
    return []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_batch_drawn_on_the_generators_device(name, device):
    task = TASKS[name]
    first, again, other = (tensors(task.sample(16, icl.generator(seed, device))) for seed in (3, 3, 4))
    assert first and all(t.device.type == device for t in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_regression_draws_in_the_batchs_dtype(device):
    task = TASKS["gaussian cov"]
    for dtype in (torch.float32, torch.float64):
        batch = task.sample(8, icl.generator(0, device), dtype=dtype)
        assert all(t.dtype == dtype and t.device.type == device for t in batch.tensors())
        # the targets are the inputs times the weights, exactly in that dtype
        assert torch.equal(batch.y_query, torch.einsum("bd,bd->b", batch.x_query, batch.w))


def test_the_float64_stream_is_the_closed_form_tests_one():
    """float64 batches are drawn in float64 (not float32 widened): the closed-form tests' data."""
    batch = RegressionTask(d=3, n_ctx=5, inputs=Gaussian()).sample(4, icl.generator(0), dtype=torch.float64)
    gen = icl.generator(0)
    assert torch.equal(batch.xs, torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)[:, :5])


def test_generator_device_and_bad_input():
    assert icl.generator(0).device.type == "cpu" and icl.generator(0, "cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="device"):
        icl.generator(0, "no-such-device")
    with pytest.raises(ValueError, match="seed"):
        icl.generator(True)


def test_train_draws_on_the_models_device_and_repeats_itself():
    seen = []

    class Watch:
        def sample(self, batch_size, gen, device=None):
            seen.append(gen.device)
            return TASKS["uniform"].sample(batch_size, gen, device=device)

        def loss(self, model, batch):
            return TASKS["uniform"].loss(model, batch)

    models = [icl.linear_transformer(d=3, n_layers=2) for _ in range(2)]
    for model in models:
        icl.train(model, Watch(), icl.TrainConfig(steps=5, batch_size=32, lr=1e-2), device=DEVICES[-1])
    assert {d.type for d in seen} == {DEVICES[-1]}
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
