"""Objectives beyond the paper (v-prediction, flow matching, logit-normal time) and the flow solvers, checked
against SiT's definitions (re-implemented below from willisma/SiT, file and line cited), diffusers' v target and
time density, and closed forms on Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uvit_cli import config, solvers
from uvit_cli.config import load_preset, preset_from_dict
from uvit_cli.errors import ConfigError
from uvit_cli.schedule import FlowSchedule, logit_normal_t, make_schedule, shift_time
from uvit_cli.solvers import (
    conditional_eps_fn,
    eps_from_v_fn,
    guided_eps_fn,
    model_fn_for,
    sample,
    sample_flow_euler,
    sample_flow_euler_maruyama,
    sample_flow_heun,
)
from uvit_cli.train.objective import Objective, eps_mse, prediction_mse

# ---------------------------------------------------------------------------------------------------
# SiT's definitions, re-implemented from its published code (willisma/SiT, transport/). SiT's time s runs
# from noise (s = 0) to data (s = 1); ours is t = 1 - s. Its model predicts u = x1 - x0 (data minus noise).


def sit_plan(s, x0, x1):
    """path.py ICPlan (L18-29, L114-135): alpha_s = s, d alpha = 1, sigma_s = 1 - s, d sigma = -1;
    xt = alpha x1 + sigma x0 (compute_mu_t, L114-119), ut = d_alpha x1 + d_sigma x0 (compute_ut, L126-131)."""
    s = s.view(-1, *([1] * (x1.dim() - 1)))
    return s * x1 + (1 - s) * x0, 1 * x1 + (-1) * x0


def sit_velocity_loss(model, s, x0, x1):
    """transport.py Transport.training_losses (L116-140), ModelType.VELOCITY: mean_flat((model(xt, t) - ut)^2)."""
    xt, ut = sit_plan(s, x0, x1)
    return ((model(xt, s) - ut) ** 2).flatten(1).mean(1)


def sit_score_from_velocity(u, x, s):
    """path.py ICPlan.get_score_from_velocity (L70-84): (alpha/d_alpha u - x) / (sigma^2 - alpha/d_alpha d_sigma sigma)."""
    s = s.view(-1, *([1] * (x.dim() - 1)))
    alpha, d_alpha, sigma, d_sigma = s, 1.0, 1 - s, -1.0
    reverse_alpha_ratio = alpha / d_alpha
    var = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * u - x) / var


def sit_diffusion(form, x, s, norm=1.0):
    """path.py ICPlan.compute_diffusion (L45-68): 'sigma' = norm sigma_s; 'SBDM' = norm compute_drift(x, s)[1]
    = norm (d_alpha/alpha sigma^2 - sigma d_sigma) (compute_drift, L35-43)."""
    s = s.view(-1, *([1] * (x.dim() - 1)))
    if form == "sigma":
        return norm * (1 - s)
    return norm * ((1 / s) * (1 - s) ** 2 - (1 - s) * -1)


def sit_sde(model, init, num_steps, *, form="sigma", norm=1.0, last_step_size=0.04, t0=0.0, generator=None):
    """transport.py Sampler.sample_sde (L279-331) with last_step 'Mean' (L247-276; None when last_step_size = 0):
    t1 = 1 - last_step_size (check_interval, L73-101); integrators.py sde (L8-75): grid linspace(t0, t1,
    num_steps), dt = t[1] - t[0], for each t in grid[:-1] an Euler–Maruyama step (L29-37): w ~ N(0, I),
    x = x + drift dt + sqrt(2 diffusion) w sqrt(dt), drift = u + diffusion * score (L228-245); then
    x + drift(x, t1) last_step_size."""
    t1 = 1 - last_step_size
    grid = torch.linspace(t0, t1, num_steps)
    dt = grid[1] - grid[0]

    def drift(x, s):
        return model(x, s) + sit_diffusion(form, x, s, norm) * sit_score_from_velocity(model(x, s), x, s)

    x = init
    for ti in grid[:-1]:
        w_cur = torch.randn(x.size(), generator=generator).to(x)
        s = torch.ones(x.size(0)).to(x) * ti
        dw = w_cur * torch.sqrt(dt)
        mean_x = x + drift(x, s) * dt
        x = mean_x + torch.sqrt(2 * sit_diffusion(form, x, s, norm)) * dw
    if last_step_size > 0:
        x = x + drift(x, torch.ones(x.size(0)).to(x) * t1) * last_step_size
    return x


def sit_ode(model, init, num_steps, method):
    """transport.py Sampler.sample_ode (L333-372): velocity_ode (L177-179) through torchdiffeq's odeint on the grid
    linspace(0, 1, num_steps) (integrators.py ode, L77-93); for velocity on the Linear path t0 = 0, t1 = 1
    (check_interval). torchdiffeq's fixed-grid steps (_impl/fixed_grid.py): 'euler' y + dt f(t, y); 'heun2'
    (Butcher tableau [[1]], weights 1/2, 1/2) y + dt/2 (f(t, y) + f(t + dt, y + dt f(t, y)))."""
    grid = torch.linspace(0.0, 1.0, num_steps)
    x = init
    for t_a, t_b in zip(grid[:-1], grid[1:]):
        dt = t_b - t_a
        s = torch.ones(x.size(0)).to(x) * t_a
        k1 = model(x, s)
        if method == "euler":
            x = x + dt * k1
        else:
            k2 = model(x + dt * k1, torch.ones(x.size(0)).to(x) * t_b)
            x = x + dt * 0.5 * (k1 + k2)
    return x


def sit_cfg(out_c, out_u, cfg_scale):
    """models.py SiT.forward_with_cfg: uncond + cfg_scale (cond - uncond) (on all channels here; SiT's own guides
    the first three of four, DiT's reproducibility choice)."""
    return out_u + cfg_scale * (out_c - out_u)


# A fixed network function in our convention: velocity(x, timesteps), timesteps = 1000 t.
W = torch.randn(3, 3, generator=torch.Generator().manual_seed(7)) / 2


def net_velocity(x, timesteps):
    t = (timesteps / 1000.0).view(-1, 1)
    return torch.tanh(x @ W) * torch.cos(3 * t) + 0.4 * x - torch.sin(2 * t) + 0.2


def sit_model(x, s):
    """The same network seen by SiT: its time s = 1 - t, its velocity u = -v."""
    return -net_velocity(x, 1000.0 * (1 - s))


def _x(n=8, seed=0, dtype=torch.float32):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# The time convention, against SiT's path


def test_flow_path_and_target_are_sits_in_reversed_time():
    x0, eps = _x(seed=1), _x(seed=2)  # data, noise
    t = torch.rand(8, generator=torch.Generator().manual_seed(3))
    obj = Objective(kind="discrete", z_shape=(3,), objective="flow")
    a, s, timesteps = obj.coefficients(t)
    xt_sit, ut_sit = sit_plan(1 - t, eps, x0)  # SiT: x0 is its noise, x1 its data
    torch.testing.assert_close(a[:, None] * x0 + s[:, None] * eps, xt_sit, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps - x0, -ut_sit)  # our velocity dx/dt is minus SiT's dx/ds
    torch.testing.assert_close(timesteps, 1000 * t)  # the network sees 1000 t: 1000 is noise, as for eps's n
    fs = FlowSchedule()
    assert fs.T == 1.0 and fs.eps == 0.0 and fs.time_scale == 1000.0
    torch.testing.assert_close(fs.marginal_alpha(t), 1 - t)
    torch.testing.assert_close(fs.marginal_std(t), t)
    # noise at t = 1, data at t = 0
    a1, s1, _ = obj.coefficients(torch.ones(1))
    a0, s0, _ = obj.coefficients(torch.zeros(1))
    assert (a1.item(), s1.item(), a0.item(), s0.item()) == (0.0, 1.0, 1.0, 0.0)


def test_flow_training_loss_equals_sits_on_fixed_draws():
    def net(x, timesteps):  # what our network returns: the velocity in our time
        return net_velocity(x, timesteps)

    obj = Objective(kind="discrete", z_shape=(3,), objective="flow")
    d = obj.draw(torch.Generator().manual_seed(0), 64)
    x0 = _x(64, seed=5)
    a, s, timesteps = obj.coefficients(d.timesteps)
    ours = prediction_mse(net, x0, d.eps, a, s, timesteps, "flow")
    theirs = sit_velocity_loss(sit_model, 1 - d.timesteps, d.eps, x0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_v_target_equals_diffusers_get_velocity_on_the_sd_schedule():
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
    )
    obj = Objective(kind="discrete", z_shape=(3, 4, 4), objective="v")
    n = torch.tensor([1, 2, 10, 250, 500, 999, 1000])  # ours: n in 1..N, alpha_bar_0 = 1
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(7, 3, 4, 4, generator=g), torch.randn(7, 3, 4, 4, generator=g)
    a, s, timesteps = obj.coefficients(n)
    target = ddpm.get_velocity(x0, eps, n - 1)  # diffusers indexes alphas_cumprod from its first step

    def net(x, ts):
        return torch.zeros_like(x)  # the loss is then the mean square of the target itself

    loss = prediction_mse(net, x0, eps, a, s, timesteps, "v")
    torch.testing.assert_close(loss, target.pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        a[:, None, None, None] * eps - s[:, None, None, None] * x0, target, rtol=1e-5, atol=1e-6
    )
    assert torch.equal(timesteps, n)  # the network sees the integer n, as for eps


def test_eps_loss_is_unchanged_by_the_generalisation():
    obj = Objective(kind="continuous", z_shape=(3,))
    d = obj.draw(torch.Generator().manual_seed(0), 16)
    x0 = _x(16)
    a, s, ts = obj.coefficients(d.timesteps)
    direct = (d.eps - net_velocity(a[:, None] * x0 + s[:, None] * d.eps, ts)).pow(2).mean(1)
    assert torch.equal(eps_mse(net_velocity, x0, d.eps, a, s, ts), direct)
    assert torch.equal(prediction_mse(net_velocity, x0, d.eps, a, s, ts, "eps"), direct)


# ---------------------------------------------------------------------------------------------------
# Time densities and loss weights


def test_logit_normal_and_shift_equal_diffusers_and_sd3():
    training_utils = pytest.importorskip("diffusers.training_utils")
    diffusers = pytest.importorskip("diffusers")
    ours = logit_normal_t(256, 0.3, 1.2, torch.Generator().manual_seed(0))
    theirs = training_utils.compute_density_for_timestep_sampling(
        "logit_normal", 256, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1.0, 1e-3, 1000)
    torch.testing.assert_close(shift_time(u, 3.0), sched.sigmas[:1000], rtol=0, atol=1e-6)
    assert shift_time(u, 1.0) is u
    # SD3 eq. 23: t_m = sqrt(m/n) t_n / (1 + (sqrt(m/n) - 1) t_n), shift = sqrt(m/n) > 1 moves t to noise
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_logit_normal_draws_for_every_schedule(kind):
    obj = Objective(kind=kind, z_shape=(2,), t_sampling="logit_normal", t_mean=-0.5, t_std=0.8)
    t = obj.draw(torch.Generator().manual_seed(0), 4096).timesteps
    if kind == "discrete":
        assert t.dtype == torch.int64 and 1 <= t.min() and t.max() <= 1000
        t = t.float() / 1000
    logit = torch.logit(t.clamp(1e-6, 1 - 1e-6))
    assert logit.mean().item() == pytest.approx(-0.5, abs=0.05) and logit.std().item() == pytest.approx(
        0.8, abs=0.05
    )
    flow = Objective(kind=kind, z_shape=(2,), objective="flow", time_shift=3.0)
    t = flow.draw(torch.Generator().manual_seed(0), 4096).timesteps
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))  # the same draw, unshifted
    torch.testing.assert_close(t, shift_time(u, 3.0))


