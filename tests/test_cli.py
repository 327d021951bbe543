import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.figure import Figure

from icl_course import topics
from icl_course.course import cli, grading
from icl_course.course.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device" in out and "gd-step" in out


def test_reproduce_writes_metrics_and_figures(tmp_path):
    assert main(["reproduce", "gd-step", "--profile", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("best_gd_loss", "best_gd_eta", "lsa_loss", "model_cosine", "prediction_distance",
                "train_seconds", "profile", "device"):
        assert key in metrics
    assert metrics["profile"] == "smoke"
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, word", [(["reproduce", "nope"], "topic"), (["reproduce", "gd-step", "--profile", "huge"], "profile")])
def test_bad_topic_or_profile(argv, word, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert word in capsys.readouterr().err


def test_write_weights_needs_a_topic_that_ships_weights(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "gd-step", "--write-weights"])
    assert "ships no pretrained weights" in capsys.readouterr().err


# --- reproduce never leaves a run that looks finished but is not ----------------------------------

OLD_RUN = {"metrics.json": '{"old": true}\n', "loss_curve.png": "old figure"}


def old_run(folder):
    folder.mkdir(exist_ok=True)
    for name, text in OLD_RUN.items():
        (folder / name).write_text(text)
    return folder


def contents(folder):
    return {p.name: p.read_text(errors="replace") for p in folder.iterdir()}


def fake_experiment(monkeypatch, run=None):
    """``reproduce`` runs a stand-in experiment of two figures (or ``run``, e.g. one that fails)."""
    def figures():
        return {name: Figure() for name in ("first", "second")}

    default = lambda profile, progress: SimpleNamespace(metrics={"new": True}, figures=figures)  # noqa: E731
    monkeypatch.setattr(topics.Topic, "experiment", lambda self: SimpleNamespace(run=run or default))


def training_must_not_start(profile, progress):
    raise AssertionError("the experiment ran before --out was checked")


def start_reproduce(out, *extra):
    """``icl-course reproduce gd-step`` in a subprocess (Ctrl-C raises KeyboardInterrupt in it, as in a terminal)."""
    argv = [sys.executable, "-m", "icl_course.course.cli", "reproduce", "gd-step", "--profile", "smoke", "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_once_training(proc, parent, signum):
    """Send ``signum`` once the run's temporary folder exists (the experiment runs for seconds after)."""
    deadline = time.monotonic() + 120
    while not list(parent.glob(".*.partial")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary folder appeared"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return err


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_reproduce_leaves_nothing(tmp_path, signum, status):
    out = tmp_path / "runs" / "gd-step"
    proc = start_reproduce(out)
    err = interrupt_once_training(proc, tmp_path / "runs", signum)
    assert proc.returncode == status, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert signal.Signals(signum).name in err
    assert list(tmp_path.iterdir()) == []  # no run, no temporary folder, not even the parent made for it


def test_an_interrupted_reproduce_with_force_leaves_the_old_run_untouched(tmp_path):
    out = old_run(tmp_path / "gd-step")
    proc = start_reproduce(out, "--force")
    err = interrupt_once_training(proc, tmp_path, signal.SIGINT)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert contents(out) == OLD_RUN and [p.name for p in tmp_path.iterdir()] == ["gd-step"]


def test_force_replaces_the_old_run_and_metrics_come_last(tmp_path, monkeypatch):
    out = old_run(tmp_path / "run")
    written = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: (written.append(Path(path).name), real_savefig(self, path, **kw)))
    real_write = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **kw: (written.append(self.name), real_write(self, text, *a, **kw))[1])
    fake_experiment(monkeypatch)
    assert main(["reproduce", "gd-step", "--out", str(out), "--quiet", "--force"]) == 0
    assert written == ["first.png", "second.png", "metrics.json"]
    assert sorted(contents(out)) == ["first.png", "metrics.json", "second.png"]
    assert json.loads((out / "metrics.json").read_text())["new"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_interrupt_while_writing_figures_leaves_the_old_run(tmp_path, monkeypatch, capsys):
    out = old_run(tmp_path / "run")
    calls = []

    def savefig(self, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(Figure, "savefig", savefig)
    fake_experiment(monkeypatch)
    assert main(["reproduce", "gd-step", "--out", str(out), "--quiet", "--force"]) == 130
    assert contents(out) == OLD_RUN and [p.name for p in tmp_path.iterdir()] == ["run"]
    assert capsys.readouterr().err.strip() == (f"icl-course reproduce: stopped by SIGINT: {out} was left as it was; "
                                               "add --resume to make a run that can be continued")


def test_an_interrupt_just_after_the_temporary_folder_is_made_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The subprocess tests above interrupt as soon as the folder appears; this pins that moment down."""
    out = old_run(tmp_path / "run")
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kw):
        real_mkdir(self, *args, **kw)
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir)
    fake_experiment(monkeypatch)
    assert main(["reproduce", "gd-step", "--out", str(out), "--quiet", "--force"]) == 130
    assert contents(out) == OLD_RUN and [p.name for p in tmp_path.iterdir()] == ["run"]
    capsys.readouterr()


def test_resume_continues_an_interrupted_run_and_gives_the_same_numbers(tmp_path, monkeypatch, capsys):
    """``--resume``: training checkpoints beside --out; after Ctrl-C the same command continues from there."""
    import torch

    import icl_course as icl

    stop = {"at": None}

    def run(profile, progress):
        model = icl.linear_transformer(d=3, n_layers=1, seed=0)

        def tick(step, loss):
            if step == stop["at"]:
                raise KeyboardInterrupt

        tick.resumable = True  # records nothing: a resumed run may skip the steps before its checkpoint
        cfg = icl.TrainConfig(steps=250, batch_size=16, lr=1e-2, seed=1)
        icl.train(model, icl.RegressionTask(d=3, n_ctx=5), cfg, callback=tick, device="cpu")
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
        return SimpleNamespace(metrics={"weights": weights}, figures=dict)

    monkeypatch.setattr(topics.Topic, "experiment", lambda self: SimpleNamespace(run=run))
    argv = ["reproduce", "gd-step", "--quiet", "--resume"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    stop["at"] = 230
    out = tmp_path / "resumed"
    assert main([*argv, "--out", str(out)]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / ".resumed.checkpoints").is_dir()  # the checkpoint at step 200 stays
    stop["at"] = 150  # before the checkpoint: a resumed run starts after it, so this stop never comes
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["weights"] == straight["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "straight"]  # checkpoints removed


@pytest.fixture
def sigint_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal; a shell's background job starts with SIGINT
    ignored, and an ignored signal stays ignored after the swap re-delivers it (as it should)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_during_the_swap_waits_until_the_new_run_is_in_place(tmp_path, monkeypatch, sigint_as_in_a_terminal):
    out = old_run(tmp_path / "run")
    real_rename = os.rename

    def rename(src, dst):  # Ctrl-C arrives between setting the old run aside and moving the new one in
        signal.raise_signal(signal.SIGINT)
        real_rename(src, dst)

    monkeypatch.setattr(cli.os, "rename", rename)
    fake_experiment(monkeypatch)
    assert main(["reproduce", "gd-step", "--out", str(out), "--quiet", "--force"]) == 130
    assert sorted(contents(out)) == ["first.png", "metrics.json", "second.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def fails(profile, progress):
        raise RuntimeError("boom")

    fake_experiment(monkeypatch, fails)
    with pytest.raises(RuntimeError, match="boom"):
        main(["reproduce", "gd-step", "--out", str(tmp_path / "a" / "b"), "--quiet"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, word", [
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "existing file"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "run", "which is a file"),
    (lambda tmp: old_run(tmp / "run"), "--force"),
])
def test_a_bad_out_is_refused_before_training(tmp_path, monkeypatch, capsys, make, word):
    out = make(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    fake_experiment(monkeypatch, training_must_not_start)
    with pytest.raises(SystemExit) as exit:
        main(["reproduce", "gd-step", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--out" in err and word in err, err
    assert {p.name for p in tmp_path.iterdir()} == before


def test_an_unwritable_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    fake_experiment(monkeypatch, training_must_not_start)
    with monkeypatch.context() as m:
        m.setattr(cli.os, "access", lambda path, mode: False)  # as for a user without write permission
        with pytest.raises(SystemExit) as exit:
            main(["reproduce", "gd-step", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--out" in err and "permission denied" in err, err

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # where the check passes but writing fails
        if self.suffix == ".partial":
            raise PermissionError(13, "Permission denied")
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(SystemExit) as exit:
        main(["reproduce", "gd-step", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--out" in err and "cannot write" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_is_refused(tmp_path, monkeypatch, capsys):
    fake_experiment(monkeypatch, training_must_not_start)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
        main(["reproduce", "gd-step", "--out", str(locked / "run"), "--quiet"])
    assert "permission denied" in capsys.readouterr().err


@pytest.mark.parametrize("make, word", [
    (lambda tmp: tmp, "folder"),
    (lambda tmp: (tmp / "book.csv").mkdir() or tmp / "book.csv", "folder"),
    (lambda tmp: tmp / "none" / "book.csv", "does not exist"),
    (lambda tmp: tmp / "book.txt", ".csv or .json"),
])
def test_a_bad_gradebook_is_refused_before_grading(tmp_path, monkeypatch, capsys, make, word):
    monkeypatch.setattr(grading, "grade_all", lambda *a, **kw: pytest.fail("graded before --out was checked"))
    (tmp_path / "sub.ipynb").write_text("{}")
    with pytest.raises(SystemExit) as exit:
        main(["grade", str(tmp_path / "sub.ipynb"), "--out", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--out" in err and word in err, err


def test_a_gradebook_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    book = tmp_path / "book.csv"
    book.write_text("old\n")
    def writer(f):
        raise KeyboardInterrupt

    monkeypatch.setattr(grading.csv, "writer", writer)
    with pytest.raises(KeyboardInterrupt):
        grading.write_report([grading.SubmissionResult("s", None, "graded")], book)
    assert book.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["book.csv"]
