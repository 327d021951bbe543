import json

import pytest

from icl_course.cli import main


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
