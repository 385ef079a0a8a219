"""Schedules against the numbers of the official U-ViT spec (§3.1, §3.2, §4.1, §4.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uvit_cli.schedule import (
    ContinuousVPSchedule,
    DiscreteSchedule,
    DiscreteVPSchedule,
    FlowSchedule,
    NoiseSchedule,
    make_schedule,
    shift_time,
    stable_diffusion_betas,
    time_grid,
    time_logsnr,
    time_quadratic,
    time_uniform,
)


def test_stable_diffusion_betas():
    betas = stable_diffusion_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert torch.all(betas[1:] > betas[:-1])
    # sqrt(beta) is linear
    np.testing.assert_allclose(np.diff(np.sqrt(betas.numpy()), 2), 0.0, atol=1e-15)


def test_discrete_training_schedule_spec_values():
    sched = DiscreteSchedule(stable_diffusion_betas())
    ab = sched.alphas_cumprod
    assert ab.shape == (1001,) and ab.dtype == torch.float64
    assert ab[0].item() == 1.0
    assert ab[1].item() == pytest.approx(0.99915, abs=1e-12)
    assert ab[500].item() == pytest.approx(0.27767, abs=5e-6)
    assert ab[1000].item() == pytest.approx(0.0046601, abs=5e-8)
    assert math.sqrt(ab[1000].item()) == pytest.approx(0.068265, abs=5e-7)
    n = torch.tensor([0, 1, 500, 1000])
    a, s = sched.coefficients(n, dtype=torch.float32)
    assert a.dtype == s.dtype == torch.float32
    torch.testing.assert_close(
        a.double() ** 2 + s.double() ** 2, torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert a[3].item() == pytest.approx(0.068265, abs=1e-6)


def test_sample_timesteps_range_and_seed():
    sched = DiscreteSchedule(stable_diffusion_betas())
    n = sched.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert n.dtype == torch.int64 and n.min().item() == 1 and n.max().item() == 1000
    assert abs(n.double().mean().item() - 500.5) < 10
    n2 = sched.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert torch.equal(n, n2)


def test_discrete_vp_spec_values():
    ns = make_schedule("discrete")
    assert isinstance(ns, DiscreteVPSchedule)
    assert ns.T == 1.0 and ns.eps == pytest.approx(1e-3) and ns.time_scale == 1000.0
    t = torch.tensor([1.0, 0.001])
    lam = ns.marginal_lambda(t)
    assert lam.dtype == torch.float32
    assert lam[0].item() == pytest.approx(-2.68202, abs=1e-5)
    assert lam[1].item() == pytest.approx(3.53470, abs=1e-5)
    assert ns.marginal_std(torch.tensor([1.0])).item() == pytest.approx(0.997667, abs=1e-6)


def test_discrete_vp_knots_match_training_schedule():
    # log alpha at t = n/N is 0.5 log alpha_bar_n (float32 knots)
    ns = DiscreteVPSchedule(stable_diffusion_betas())
    ab = DiscreteSchedule(stable_diffusion_betas()).alphas_cumprod
    n = torch.tensor([1, 2, 10, 500, 999, 1000])
    t = n.double() / 1000
    alpha = ns.marginal_alpha(t)
    torch.testing.assert_close(alpha, ab[n].sqrt(), atol=2e-6, rtol=0)


def test_discrete_vp_piecewise_linear_and_extrapolation():
    ns = DiscreteVPSchedule(stable_diffusion_betas())
    la = ns.log_alpha_array.double()
    # midpoint of a segment is the mean of the knots
    tk = ns.t_array.double()
    t_mid = torch.stack([(tk[9] + tk[10]) / 2, (tk[499] + tk[500]) / 2])
    got = ns.marginal_log_mean_coeff(t_mid)
    want = torch.stack([(la[9] + la[10]) / 2, (la[499] + la[500]) / 2])
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    # linear extrapolation beyond t = 1 continues the last segment
    got = ns.marginal_log_mean_coeff((2 * tk[-1] - tk[-2]).reshape(1))
    torch.testing.assert_close(got, (2 * la[-1] - la[-2]).reshape(1), atol=1e-9, rtol=0)
    got = ns.marginal_log_mean_coeff((2 * tk[0] - tk[1]).reshape(1))  # below the first knot
    torch.testing.assert_close(got, (2 * la[0] - la[1]).reshape(1), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_inverse_lambda_round_trip(kind):
    ns = make_schedule(kind)
    t = torch.linspace(ns.eps, 1.0, 301, dtype=torch.float64)
    back = ns.inverse_lambda(ns.marginal_lambda(t))
    torch.testing.assert_close(back, t, atol=1e-9, rtol=1e-7)
    # float32 like the official: round trip to float32 precision on the working range
    t32 = torch.linspace(0.002, 1.0, 301)
    torch.testing.assert_close(ns.inverse_lambda(ns.marginal_lambda(t32)), t32, atol=2e-6, rtol=2e-5)


def test_lambda_monotone_and_vp():
    for ns in (make_schedule("discrete"), make_schedule("continuous")):
        t = torch.linspace(ns.eps, 1.0, 500, dtype=torch.float64)
        lam = ns.marginal_lambda(t)
        assert torch.all(lam[1:] < lam[:-1])
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
        torch.testing.assert_close(lam, torch.log(a / s))


def test_continuous_vp_sde():
    ns = ContinuousVPSchedule()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    alpha_bar = torch.exp(-(0.1 * t + 19.9 * t**2 / 2))
    torch.testing.assert_close(ns.marginal_alpha(t) ** 2, alpha_bar)
    torch.testing.assert_close(ns.beta(t), 0.1 + 19.9 * t)
    torch.testing.assert_close(ns.timestep_input(t), t * 999)
    assert ns.eps == 1e-4 and ns.T == 1.0
    u = ns.sample_t(10000, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_beta_is_minus_two_dlogalpha_dt():
    for ns in (make_schedule("discrete"), make_schedule("continuous")):
        t = torch.tensor([0.0123, 0.3337, 0.7771], dtype=torch.float64)
        dt = 1e-7
        fd = -2 * (ns.marginal_log_mean_coeff(t + dt) - ns.marginal_log_mean_coeff(t - dt)) / (2 * dt)
        torch.testing.assert_close(ns.beta(t), fd, rtol=1e-5, atol=1e-6)


def test_timestep_input_discrete_is_t_times_n():
    ns = make_schedule("discrete")
    t = torch.tensor([1.0, 0.001, 0.5])
    torch.testing.assert_close(ns.timestep_input(t), torch.tensor([1000.0, 1.0, 500.0]))


def test_time_grids():
    g = time_uniform(1.0, 1e-3, 10)
    assert g.shape == (11,) and g.dtype == torch.float32
    assert g[0].item() == 1.0 and g[-1].item() == pytest.approx(1e-3)
    q = time_quadratic(1.0, 1e-3, 10)
    np.testing.assert_allclose(
        np.diff(np.sqrt(q.numpy().astype(np.float64))), -(1 - math.sqrt(1e-3)) / 10, rtol=1e-4
    )
    ns = make_schedule("continuous")
    lg = time_logsnr(ns, 1.0, 1e-4, 6)
    lam = ns.marginal_lambda(lg.double())
    np.testing.assert_allclose(np.diff(lam.numpy()), (lam[-1] - lam[0]).item() / 6, rtol=1e-3)
    assert torch.equal(time_grid("time_uniform", ns, 1.0, 1e-3, 10), g)
    with pytest.raises(ValueError):
        time_grid("nope", ns, 1.0, 1e-3, 10)


# Produced by the official implementation (baofff/U-ViT, ce55170 era; see tests/test_solvers.py; CPU fp32): dpm_solver_pp.NoiseScheduleVP(
# 'discrete', betas=torch.tensor(stable_diffusion_beta_schedule()).float()) as the eval scripts build it, and
# dpm_solver_pytorch.NoiseScheduleVP('linear'). The t list includes both linear extrapolations (t < 1/N, t > 1).
OFFICIAL_T = [0.0005, 0.001, 0.0123, 0.25, 0.5005, 0.7777, 1.0, 1.0005]
OFFICIAL_DISCRETE_LAMBDA = [
    3.884122848510742,
    3.5346992015838623,
    2.261870861053467,
    0.3664288818836212,
    -0.4796956777572632,
    -1.5267235040664673,
    -2.6820242404937744,
    -2.685056209564209,
]
OFFICIAL_DISCRETE_ALPHA = [
    0.9997885823249817,
    0.9995748996734619,
    0.9946195483207703,
    0.8218467235565186,
    0.5263079404830933,
    0.212294340133667,
    0.06826488673686981,
    0.06805917620658875,
]
OFFICIAL_LAMBDAS = [-2.5, -1.0, 0.0, 1.5, 3.5]
OFFICIAL_DISCRETE_INVERSE = [
    0.9693475365638733,
    0.6483263373374939,
    0.3548901081085205,
    0.05004877597093582,
    0.0010714393574744463,
]
OFFICIAL_LINEAR_LAMBDA = [
    4.927211284637451,
    4.557593822479248,
    2.9500625133514404,
    0.04739493131637573,
    -1.2302968502044678,
    -3.0467236042022705,
    -5.0249786376953125,
    -5.029979228973389,
]
OFFICIAL_LINEAR_INVERSE = [
    0.7043496966362,
    0.45734575390815735,
    0.2589602768421173,
    0.06503486633300781,
    0.005784895271062851,
]


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_schedules_match_the_official_code(kind):
    ns = make_schedule(kind)
    t, lam = torch.tensor(OFFICIAL_T), torch.tensor(OFFICIAL_LAMBDAS)
    if kind == "discrete":
        want_lam, want_inv = OFFICIAL_DISCRETE_LAMBDA, OFFICIAL_DISCRETE_INVERSE
        torch.testing.assert_close(
            ns.marginal_alpha(t), torch.tensor(OFFICIAL_DISCRETE_ALPHA), rtol=1e-6, atol=0
        )
    else:
        want_lam, want_inv = OFFICIAL_LINEAR_LAMBDA, OFFICIAL_LINEAR_INVERSE
    torch.testing.assert_close(ns.marginal_lambda(t), torch.tensor(want_lam), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ns.inverse_lambda(lam), torch.tensor(want_inv), rtol=1e-6, atol=1e-9)


def test_flow_schedule_is_the_linear_path():
    fs: NoiseSchedule = FlowSchedule()  # the solvers' one interface
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(
        fs.marginal_alpha(t) + fs.marginal_std(t), torch.ones_like(t)
    )  # alpha + sigma = 1
    torch.testing.assert_close(fs.marginal_alpha(t), torch.exp(fs.marginal_log_mean_coeff(t)))
    torch.testing.assert_close(fs.inverse_lambda(fs.marginal_lambda(t)), t)
    assert torch.all(fs.marginal_lambda(t)[1:] < fs.marginal_lambda(t)[:-1])
    # g^2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2, by finite differences
    h = 1e-6
    dsig2 = ((t + h) ** 2 - (t - h) ** 2) / (2 * h)
    dlog = (fs.marginal_log_mean_coeff(t + h) - fs.marginal_log_mean_coeff(t - h)) / (2 * h)
    torch.testing.assert_close(fs.beta(t), dsig2 - 2 * dlog * t**2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fs.timestep_input(t), 1000 * t)
    grid = FlowSchedule(shift=3.0).grid(1.0, 0.0, 5, "cpu", torch.float32)
    torch.testing.assert_close(
        grid, shift_time(torch.linspace(1.0, 0.0, 5, dtype=torch.float64), 3.0).float()
    )
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)


def test_make_schedule_by_objective():
    assert isinstance(make_schedule("discrete", objective="v"), DiscreteVPSchedule)
    assert isinstance(make_schedule("continuous", objective="eps"), ContinuousVPSchedule)
    flow = make_schedule("discrete", objective="flow", time_shift=2.5)
    assert isinstance(flow, FlowSchedule) and flow.shift == 2.5
    with pytest.raises(ValueError, match="objective"):
        make_schedule("discrete", objective="score")