def test_min_snr_weights_per_objective_follow_hang_et_al():
    """diffusers examples/text_to_image/train_text_to_image.py (compute_snr, then min(snr, gamma) / snr for
    epsilon and / (snr + 1) for v_prediction): the same eps-space weighting for both parameterizations."""
    t = torch.tensor([0.02, 0.2, 0.5, 0.9])
    eps_obj = Objective(kind="continuous", z_shape=(1,), min_snr_gamma=5.0)
    v_obj = Objective(kind="continuous", z_shape=(1,), min_snr_gamma=5.0, objective="v")
    a, s, _ = eps_obj.coefficients(t)
    snr = a.square() / s.square()
    clipped = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(eps_obj.loss_weight(a, s), clipped / snr)
    torch.testing.assert_close(v_obj.loss_weight(a, s), clipped / (snr + 1))
    # the v error is the eps error / alpha: the two weightings are one weighting of the eps error
    torch.testing.assert_close(v_obj.loss_weight(a, s) / a.square(), eps_obj.loss_weight(a, s))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        Objective(kind="continuous", z_shape=(1,), min_snr_gamma=5.0, objective="flow")
    with pytest.raises(ValueError, match="time_shift"):
        Objective(kind="continuous", z_shape=(1,), time_shift=2.0)


# ---------------------------------------------------------------------------------------------------
# The flow solvers against SiT's samplers, on a fixed network function


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_flow_euler_equals_sits_ode_euler(steps):
    x = _x()
    ours = sample_flow_euler(net_velocity, x, steps)
    theirs = sit_ode(sit_model, x, steps + 1, "euler")  # SiT's num_steps counts grid points
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps", [2, 8, 50])
def test_flow_heun_equals_sits_ode_heun2(steps):
    x = _x()
    ours = sample_flow_heun(net_velocity, x, steps)  # steps = network evaluations, 2 per Heun step
    theirs = sit_ode(sit_model, x, steps // 2 + 1, "heun2")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_flow_heun_odd_budget_ends_with_one_euler_step():
    x = _x()
    calls = []

    def counted(x, ts):
        calls.append(ts[0].item())
        return net_velocity(x, ts)

    out = sample_flow_heun(counted, x, 5)  # intervals 1 -> 2/3 -> 1/3 -> 0: Heun, Heun, Euler
    assert calls == pytest.approx([1000.0, 2000 / 3, 2000 / 3, 1000 / 3, 1000 / 3], abs=1e-3)
    g = torch.linspace(1, 0, 4)
    y = x
    for i in range(2):
        h = g[i + 1] - g[i]
        k1 = net_velocity(y, torch.full((8,), 1000 * g[i].item()))
        k2 = net_velocity(y + h * k1, torch.full((8,), 1000 * g[i + 1].item()))
        y = y + 0.5 * h * (k1 + k2)
    y = y + (g[3] - g[2]) * net_velocity(y, torch.full((8,), 1000 * g[2].item()))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "form, last_step_size, steps",
    [("sigma", 0.04, 250), ("sigma", 0.04, 10), ("sigma", 0.0, 20), ("SBDM", 0.04, 50), ("SBDM", 0.0, 20)],
)
def test_flow_euler_maruyama_equals_sits_sde(form, last_step_size, steps):
    x = _x()
    ours = sample_flow_euler_maruyama(
        net_velocity,
        x,
        steps,
        generator=torch.Generator().manual_seed(1),
        diffusion_form=form,
        last_step_size=last_step_size,
    )
    # SiT's num_steps = its network evaluations with last step 'Mean', one more than them without a last step.
    # SBDM divides by its time s at s = 0: SiT starts it at t0 = sample_eps (we start at 1 - 1e-3).
    num_steps = steps if last_step_size > 0 else steps + 1
    theirs = sit_sde(
        sit_model,
        x,
        num_steps,
        form=form,
        last_step_size=last_step_size,
        t0=1e-3 if form == "SBDM" else 0.0,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_guided_velocity_is_sits_cfg_with_w_equal_one_plus_s():
    def net(x, timesteps, y=None):
        return net_velocity(x, timesteps) + 0.3 * y.float().view(-1, 1)

    x, ts = _x(), torch.full((8,), 700.0)
    y, null = torch.arange(8), torch.tensor(9)
    for s in (0.5, 3.0):
        guided = guided_eps_fn(net, s, {"y": y}, {"y": null})(x, ts)
        torch.testing.assert_close(guided, sit_cfg(net(x, ts, y), net(x, ts, null.expand(8)), 1.0 + s))
    # guidance interval in solver time t (1 = noise) on the flow path
    fn = guided_eps_fn(net, 2.0, {"y": y}, {"y": null}, interval=(0.0, 0.5), schedule=FlowSchedule())
    cond = conditional_eps_fn(net, {"y": y})
    torch.testing.assert_close(fn(x, ts), cond(x, ts))  # t = 0.7: outside, conditional only
    assert not torch.allclose(fn(x, torch.full((8,), 300.0)), cond(x, torch.full((8,), 300.0)))


# ---------------------------------------------------------------------------------------------------
# Gaussian data: the exact flow, the data distribution from the SDE, orders of convergence

MU = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
SD = torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64)


