"""GD++ layer counts against the condition number (Vladymyrov et al. 2024, Theorem 5.1), float64."""

import math

import pytest
import torch

from icl_course.solvers import GDPlusPlus
from icl_course.topics.mixed_noise import theory as th


def ill_conditioned_problem(seed: int = 0, B: int = 3, n: int = 30, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, d, dtype=torch.float64)  # column scales: S has kappa ~ 1e3
    xs = torch.randn(B, n, d, generator=gen, dtype=torch.float64) * scales
    w = torch.randn(B, d, generator=gen, dtype=torch.float64)
    return xs, torch.einsum("bnd,bd->bn", xs, w), w


def test_gdpp_layers_with_one_pair_are_the_packages_gdpp():
    xs, ys, _ = ill_conditioned_problem()
    got = th.gdpp_weights(xs, ys, [0.01] * 3, [0.002] * 3)
    assert torch.allclose(got, GDPlusPlus(0.01, 0.002, n_steps=3).weights(xs, ys), atol=1e-12)


def test_the_eigenvalue_recursion_is_the_layers_on_matrices():
    """w_L = w* - V e_L(Lambda) V^T w* for noiseless data, with the greedy per-layer schedule."""
    xs, ys, w = ill_conditioned_problem()
    for b in range(xs.shape[0]):
        lam, V = torch.linalg.eigh(xs[b].T @ xs[b] / xs.shape[1])
        etas, gammas = th.greedy_schedule(lam, 6)
        expected = w[b] - V @ (th.relative_errors(lam, etas, gammas) * (V.T @ w[b]))
        assert torch.allclose(th.gdpp_weights(xs[b:b + 1], ys[b:b + 1], etas, gammas)[0], expected, atol=1e-9)


def test_best_gamma_improves_the_condition_number():
    s = th.geometric_spectrum(1e4)
    gamma = th.best_gamma(s)
    t = s * (1 - gamma * s) ** 2
    assert (t.max() / t.min()).item() < 0.5 * 1e4 and 0 < gamma < 1 / s.max().item()


KAPPAS = [10.0 ** k for k in range(1, 7)]
EPSILONS = [10.0 ** -k for k in (2, 3, 6, 12)]


def test_layers_grow_like_log_kappa_where_gd_grows_like_kappa():
    counts = [th.layers_needed(th.geometric_spectrum(k), 1e-6) for k in KAPPAS]
    steps = [b - a for a, b in zip(counts, counts[1:])]
    assert all(0 <= s <= 2 for s in steps), counts  # about one layer per decade of kappa
    assert counts[-1] <= 12
    gd = [th.gd_layers_needed(k, 1e-6) for k in KAPPAS]
    assert all(g2 / g1 > 9 for g1, g2 in zip(gd, gd[1:]))  # GD: ten times the steps per decade


def test_layers_grow_like_log_log_one_over_eps():
    counts = [th.layers_needed(th.geometric_spectrum(100.0), e) for e in EPSILONS]
    # from eps = 1e-3 to 1e-12, log(1/eps) grows 4x: two doublings of the digits, about two layers
    assert counts == sorted(counts) and counts[-1] - counts[1] <= 3, counts
    assert th.gd_layers_needed(100.0, 1e-12) - th.gd_layers_needed(100.0, 1e-3) > 500


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="eps"):
        th.layers_needed(th.geometric_spectrum(10.0), 1.5)
    with pytest.raises(ValueError, match="kappa"):
        th.gd_layers_needed(1.0, 1e-3)
    with pytest.raises(ValueError, match="etas"):
        th.relative_errors(torch.ones(3), [0.1], [])
    with pytest.raises(ValueError, match="xs"):
        th.gdpp_weights(torch.ones(3, 2), torch.ones(3), [0.1], [0.0])
    assert math.isfinite(th.best_gamma(th.geometric_spectrum(10.0)))


# --- Theorem 5.2: a GD step, then the adaptive rescaling, is ridge for two noise levels -----------


def test_two_level_transformer_is_its_closed_form_in_float64():
    """The two-layer DIAG stack with the construction's weights computes (1 + w_yy rho) a <X^T y, x_q>,
    and so does the discovered algorithm of those coefficients."""
    from icl_course.topics.mixed_noise.discovered_algorithm import DiscoveredAlgorithm

    for sigma in (1.0, 3.0):
        b = th.two_level_task(40, 5)(sigma).sample(50, torch.Generator().manual_seed(3), dtype=torch.float64)
        want = th.two_level_prediction(b.xs, b.ys, b.x_query, 1.0, 3.0)
        got = th.two_level_transformer(5, 1.0, 3.0, 40).predict(b.xs, b.ys, b.x_query)
        algorithm = DiscoveredAlgorithm(th.two_level_coefficients(1.0, 3.0, 40))
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
        assert torch.allclose(algorithm.predict(b.xs, b.ys, b.x_query), want, rtol=1e-12, atol=1e-14)


def test_two_level_coefficients_solve_both_levels():
    """(1 + w_yy sigma_k^2)(-w_yx / n) = 1 / (1 + sigma_k^2) at both levels, and only w_yx (layer 1) and
    w_yy (layer 2) are nonzero, as the theorem states."""
    for s1, s2 in ((1.0, 3.0), (0.5, 2.0), (1.0, 5.0)):
        first, second = th.two_level_coefficients(s1, s2, 20)
        for sigma in (s1, s2):
            assert (1 + second.w_yy * sigma**2) * (-first.w_yx / 20) == pytest.approx(1 / (1 + sigma**2), rel=1e-14)
        assert (first.w_xx, first.w_xy, first.w_yy, second.w_xx, second.w_xy, second.w_yx) == (0,) * 6


def test_two_level_construction_tends_to_ridge_as_n_grows():
    """On the theorem's data (x ~ N(0, I/n)) the relative gap to ridge with lam = sigma^2 falls about as
    n^(-1/2) at both levels (measured: 0.17 -> 0.018 at sigma 1, 0.56 -> 0.053 at sigma 3, n 100 -> 10^4),
    while ridge tuned to the other level stays off by 0.8 and 4.0."""
    gaps = th.two_level_gaps(1.0, 3.0, ns=(100, 10_000), n_seq=100, seed=5)
    for level in ("1", "3"):
        small, large = gaps["construction"][level]
        assert large < 0.12 and small / large > 4, (level, small, large)
        assert min(gaps["other_level_ridge"][level]) > 0.5


def test_two_level_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="sigma2"):
        th.two_level_coefficients(1.0, -3.0, 20)
    with pytest.raises(ValueError, match="n must"):
        th.two_level_coefficients(1.0, 3.0, 0)
