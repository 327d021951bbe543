"""benchmarks/speed.py runs (a short run), and its three layers compute the same update."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import icl_course as icl

ROOT = Path(__file__).resolve().parents[1]


def _speed():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("d, n, heads", [(3, 7, 3), (10, 3, 1)])  # the layer's two contraction orders
def test_the_naive_and_previous_layers_equal_the_packages_in_float64(d, n, heads):
    speed = _speed()
    model = icl.linear_transformer(d=d, n_layers=2, n_heads=heads, init_std=0.3).double()
    Z = torch.randn(5, n + 1, d + 1, dtype=torch.float64, generator=icl.generator(0))
    ours = model(Z)
    for forward in (speed.naive_forward, speed.einsum_forward):
        assert torch.allclose(speed.with_layer(model, forward)(Z), ours, rtol=1e-12, atol=1e-12)
    assert torch.equal(speed.with_layer(model, None)(Z), ours)


def test_a_short_benchmark_run_reports_every_number(capsys):
    speed = _speed()
    result = speed.main(["--device", "cpu", "--steps", "2", "--repeats", "1", "--only", "01", "05", "--no-layers", "--markdown"])
    rows = {r["case"]: r for r in result["training"]}
    assert set(rows) == {"01_gd_step", "05_ttt"}
    assert all(r["steps_per_s"] > 0 and 0 < r["sampling_share"] < 1 for r in rows.values())
    assert rows["01_gd_step"]["speedup_over_naive"] > 0 and "speedup_over_naive" not in rows["05_ttt"]
    assert "| 01_gd_step |" in capsys.readouterr().out
    layer = speed.layer_seconds(200, 6, 3, 2, torch.device("cpu"), repeats=1)
    assert layer["speedup_over_naive"] > 0 and layer["seconds_package"] > 0