def gaussian_velocity(x, timesteps):
    """Exact v = E[eps | x_t] - E[x0 | x_t] for data ~ N(mu, sd^2) on x_t = (1 - t) x0 + t eps."""
    t = (timesteps / 1000.0).view(-1, 1).to(x)
    mu, var = MU.to(x), (SD**2).to(x)
    total = (1 - t) ** 2 * var + t**2
    r = x - (1 - t) * mu
    return t / total * r - (mu + (1 - t) * var / total * r)


def slope(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def test_flow_odes_converge_to_the_exact_map_at_their_orders():
    x = _x(64, dtype=torch.float64)
    exact = MU + SD * x  # the flow map of a Gaussian: noise z to mu + sd z
    for solver, steps, order in (
        (sample_flow_euler, [16, 32, 64, 128], 1.0),
        (sample_flow_heun, [16, 32, 64, 128], 2.0),
    ):
        errors = [(solver(gaussian_velocity, x, n) - exact).abs().max().item() for n in steps]
        assert slope(errors, steps) == pytest.approx(order, abs=0.25), errors
    shifted = sample_flow_heun(gaussian_velocity, x, 128, schedule=FlowSchedule(shift=3.0))
    assert (shifted - exact).abs().max() < 5e-3  # a shifted grid reaches the same map (coarser near the data)


def test_flow_sde_samples_the_data_distribution():
    x = _x(4000, seed=3, dtype=torch.float64)
    for form in ("sigma", "SBDM"):
        out = sample_flow_euler_maruyama(
            gaussian_velocity, x, 250, generator=torch.Generator().manual_seed(0), diffusion_form=form
        )
        assert torch.allclose(out.mean(0), MU, atol=0.05), (form, out.mean(0))
        assert torch.allclose(out.std(0), SD, rtol=0.06, atol=0.01), (form, out.std(0))


# ---------------------------------------------------------------------------------------------------
# The v model through the eps solvers


def gaussian_eps_fn(ns):
    def eps_fn(x, timesteps):
        t = timesteps / ns.time_scale
        a, s = ns.marginal_alpha(t).view(-1, 1), ns.marginal_std(t).view(-1, 1)
        mu, var = MU.to(x), (SD**2).to(x)
        return s * (x - a * mu) / (a * a * var + s * s)

    return eps_fn


def v_of(eps_fn, ns):
    """The v a perfect v-model returns: v = alpha eps - sigma x0 with x0 = (x - sigma eps) / alpha."""

    def v_fn(x, timesteps):
        t = timesteps / ns.time_scale
        a, s = ns.marginal_alpha(t).view(-1, 1), ns.marginal_std(t).view(-1, 1)
        eps = eps_fn(x, timesteps)
        return a * eps - s * (x - s * eps) / a

    return v_fn


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_v_models_sample_through_every_eps_solver(kind):
    ns = make_schedule(kind)
    eps_fn = gaussian_eps_fn(ns)
    v_fn = v_of(eps_fn, ns)
    x = _x(16, dtype=torch.float64)
    ts = torch.full((16,), 0.4 * ns.time_scale, dtype=torch.float64)
    torch.testing.assert_close(eps_from_v_fn(v_fn, ns)(x, ts), eps_fn(x, ts))
    for name in ("dpm_solver_pp", "dpm_solver_pp_2m", "ddim", "dpm_solver", "euler_ode"):
        from_v = sample(name, model_fn_for("v", v_fn, ns), x, 10, schedule=ns)
        torch.testing.assert_close(from_v, sample(name, eps_fn, x, 10, schedule=ns), rtol=1e-6, atol=1e-6)


def test_model_fn_for_each_objective():
    ns = make_schedule("discrete")
    assert model_fn_for("eps", net_velocity, ns) is net_velocity
    assert model_fn_for("flow", net_velocity, FlowSchedule()) is net_velocity
    assert model_fn_for("v", net_velocity, ns) is not net_velocity
    with pytest.raises(ValueError, match="objective"):
        model_fn_for("x0", net_velocity, ns)
    assert isinstance(make_schedule("continuous", objective="flow", time_shift=2.0), FlowSchedule)
    assert make_schedule("discrete", objective="flow").shift == 1.0
    assert not isinstance(make_schedule("discrete", objective="v"), FlowSchedule)


# ---------------------------------------------------------------------------------------------------
# Presets and the solver that applies to each objective


def test_config_knows_the_flow_solvers_without_torch():
    assert set(config.FLOW_SOLVER_NAMES) == set(solvers.FLOW_SOLVERS)
    assert set(config.SOLVER_NAMES) == set(solvers.SOLVERS)


@pytest.mark.parametrize(
    "objective, solver, ok",
    [
        ("eps", "dpm_solver_pp", True),
        ("v", "ddim", True),
        ("v", "euler_maruyama", True),
        ("flow", "flow_heun", True),
        ("flow", "dpm_solver_pp", False),
        ("eps", "flow_euler", False),
        ("v", "flow_euler_maruyama", False),
    ],
)
def test_a_solver_that_does_not_apply_is_one_line(objective, solver, ok):
    if ok:
        config.check_solver(solver, objective)
        return
    with pytest.raises(ConfigError) as e:
        config.check_solver(solver, objective)
    assert "\n" not in str(e.value) and solver in str(e.value) and objective in str(e.value)
    overrides = [f"train.objective={objective}", f"sample.solver={solver}"]
    with pytest.raises(ConfigError, match="sample.solver"):
        load_preset("coco_uvit_s2_deep", overrides)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.time_shift=3.0"], "time_shift"),
        (["train.t_mean=0.5"], "logit_normal"),
        (["train.t_std=0"], "greater than 0"),
        (["train.objective=x0"], "objective"),
        (["train.t_sampling=beta"], "t_sampling"),
    ],
)
def test_bad_objective_settings_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        load_preset("coco_uvit_s2_deep", overrides)
    assert "\n" not in str(e.value)


