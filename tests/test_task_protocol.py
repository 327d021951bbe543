"""Every task follows the one contract of ``icl_course.tasks.Task``: ``sample(batch_size, gen, device)``
and ``loss(model, batch)``, with the same parameter names, and a loss that trains (a finite scalar
with a gradient). Distributions are not tasks: they ``draw`` a tensor of a given shape."""

import inspect
import math

import pytest
import torch

import icl_course as icl
from icl_course.tasks import Choice, Gaussian, IllConditioned, Task, Uniform
from icl_course.topics.looped.models import (
    Clock,
    FullAnswerObjective,
    HaltingObjective,
    LoopedTransformer,
    NextTokenObjective,
    NextTokenTransformer,
)
from icl_course.topics.looped.tasks import make_task
from icl_course.topics.newton.logistic import LogisticTask, attention_mlp_transformer
from icl_course.topics.sign_descent.signal_noise import SignalNoiseTask, SoftmaxAttentionClassifier
from icl_course.topics.ttt.models import SequenceModel
from icl_course.topics.ttt.task import SequenceRegressionTask
from icl_course.training import FullBatch

PARITY = make_task("parity", (1, 6), (1, 8), groups=2)
SEQUENCES = SequenceRegressionTask(d=2, n_points=4)

# (task, a tiny model it trains)
CASES = {
    "RegressionTask": lambda: (icl.RegressionTask(d=2, n_ctx=4), icl.linear_transformer(d=2)),
    "FullBatch": lambda: (FullBatch(icl.RegressionTask(d=2, n_ctx=4), size=3), icl.linear_transformer(d=2)),
    "LogisticTask": lambda: (LogisticTask(d=2, n_ctx=4), attention_mlp_transformer(2, n_blocks=1, width=4)),
    "SequenceRegressionTask": lambda: (SEQUENCES, SequenceModel(SEQUENCES.token_dim, 1, width=8, n_layers=1, n_heads=1)),
    "SignalNoiseTask": lambda: (SignalNoiseTask(d=10, sparsity=2), SoftmaxAttentionClassifier(d=10, width=3)),
    "FullAnswerObjective": lambda: (FullAnswerObjective(PARITY), LoopedTransformer(16, 2, seed=0)),
    "NextTokenObjective": lambda: (NextTokenObjective(PARITY), NextTokenTransformer(width=16, n_heads=2, n_layers=2)),
    "HaltingObjective": lambda: (HaltingObjective(PARITY), Clock(width=16, n_heads=2)),
}


# the looped chapter's objectives call their batch (a list of groups) ``groups``; train passes it by position
BATCH_NAME = {"FullAnswerObjective": "groups", "NextTokenObjective": "groups", "HaltingObjective": "groups"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_task_follows_the_protocol(name):
    task, model = CASES[name]()
    assert isinstance(task, Task)
    assert list(inspect.signature(task.sample).parameters)[:3] == ["batch_size", "gen", "device"]
    assert inspect.signature(task.sample).parameters["device"].default is None
    assert list(inspect.signature(task.loss).parameters)[:2] == ["model", BATCH_NAME.get(name, "batch")]
    batch = task.sample(3, icl.generator(0), device=torch.device("cpu"))
    loss = task.loss(model, batch)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("dist", [Uniform(), Gaussian(), Choice((1.0, 3.0)), IllConditioned(d=2)])
def test_distributions_draw_and_are_not_tasks(dist):
    assert not isinstance(dist, Task) and not hasattr(dist, "sample")
    assert tuple(dist.draw((4, 3, 2), icl.generator(0)).shape) == (4, 3, 2)


def test_a_task_without_a_loss_is_not_one():
    class OnlySamples:
        def sample(self, batch_size, gen, device=None):
            return None

    assert not isinstance(OnlySamples(), Task)


def test_generator_lives_in_runtime_and_keeps_its_old_names():
    from icl_course import runtime, tasks

    assert icl.generator is tasks.generator is runtime.generator
    assert torch.equal(torch.rand(3, generator=icl.generator(4)), torch.rand(3, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="seed"):
        runtime.generator(1.5)
