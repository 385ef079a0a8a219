"""Solvers of the linear path x_t = (1 - t) x0 + t eps (`schedule.FlowSchedule`): Euler and Heun on the ODE
dx/dt = v(x, t), and Euler–Maruyama on SiT's SDE, from t = 1 (noise) to t = 0 (data).

`velocity_fn(x, timesteps) -> v` is the (guided) velocity prediction, v = eps - x0 in our time; timesteps =
schedule.timestep_input(t) = 1000 t. SiT (Ma et al. 2024, willisma/SiT transport/) integrates the same path in
its time s = 1 - t with velocity u = -v; the definitions are re-derived in tests/test_objectives.py.
"""

from __future__ import annotations

from typing import Literal

import torch

from uvit_cli.schedule import FlowSchedule, NoiseSchedule
from uvit_cli.solvers.base import Callback, EpsFn, Generators, _bcast, _randn_like, _work_dtype

VelocityFn = EpsFn  # same call shape: (x, timesteps) -> a tensor like x
DiffusionForm = Literal["sigma", "SBDM"]


def _flow_schedule(schedule: NoiseSchedule | None, steps: int) -> FlowSchedule:
    """The schedule given (a FlowSchedule), else the unshifted one; `steps` checked to be a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TypeError(f"steps must be a positive int, got {steps!r}")
    if schedule is None:
        return FlowSchedule()
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(
            f"the flow solvers integrate the linear path of a flow model: pass schedule=FlowSchedule(...), "
            f"not {type(schedule).__name__}"
        )
    return schedule


def _velocity(fn: VelocityFn, schedule: FlowSchedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return fn(x, schedule.timestep_input(t))


@torch.no_grad()
def sample_flow_euler(
    velocity_fn: VelocityFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler on the flow ODE dx/dt = v (Lipman et al. 2023; SiT's ODE with method 'euler'): `steps` steps on
    a grid uniform in t (before the schedule's shift) from 1 to 0; `steps` network evaluations."""
    schedule = _flow_schedule(schedule, steps)
    dtype = _work_dtype(x_T)
    grid = schedule.grid(schedule.T, schedule.eps, steps + 1, x_T.device, dtype)  # (steps+1,)
    ones = torch.ones(x_T.shape[0], dtype=dtype, device=x_T.device)  # (B,)
    x = x_T
    for i in range(steps):
        v = _velocity(velocity_fn, schedule, x, ones * grid[i])
        x = x + (grid[i + 1] - grid[i]) * v
        if callback is not None:
            callback(i + 1, x)
    return x


@torch.no_grad()
def sample_flow_heun(
    velocity_fn: VelocityFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun (explicit trapezoid, SiT's ODE with torchdiffeq's 'heun2') on the flow ODE; `steps` network evaluations.

    The grid has ceil(steps / 2) intervals; each is one Heun step (2 evaluations) except the last when
    `steps` is odd, which is an Euler step, so that every solver spends `steps` evaluations."""
    schedule = _flow_schedule(schedule, steps)
    dtype = _work_dtype(x_T)
    intervals = (steps + 1) // 2
    grid = schedule.grid(schedule.T, schedule.eps, intervals + 1, x_T.device, dtype)  # (intervals+1,)
    ones = torch.ones(x_T.shape[0], dtype=dtype, device=x_T.device)
    x, nfe = x_T, 0
    for i in range(intervals):
        h = grid[i + 1] - grid[i]  # negative
        d1 = _velocity(velocity_fn, schedule, x, ones * grid[i])
        if nfe + 2 > steps:  # the odd evaluation left: an Euler step
            x, nfe = x + h * d1, nfe + 1
        else:
            d2 = _velocity(velocity_fn, schedule, x + h * d1, ones * grid[i + 1])
            x, nfe = x + 0.5 * h * (d1 + d2), nfe + 2
        if callback is not None:
            callback(nfe, x)
    return x


def _sde_drift(
    v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, form: DiffusionForm, norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiT's SDE in its time s = 1 - t: (drift u + w s_theta, diffusion w) per sample, u = -v the velocity,
    s_theta = -(x + (1 - t) v) / t the score (-eps_hat / sigma_t), w = norm t (form 'sigma') or norm t / (1 - t)
    (form 'SBDM': the reverse SDE of the diffusion with these marginals); the noise is sqrt(2 w) dW."""
    tb = _bcast(t, x)
    score = -(x + (1.0 - tb) * v) / tb
    w = norm * t if form == "sigma" else norm * t / (1.0 - t)  # (B,)
    return -v + _bcast(w, x) * score, w


@torch.no_grad()
def sample_flow_euler_maruyama(
    velocity_fn: VelocityFn,
    x_T: torch.Tensor,
    steps: int = 250,
    *,
    schedule: NoiseSchedule | None = None,
    generator: Generators = None,
    diffusion_form: DiffusionForm = "sigma",
    diffusion_norm: float = 1.0,
    last_step_size: float = 0.04,
    t_start: float | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler–Maruyama on SiT's SDE dx = (u + w s) ds + sqrt(2 w) dW (Ma et al. 2024 §2.3, `Sampler.sample_sde`
    with SiT's sampling defaults): `steps` network evaluations.

    With `last_step_size` > 0 (SiT's 0.04, last step 'Mean'): steps - 1 noisy steps from t_start to
    last_step_size, then one deterministic step to t = 0. With 0: `steps` noisy steps to t = 0.
    `diffusion_form` 'sigma' (w = t: SiT's sample.py default) or 'SBDM' (w = t / (1 - t): SiT's Sampler
    default, infinite at t = 1, so it starts at t_start = 1 - 1e-3, SiT's sample_eps).
    """
    schedule = _flow_schedule(schedule, steps)
    if diffusion_form not in ("sigma", "SBDM"):
        raise ValueError(f"unknown diffusion_form {diffusion_form!r}; expected 'sigma' or 'SBDM'")
    if not 0 <= last_step_size < 1:
        raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
    start = t_start if t_start is not None else (schedule.T if diffusion_form == "sigma" else 1.0 - 1e-3)
    dtype = _work_dtype(x_T)
    noisy = steps - 1 if last_step_size > 0 else steps  # Euler–Maruyama steps
    points = noisy + 1
    grid = schedule.grid(start, last_step_size if last_step_size > 0 else 0.0, points, x_T.device, dtype)
    ones = torch.ones(x_T.shape[0], dtype=dtype, device=x_T.device)
    x = x_T
    for i in range(noisy):
        t = ones * grid[i]
        h = grid[i] - grid[i + 1]  # positive: the step in SiT's time
        drift, w = _sde_drift(_velocity(velocity_fn, schedule, x, t), x, t, diffusion_form, diffusion_norm)
        x = x + drift * h + _bcast(torch.sqrt(2.0 * w), x) * _randn_like(x, generator) * torch.sqrt(h)
        if callback is not None:
            callback(i + 1, x)
    if last_step_size > 0:  # SiT's last step 'Mean': the drift over the rest of the way, no noise
        t = ones * grid[-1]
        drift, _ = _sde_drift(_velocity(velocity_fn, schedule, x, t), x, t, diffusion_form, diffusion_norm)
        x = x + drift * grid[-1]
        if callback is not None:
            callback(steps, x)
    return x