def test_objective_settings_round_trip_and_default_to_the_paper():
    p = load_preset("coco_uvit_s2_deep")
    t = p.train
    assert (t.objective, t.t_sampling, t.t_mean, t.t_std, t.time_shift) == (
        "eps",
        "uniform",
        None,
        None,
        None,
    )
    flow = load_preset(
        "coco_uvit_s2_deep_flow", ["train.t_sampling=logit_normal", "train.t_std=1.5", "train.time_shift=2.0"]
    )
    again = config.preset_from_toml(flow.to_toml())
    assert again == flow and again.train.time_shift == 2.0 and again.train.t_mean is None
    obj = Objective.for_preset(flow)
    assert (obj.objective, obj.t_sampling, obj.t_mean, obj.t_std, obj.time_shift) == (
        "flow",
        "logit_normal",
        0.0,
        1.5,
        2.0,
    )
    assert isinstance(obj.schedule, FlowSchedule) and obj.schedule.shift == 2.0


def test_flow_training_steps_run_and_learn():
    """A few optimiser steps of a tiny U-ViT with the flow objective through the one training step."""
    from uvit_cli.model import UViT
    from uvit_cli.train.objective import step_seed
    from uvit_cli.train.step import setup_step, train_step

    data = load_preset("shapes_uvit_tiny").model_dump(mode="json")
    data["train"].pop("min_snr_gamma", None)
    data["train"].update(objective="flow", t_sampling="logit_normal", lr=3e-3, warmup_steps=0, compile=False)
    data["sample"]["solver"] = "flow_heun"
    data["model"]["clip_dim"] = None
    data["model"]["num_classes"] = -1
    data.pop("text_encoder", None)
    preset = preset_from_dict(data)
    torch.manual_seed(0)
    model = UViT(**preset.model)
    state, _ = setup_step(preset, model, torch.device("cpu"))
    assert state.loss_fn.objective == "flow"
    x = torch.rand(8, *state.objective.z_shape) * 2 - 1
    losses = []
    for step in range(12):
        d = state.objective.draw(torch.Generator().manual_seed(step_seed(0, 1 + step % 2)), 8)
        state.loss_sum.zero_()
        train_step(state, [({"x": x}, d)], 1, 8)
        losses.append(state.loss_sum.item() / 8)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
