import math
import os

import pytest
import torch
from margins import claim

import icl_course as icl
from icl_course import training

TASK = icl.RegressionTask(d=3, n_ctx=8)


def small_run(model_seed=0, **overrides):
    model = icl.linear_transformer(d=3, n_layers=1, seed=model_seed)
    config = icl.TrainConfig(**{"steps": 40, "batch_size": 64, "lr": 1e-2, "log_every": 10, **overrides})
    return model, icl.train(model, TASK, config, device="cpu")


@claim(trained_over_initial_loss=("<", 0.8))  # held-out loss after 400 steps / before training
def loss_decrease_claims(seed):
    held_out = TASK.sample(4096, icl.generator(1000 + seed))  # the logged losses are single batches of 64: noisy
    initial = icl.evaluate(icl.linear_transformer(d=3, n_layers=1, seed=seed), held_out)
    model, _ = small_run(seed, steps=400, lr=5e-2, seed=seed)  # seed: the initialisation and the data stream
    return {"trained_over_initial_loss": icl.evaluate(model, held_out) / initial}


def test_loss_decreases():
    loss_decrease_claims.check()


def test_history_is_logged():
    _, history = small_run(steps=150, lr=5e-2)
    assert history.steps == list(range(9, 150, 10))
    assert len(history.losses) == len(history.steps) and history.seconds > 0


def test_same_seed_same_result():
    (m1, h1), (m2, h2) = small_run(), small_run()
    assert h1.losses == h2.losses
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    _, h3 = small_run(model_seed=1)  # another initialisation
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


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(betas=(2, 0.5)), "betas"), (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.9)), "betas"),
     (dict(betas=(0.9,)), "betas"), (dict(weight_decay=-1), "weight_decay"), (dict(weight_decay=math.nan), "weight_decay"),
     (dict(seed=1.5), "seed"), (dict(seed=True), "seed"), (dict(min_lr_frac=-1), "min_lr_frac"),
     (dict(min_lr_frac=1.5), "min_lr_frac"), (dict(lr=math.inf), "lr"), (dict(lr=math.nan), "lr"),
     (dict(grad_clip=math.inf), "grad_clip"), (dict(warmup=math.nan), "warmup"), (dict(steps=True), "steps")],
)
def test_bad_numbers_name_the_field(kwargs, word):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{word}"):
        icl.TrainConfig(**kwargs)


def test_finite_blow_up_is_caught_early():
    """The issue's case: lr=1e3 "succeeded" with a final loss thousands of times the trained one."""
    seen = []
    model = icl.linear_transformer(d=3, n_layers=1)
    with pytest.raises(icl.TrainingDiverged, match="blew up.*smaller TrainConfig.lr"):
        icl.train(model, TASK, icl.TrainConfig(steps=500, batch_size=64, lr=1e3), callback=lambda s, l: seen.append(l),
                  device="cpu")
    assert len(seen) < 2 * training.DIVERGENCE_WINDOW and all(math.isfinite(v) for v in seen)


def test_a_few_spikes_are_not_divergence():
    """The window's median ignores isolated spikes: here one step in seven costs 10^4 times more."""
    class Spiky:
        def __init__(self):
            self.calls = 0

        def sample(self, batch_size, gen, device=None):
            self.calls += 1
            return TASK.sample(batch_size, gen, device=device)

        def loss(self, model, batch):
            return TASK.loss(model, batch) * (1e4 if self.calls % 7 == 0 else 1.0)

    seen = []
    icl.train(icl.linear_transformer(d=3), Spiky(), icl.TrainConfig(steps=60, batch_size=64, lr=1e-2),
              callback=lambda s, l: seen.append(l), device="cpu")
    assert max(seen) > 1e3 * seen[0] and len(seen) == 60


