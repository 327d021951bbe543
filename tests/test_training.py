import pytest
import torch

import icl_course as icl

TASK = icl.RegressionTask(d=3, n_ctx=8)


def small_run(seed=0, **overrides):
    model = icl.linear_transformer(d=3, n_layers=1, seed=seed)
    config = icl.TrainConfig(**{"steps": 40, "batch_size": 64, "lr": 1e-2, "log_every": 10, **overrides})
    return model, icl.train(model, TASK, config, device="cpu")


def test_loss_decreases_and_history_is_logged():
    _, history = small_run(steps=150, lr=5e-2)
    assert history.steps == list(range(9, 150, 10))
    assert history.losses[-1] < 0.8 * history.losses[0]
    assert history.seconds > 0


def test_same_seed_same_result():
    (m1, h1), (m2, h2) = small_run(), small_run()
    assert h1.losses == h2.losses
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    _, h3 = small_run(seed=1)  # another initialisation
    assert h3.losses != h1.losses


def test_callback_sees_every_step():
    seen = []
    model = icl.linear_transformer(d=3)
    icl.train(model, TASK, icl.TrainConfig(steps=7, batch_size=8), callback=lambda s, l: seen.append(s), device="cpu")
    assert seen == list(range(7))


def test_divergence_stops_with_advice():
    model = icl.linear_transformer(d=3, n_layers=4, init_std=1.0)
    with pytest.raises(icl.TrainingDiverged, match="smaller TrainConfig.lr"):
        icl.train(model, TASK, icl.TrainConfig(steps=200, batch_size=32, lr=10.0, grad_clip=None), device="cpu")


def test_schedule():
    config = icl.TrainConfig(steps=100, lr=1.0, warmup=0.1, schedule="cosine", min_lr_frac=0.01)
    assert config.lr_at(0) == pytest.approx(0.1)
    assert config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(99) == pytest.approx(0.01, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(grad_clip=-1.0), "grad_clip"),
     (dict(warmup=1.0), "warmup"), (dict(schedule="linear"), "schedule"), (dict(batch_size=0), "batch_size")],
)
def test_bad_config_names_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        icl.TrainConfig(**kwargs)
