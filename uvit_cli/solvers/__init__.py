"""Diffusion samplers as pure functions `sample_<method>(eps_fn, x_T, steps, *, schedule=None, ...) -> x`, plus guidance.

Contract (shared by every solver):
* `eps_fn(x, timesteps) -> eps` is the (guided) noise prediction; `timesteps = schedule.timestep_input(t)` is
  what the network sees, a float tensor of shape (B,) (t * N for the discrete schedule, t * 999 for the
  continuous VP-SDE, t * 1000 for the flow path). Solvers convert eps to a data prediction themselves where
  they need one. The flow solvers (`FLOW_SOLVERS`) take the velocity prediction in its place, with the
  same call shape; `model_fn_for(objective, net_fn, schedule)` gives each solver what it takes (a v model's
  output converted to eps).
* `steps` is the number of network evaluations (NFE) per image and guidance pass; every other option is
  keyword-only.
* `schedule` is a `uvit_cli.schedule.NoiseSchedule`; solver time runs from `schedule.T` down to `t_end`. Left
  out, it is the one the official scripts pair with the solver: `sample_dpm_solver_pp(eps_fn, x_T, 50)` is
  the official discrete call (SD schedule, N = 1000); the continuous solvers default to the VP-SDE, the
  flow solvers to the unshifted `FlowSchedule`. A VP solver refuses a `FlowSchedule` and a flow solver
  anything else (ValueError).
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
Euler schemes), `flow` (Euler, Heun and Euler–Maruyama on the linear path), `guidance` (the model adapters);
`SOLVERS` and `sample` here.
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
from uvit_cli.solvers.flow import sample_flow_euler, sample_flow_euler_maruyama, sample_flow_heun
from uvit_cli.solvers.guidance import conditional_eps_fn, eps_from_v_fn, guided_eps_fn, model_fn_for

__all__ = [
    "FLOW_SOLVERS",
    "SOLVERS",
    "EpsFn",
    "conditional_eps_fn",
    "eps_from_v_fn",
    "fast_orders",
    "guided_eps_fn",
    "model_fn_for",
    "sample",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_dpm_solver_pp",
    "sample_dpm_solver_pp_2m",
    "sample_euler_maruyama",
    "sample_euler_ode",
    "sample_flow_euler",
    "sample_flow_euler_maruyama",
    "sample_flow_heun",
]

SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "dpm_solver_pp": sample_dpm_solver_pp,
    "dpm_solver_pp_2m": sample_dpm_solver_pp_2m,
    "ddim": sample_ddim,
    "dpm_solver": sample_dpm_solver,
    "euler_maruyama": sample_euler_maruyama,
    "euler_ode": sample_euler_ode,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
    "flow_euler_maruyama": sample_flow_euler_maruyama,
}
# The solvers of a flow model (velocity on `FlowSchedule`); the others integrate a noise prediction.
FLOW_SOLVERS = frozenset({"flow_euler", "flow_heun", "flow_euler_maruyama"})
_STOCHASTIC = {"euler_maruyama", "flow_euler_maruyama"}


def sample(
    name: str,
    model_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int,
    *,
    schedule: NoiseSchedule | None = None,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run solver `name` from `SOLVERS` with its defaults on `model_fn` (eps, or the velocity for the flow
    solvers: `model_fn_for`); `generator` feeds the stochastic ones only."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    extra = {"generator": generator} if name in _STOCHASTIC else {}
    return SOLVERS[name](model_fn, x_T, steps, schedule=schedule, callback=callback, **extra)
