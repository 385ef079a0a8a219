"""Euler schemes for the VP-SDE (U-ViT sde.py): the reverse SDE and the probability-flow ODE."""

from __future__ import annotations

import torch

from uvit_cli.schedule import NoiseSchedule
from uvit_cli.solvers.base import (
    Callback,
    EpsFn,
    Generators,
    _bcast,
    _default_schedule,
    _eps,
    _randn_like,
    _work_dtype,
)


def _euler_grid(x_T: torch.Tensor, schedule: NoiseSchedule, steps: int, t_end: float) -> torch.Tensor:
    # [0] + linspace(t_end, T, steps), built in float64 then cast like sde.euler_maruyama (spec §4.4).
    grid = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.linspace(t_end, schedule.T, steps, dtype=torch.float64)]
    )
    return grid.to(device=x_T.device, dtype=_work_dtype(x_T))  # (steps+1,)


def _euler(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    t_end: float,
    noise_scale: float,
    generator: Generators,
    callback: Callback | None,
) -> torch.Tensor:
    # Reverse drift f - g^2 score * (1 for the SDE, 1/2 for the ODE), score = -eps / sigma_t.
    grid = _euler_grid(x_T, schedule, steps, t_end)
    ones = torch.ones(x_T.shape[0], dtype=grid.dtype, device=x_T.device)
    weight = 1.0 if noise_scale > 0 else 0.5
    x = x_T
    for k in range(steps, 0, -1):
        t, s = ones * grid[k], grid[k - 1]
        beta = _bcast(schedule.beta(t), x)
        eps = _eps(eps_fn, schedule, x, t)
        drift = -0.5 * beta * x + weight * beta * eps / _bcast(schedule.marginal_std(t), x)
        dt = s - grid[k]  # negative
        x = x + drift * dt
        if noise_scale > 0 and k > 1:  # the last step (to s = 0) adds no noise
            x = x + noise_scale * torch.sqrt(beta) * torch.sqrt(-dt) * _randn_like(x, generator)
        if callback is not None:
            callback(steps - k + 1, x)
    return x


@torch.no_grad()
def sample_euler_maruyama(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int = 1000,
    *,
    schedule: NoiseSchedule | None = None,
    generator: Generators = None,
    t_end: float = 1e-3,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler–Maruyama on the reverse VP-SDE (Song et al. 2021 eq. 6), U-ViT's `euler_maruyama_sde` (spec §4.4)."""
    schedule = _default_schedule(schedule, steps, "continuous")
    return _euler(eps_fn, x_T, schedule, steps, t_end, 1.0, generator, callback)


@torch.no_grad()
def sample_euler_ode(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    t_end: float = 1e-3,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE (Song et al. 2021 eq. 13), U-ViT's `euler_maruyama_ode` (spec §4.4)."""
    schedule = _default_schedule(schedule, steps, "continuous")
    return _euler(eps_fn, x_T, schedule, steps, t_end, 0.0, None, callback)
