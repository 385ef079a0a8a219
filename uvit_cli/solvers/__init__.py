"""Diffusion samplers as pure functions `sample_<method>(eps_fn, x_T, steps, *, schedule=None, ...) -> x`, plus guidance.

Contract (shared by every solver):
* `eps_fn(x, timesteps) -> eps` is the (guided) noise prediction; `timesteps = schedule.timestep_input(t)` is
  what the network sees, a float tensor of shape (B,) (t * N for the discrete schedule, t * 999 for the
  continuous VP-SDE). Solvers convert eps to a data prediction themselves where they need one.
* `steps` is the number of solver steps; every other option is keyword-only.
* `schedule` is a `uvit_cli.schedule.NoiseSchedule`; solver time runs from `schedule.T` down to `t_end`. Left
  out, it is the one the official scripts pair with the solver: `sample_dpm_solver_pp(eps_fn, x_T, 50)` is
  the official discrete call (SD schedule, N = 1000); the continuous solvers default to the VP-SDE.
* `callback(n, x)`, if given, is called after each step with the network evaluations so far (n reaches
  `steps` at the end) and the current x.
* Arithmetic: the schedule quantities are float32 like the official code (float64 when x_T is float64,
  which the tests use to measure convergence orders); pass float32 x_T and run the network under autocast
  inside `eps_fn` if you want mixed precision.
* Every solver runs under `torch.no_grad()` itself (the official sampler does the same); callers may add
  `torch.inference_mode()` around it.
Classifier-free guidance is a wrapper that builds an `eps_fn` from the network (`guided_eps_fn`), never a
solver or model option.

Modules: `base` (the shared types and helpers), `dpm` (DPM-Solver++, DDIM, DPM-Solver), `euler` (the VP-SDE
Euler schemes), `guidance` (the model adapters); `SOLVERS` and `sample` here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from uvit_cli.schedule import NoiseSchedule
from uvit_cli.solvers.base import Callback, EpsFn, Generators
from uvit_cli.solvers.dpm import (
    fast_orders,
    sample_ddim,
    sample_dpm_solver,
    sample_dpm_solver_pp,
    sample_dpm_solver_pp_2m,
)
from uvit_cli.solvers.euler import sample_euler_maruyama, sample_euler_ode
from uvit_cli.solvers.guidance import conditional_eps_fn, guided_eps_fn

__all__ = [
    "SOLVERS",
    "EpsFn",
    "conditional_eps_fn",
    "fast_orders",
    "guided_eps_fn",
    "sample",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_dpm_solver_pp",
    "sample_dpm_solver_pp_2m",
    "sample_euler_maruyama",
    "sample_euler_ode",
]

SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "dpm_solver_pp": sample_dpm_solver_pp,
    "dpm_solver_pp_2m": sample_dpm_solver_pp_2m,
    "ddim": sample_ddim,
    "dpm_solver": sample_dpm_solver,
    "euler_maruyama": sample_euler_maruyama,
    "euler_ode": sample_euler_ode,
}
_STOCHASTIC = {"euler_maruyama"}


def sample(
    name: str,
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int,
    *,
    schedule: NoiseSchedule | None = None,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run solver `name` from `SOLVERS` with its defaults; `generator` feeds the stochastic ones only."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    extra = {"generator": generator} if name in _STOCHASTIC else {}
    return SOLVERS[name](eps_fn, x_T, steps, schedule=schedule, callback=callback, **extra)