class NaNData:
    """Regression batches whose inputs hold a NaN from the ``at``-th draw on."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def sample(self, batch_size, gen, device=None):
        self.calls += 1
        batch = TASK.sample(batch_size, gen, device=device)
        if self.calls > self.at:
            batch.xs[0, 0, 0] = math.nan
        return batch

    def loss(self, model, batch):
        return TASK.loss(model, batch)


def test_non_finite_data_is_blamed_not_the_learning_rate():
    model = icl.linear_transformer(d=3)
    with pytest.raises(icl.TrainingDiverged, match=r"step 3 because the data is not finite: batch\.xs .*NaNData") as err:
        icl.train(model, NaNData(at=3), icl.TrainConfig(steps=10, batch_size=8), device="cpu")
    assert "smaller TrainConfig.lr" not in str(err.value)


# --- checkpoints -------------------------------------------------------------------------------------


class Counting:
    """A task with a counter that changes its data (like a curriculum): a resume must restore it."""

    def __init__(self):
        self._calls = 0

    def __repr__(self):
        return "Counting()"

    def sample(self, batch_size, gen, device=None):
        self._calls += 1
        batch = TASK.sample(batch_size, gen, device=device)
        batch.y_query = batch.y_query * (1 + self._calls / 100)
        return batch

    def loss(self, model, batch):
        return TASK.loss(model, batch)


RESUME = dict(steps=60, batch_size=32, lr=3e-2, warmup=0.1, schedule="cosine", weight_decay=0.01, log_every=7)


class Interrupt(Exception):
    pass


def interrupt_at(step):
    def callback(s, loss):
        if s == step:
            raise Interrupt
    return callback


def resumable_run(path, stop=None, every=10, seed=0):
    model = icl.linear_transformer(d=3, n_layers=2, seed=seed)
    history = icl.train(model, Counting(), icl.TrainConfig(**RESUME), callback=None if stop is None else interrupt_at(stop),
                        device="cpu", checkpoint=path, checkpoint_every=every)
    return model, history


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("stop, every", [(34, 10), (43, 9), (5, 10)])
def test_resumed_run_is_bit_identical(tmp_path, stop, every):
    model = icl.linear_transformer(d=3, n_layers=2)
    reference = icl.train(model, Counting(), icl.TrainConfig(**RESUME), device="cpu")
    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        resumable_run(path, stop=stop, every=every)
    done = stop // every * every  # the steps the last checkpoint holds (here mid-window of the history)
    assert (torch.load(path, weights_only=True)["step"] if done else 0) == done
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run.pt"] if done else [])  # no temporary file left
    seen, resumed = [], icl.linear_transformer(d=3, n_layers=2)
    history = icl.train(resumed, Counting(), icl.TrainConfig(**RESUME), callback=lambda s, l: seen.append(s),
                        device="cpu", checkpoint=path, checkpoint_every=every)
    assert seen == list(range(done, 60))  # only the steps the checkpoint lacked
    assert history.steps == reference.steps and history.losses == reference.losses
    assert same_weights(model, resumed)
    again, history = resumable_run(path, every=every)  # finished: loads the final state, trains nothing
    assert history.steps == reference.steps and history.losses == reference.losses
    assert same_weights(model, again)


def test_resume_restores_a_curriculum(tmp_path):
    """Chapter 6's looped-fp objective draws as a function of the step: a resumed run is the same run."""
    from icl_course.topics.looped.models import FullAnswerObjective, LoopedTransformer
    from icl_course.topics.looped.tasks import make_task

    spec = make_task("parity", (1, 6), (1, 8), groups=2)

    def run(checkpoint=None, stop=None):
        model = LoopedTransformer(16, 2, seed=0)
        objective = FullAnswerObjective(spec, extra_loops=2, curriculum=20)
        history = icl.train(model, objective, icl.TrainConfig(steps=30, batch_size=16, log_every=5), device="cpu",
                            callback=None if stop is None else interrupt_at(stop), checkpoint=checkpoint, checkpoint_every=4)
        return model, history

    model, reference = run()
    with pytest.raises(Interrupt):
        run(tmp_path / "run.pt", stop=13)
    resumed, history = run(tmp_path / "run.pt")
    assert history.losses == reference.losses and same_weights(model, resumed)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        resumable_run(path, stop=12)
    with pytest.raises(ValueError, match=r"another run.*config \(lr: 0\.03 there, 0\.01 here\)"):
        icl.train(icl.linear_transformer(d=3, n_layers=2), Counting(), icl.TrainConfig(**{**RESUME, "lr": 1e-2}),
                  device="cpu", checkpoint=path)
    with pytest.raises(ValueError, match="another run.*model"):
        resumable_run(path, seed=1)
    with pytest.raises(ValueError, match="another run.*task"):
        icl.train(icl.linear_transformer(d=3, n_layers=2), TASK, icl.TrainConfig(**RESUME), device="cpu", checkpoint=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        resumable_run(path)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        resumable_run(path, stop=12)
    real_save = torch.save

    def half_save(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        resumable_run(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    assert torch.load(path, weights_only=True)["step"] == 10


def test_checkpointing_resumes_an_interrupted_experiment(tmp_path, monkeypatch):
    """An experiment interrupted under ``checkpointing`` and run again gives the uninterrupted metrics."""
    from icl_course.topics.newton import experiment as newton

    def untimed(metrics):
        return {k: v for k, v in metrics.items() if not k.endswith("seconds")}

    reference = untimed(newton.run("smoke").metrics)
    real_save, saves = training._save, []

    def save_then_stop(path, state):
        real_save(path, state)
        saves.append(state["step"])
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save", save_then_stop)
    with training.checkpointing(tmp_path / "ckpt", every=5):
        with pytest.raises(KeyboardInterrupt):
            newton.run("smoke")
        assert saves == [5, 10, 15]
        monkeypatch.setattr(training, "_save", real_save)
        assert untimed(newton.run("smoke").metrics) == reference
    assert training.CHECKPOINT_ENV not in os.environ
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {f.split("-")[0] for f in files} == {"AttentionMLPTransformer", "LinearTransformer"}
    assert all(torch.load(tmp_path / "ckpt" / f, weights_only=True)["step"] > 0 for f in files)


def test_checkpointing_skips_callbacks_that_record():
    assert training._resumable(None) and not training._resumable(lambda s, l: None)


# --- the one loop's other data, optimizers, tracking and progress ---------------------------------------


def test_track_measures_before_the_first_step_every_k_steps_and_at_the_end(tmp_path):
    def weight_norm(model):
        return {"norm": sum(p.norm().item() for p in model.parameters())}

    def steps_seen(model):
        return {"one": 1.0}

    config = icl.TrainConfig(steps=25, batch_size=16, log_every=5)
    model = icl.linear_transformer(d=3, n_layers=1)
    history = icl.train(model, TASK, config, device="cpu", track=[(weight_norm, 10), (steps_seen, 1)])
    assert history.tracked[0]["step"] == [0, 10, 20, 25] and len(history.tracked[0]["norm"]) == 4
    assert history.tracked[0]["norm"][-1] == weight_norm(model)["norm"]
    assert history.tracked[1]["step"] == list(range(26))
    with pytest.raises(Interrupt):  # a resumed run has the measures from before its checkpoint
        icl.train(icl.linear_transformer(d=3, n_layers=1), TASK, config, callback=interrupt_at(17), device="cpu",
                  checkpoint=tmp_path / "run.pt", checkpoint_every=5, track=[(weight_norm, 10), (steps_seen, 1)])
    resumed = icl.train(icl.linear_transformer(d=3, n_layers=1), TASK, config, device="cpu",
                        checkpoint=tmp_path / "run.pt", checkpoint_every=5, track=[(weight_norm, 10), (steps_seen, 1)])
    assert resumed.tracked == history.tracked and resumed.losses == history.losses


def test_an_optimizer_of_ones_own_trains_at_its_own_rate():
    # Off the saddle at 0 (a 1e-3 init barely moves under plain SGD in 30 steps), and judged on a fixed
    # held-out batch: the windows of the training loss differ by more than 30 steps change it.
    model = icl.linear_transformer(d=3, n_layers=1, init_std=0.5)
    held_out = TASK.sample(4096, icl.generator(123))
    before = TASK.loss(model, held_out).item()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    icl.train(model, TASK, icl.TrainConfig(steps=30, batch_size=64, log_every=10), device="cpu", optimizer=sgd)
    assert sgd.param_groups[0]["lr"] == 0.05 and TASK.loss(model, held_out).item() < before
    with pytest.raises(ValueError, match="TrainConfig.lr"):  # it would be ignored
        icl.train(model, TASK, icl.TrainConfig(steps=3, lr=0.1), device="cpu", optimizer=sgd)
    with pytest.raises(icl.TrainingDiverged, match=r"lr=1e\+03\). Try a smaller learning rate for the optimizer"):
        big = torch.optim.SGD(model.parameters(), lr=1e3)
        icl.train(model, TASK, icl.TrainConfig(steps=200, batch_size=64, grad_clip=None), device="cpu", optimizer=big)


def test_full_batch_is_the_same_training_set_every_step():
    full = training.FullBatch(TASK, size=32, seed=3)
    a, b = full.sample(32, icl.generator(0)), full.sample(32, icl.generator(1))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.xs, TASK.sample(32, icl.generator(3)).xs)
    history = icl.train(icl.linear_transformer(d=3, n_layers=1), full, icl.TrainConfig(steps=80, batch_size=32, lr=3e-2),
                        device="cpu")
    assert history.losses[-1] < 0.5 * history.losses[0]  # one fixed set is fit far faster than fresh batches
    with pytest.raises(ValueError, match="batch_size"):
        full.sample(16, icl.generator(0))


def test_progress_bar_counts_the_steps_of_every_run_it_is_shown():
    from icl_course.progress import ProgressBar

    bar = ProgressBar(2 * 12, desc="two runs")
    for seed in range(2):
        icl.train(icl.linear_transformer(d=3, n_layers=1, seed=seed), TASK, icl.TrainConfig(steps=12, batch_size=8),
                  callback=bar, device="cpu")
    assert bar.done == bar.bar.n == 24  # not closed after the first run's 12
    with pytest.raises(ValueError, match="progress"):
        icl.train(icl.linear_transformer(d=3), TASK, icl.TrainConfig(steps=2), device="cpu", progress=1)
    with pytest.raises(ValueError, match="track"):
        icl.train(icl.linear_transformer(d=3), TASK, icl.TrainConfig(steps=2), device="cpu", track=[(print, 0)])
