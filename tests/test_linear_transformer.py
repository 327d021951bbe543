"""The linear self-attention stack against the formulas it claims to compute (float64)."""

import pytest
import torch

import icl_course as icl
from icl_course.linear_transformer import LinearTransformer


def attention_written_out(layer, Z):
    """The layer as the chapter writes it: scores e_t^T Q c_j times values P c_j, averaged over j."""
    n = Z.shape[1] - 1
    C = Z[:, :n]
    Q, P = layer.matrices()
    out = Z.clone()
    for h in range(Q.shape[0]):
        scores = Z @ Q[h] @ C.transpose(1, 2)  # (B, n+1, n)
        values = C @ P[h].T  # (B, n, D)
        out = out + scores @ values / n
    return out


@pytest.mark.parametrize("attention", ["full", "diag", "gdpp"])
def test_layer_equals_scores_times_values(attention):
    model = icl.linear_transformer(d=4, n_layers=1, n_heads=3, attention=attention, init_std=0.5, seed=1).double()
    Z = torch.randn(6, 8, 5, dtype=torch.float64)
    assert torch.allclose(model.layers[0](Z), attention_written_out(model.layers[0], Z), atol=1e-12)


def test_query_token_never_influences_other_tokens():
    model = icl.linear_transformer(d=3, n_layers=3, n_heads=2, init_std=0.5).double()
    Z = torch.randn(4, 6, 4, dtype=torch.float64)
    Z2 = Z.clone()
    Z2[:, -1] += 10.0
    assert torch.allclose(model(Z)[:, :-1], model(Z2)[:, :-1], atol=1e-12)


def test_diag_coefficients_give_the_documented_token_update():
    layer = icl.linear_transformer(d=3, n_heads=1, attention="diag", init_std=0.7, seed=3).double().layers[0]
    Z = torch.randn(2, 6, 4, dtype=torch.float64)
    n = 5
    X, y = Z[:, :n, :3], Z[:, :n, 3]
    c = {k: v[0] for k, v in layer.coefficients().items()}
    XtX, Xty = X.transpose(1, 2) @ X / n, torch.einsum("bnd,bn->bd", X, y) / n
    x, yy = Z[..., :3], Z[..., 3]
    dx = c["w_xx"] * x @ XtX + c["w_xy"] * yy[..., None] * Xty[:, None]
    dy = c["w_yx"] * (x @ Xty[..., None])[..., 0] + c["w_yy"] * yy * (y * y).sum(1, keepdim=True) / n
    expected = Z + torch.cat([dx, dy[..., None]], dim=-1)
    assert torch.allclose(layer(Z), expected, atol=1e-12)


def test_gdpp_has_no_y_to_query_path():
    layer = icl.GDPPAttention(d=3, n_heads=2, init_std=0.5)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"q_x", "p_x", "p_y"}
    assert all(v.abs().max() == 0 for k, v in layer.coefficients().items() if k in ("w_xy", "w_yy"))


@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_gd_transformer_equals_gradient_descent(n_steps):
    task = icl.RegressionTask(d=6, n_ctx=9)
    b = task.sample(200, icl.generator(0), dtype=torch.float64)
    stack = icl.gd_transformer(d=6, eta=3.0, n_steps=n_steps, dtype=torch.float64)
    gd = icl.GradientDescent(eta=3.0, n_steps=n_steps)
    assert torch.allclose(stack.predict(b.xs, b.ys, b.x_query), gd.predict(b.xs, b.ys, b.x_query), atol=1e-10, rtol=0)


def test_gd_transformer_with_a_preconditioner():
    gamma = torch.randn(4, 4, dtype=torch.float64) / 2 + torch.eye(4, dtype=torch.float64)  # not symmetric
    b = icl.RegressionTask(d=4, n_ctx=12).sample(100, icl.generator(1), dtype=torch.float64)
    stack = icl.gd_transformer(d=4, eta=0.7, n_steps=3, preconditioner=gamma, dtype=torch.float64)
    gd = icl.GradientDescent(eta=0.7, n_steps=3, preconditioner=gamma)
    assert torch.allclose(stack.predict(b.xs, b.ys, b.x_query), gd.predict(b.xs, b.ys, b.x_query), atol=1e-10, rtol=0)


def test_predictions_are_linear_in_the_query():
    model = icl.linear_transformer(d=5, n_layers=4, n_heads=2, init_std=0.3, seed=2).double()
    b = icl.RegressionTask(d=5, n_ctx=7).sample(10, icl.generator(0), dtype=torch.float64)
    w = icl.implicit_weights(model, b.xs, b.ys, b.x_query)
    other_query = torch.randn_like(b.x_query)
    assert torch.allclose(model.predict(b.xs, b.ys, other_query), (w * other_query).sum(-1), atol=1e-10)


def test_clamp_bounds_every_token():
    model = icl.linear_transformer(d=2, n_layers=3, init_std=3.0, clamp=1.0)
    Z = 5 * torch.randn(3, 4, 3)
    assert all(s.abs().max() <= 1.0 for s in model(Z, return_all=True)[1:])


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="attention"):
        icl.linear_transformer(d=3, attention="softmax")
    with pytest.raises(ValueError, match="n_layers"):
        icl.linear_transformer(d=3, n_layers=0)
    with pytest.raises(ValueError, match="n_heads"):
        icl.linear_transformer(d=3, n_heads=0)
    with pytest.raises(ValueError, match="layers"):
        LinearTransformer([])
    model = icl.linear_transformer(d=3)
    with pytest.raises(ValueError, match="Z must have shape"):
        model(torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="xs"):
        model.predict(torch.zeros(2, 5, 4), torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="preconditioner"):
        icl.gd_transformer(d=3, eta=1.0, preconditioner=torch.eye(2))


# --- the recurrent (weight-tied) stack and reading GD++ out of a layer ---------------------------

from icl_course import pretrained  # noqa: E402
from icl_course.linear_transformer import (  # noqa: E402
    RecurrentLinearTransformer,
    gdpp_transformer,
    read_gdpp,
    recurrent_transformer,
)


def test_recurrent_stack_ties_one_layer():
    model = recurrent_transformer(d=4, n_loops=3, seed=1)
    assert all(layer is model.layer for layer in model.layers) and len(model.layers) == 3
    assert sum(p.numel() for p in model.parameters()) == 2 * 5 * 5  # one Q and one P
    untied = icl.linear_transformer(d=4, n_layers=3, seed=1)
    untied.load_state_dict({k: model.layer.state_dict()[k.split(".")[-1]] for k in untied.state_dict()})
    Z = torch.randn(2, 6, 5)
    assert torch.equal(model(Z), untied(Z))  # the same layer three times


@pytest.mark.parametrize("n_loops", [1, 2, 5])
def test_recurrent_gdpp_construction_equals_gdpp_and_gives_gamma_back(n_loops):
    eta, gamma = 13.7, 1.78  # near the tuned two-step GD++ at d = n = 10
    b = icl.RegressionTask(d=10, n_ctx=10, inputs=icl.Uniform(-0.5, 0.5)).sample(300, icl.generator(2), dtype=torch.float64)
    layer = gdpp_transformer(10, eta, gamma, dtype=torch.float64).layers[0]
    model = RecurrentLinearTransformer(layer, n_loops)
    want = icl.GDPlusPlus(eta, gamma, n_loops).predict(b.xs, b.ys, b.x_query)
    assert torch.allclose(model.predict(b.xs, b.ys, b.x_query), want, atol=1e-10, rtol=0)
    assert read_gdpp(model.layer) == (eta, gamma)  # exactly: the x-block of Q is I already


def test_read_gdpp_ignores_how_the_scale_is_split_between_q_and_p():
    layer = icl.FullAttention(3, init_std=0.0).double()
    with torch.no_grad():
        layer.Q[0, :3, :3] = 0.4 * torch.eye(3, dtype=torch.float64)
        layer.P[0, :3, :3] = -0.5 * torch.eye(3, dtype=torch.float64)  # w_xx = -0.2: gamma 0.2
        layer.P[0, 3, 3] = -5.0  # w_yx = -2: eta 2
    eta, gamma = read_gdpp(layer)
    assert abs(eta - 2.0) < 1e-12 and abs(gamma - 0.2) < 1e-12


def test_recurrent_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="n_loops"):
        recurrent_transformer(d=3, n_loops=0)
    with pytest.raises(ValueError, match="layer"):
        RecurrentLinearTransformer(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="attention"):
        recurrent_transformer(d=3, attention="softmax")
    with pytest.raises(ValueError, match="one head"):
        read_gdpp(icl.FullAttention(3, n_heads=2))
    with pytest.raises(ValueError, match="zero"):
        read_gdpp(icl.FullAttention(3, init_std=0.0))


def test_recurrent_model_saves_and_loads_tied(tmp_path):
    model = recurrent_transformer(d=3, n_loops=4, init_std=0.3, seed=5)
    pretrained.save("t/rec", model, {"selection": pretrained.one_run(5)}, folder=tmp_path)
    loaded = pretrained.load("t/rec", folder=tmp_path)
    assert isinstance(loaded, RecurrentLinearTransformer) and loaded.args == model.args
    assert all(layer is loaded.layer for layer in loaded.layers)
    Z = torch.randn(2, 5, 4)
    assert torch.equal(loaded(Z), model(Z))
