"""What every solver shares: the types of the contract, the default schedule, the working dtype, broadcasting
of per-sample coefficients, per-image noise, and the network's noise and data predictions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from uvit_cli.schedule import FlowSchedule, NoiseSchedule, make_schedule

Callback = Callable[[int, torch.Tensor], None]
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # The official solver's times and schedule tensors are float32 whatever x is; float64 x gets float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () coefficient -> shape broadcastable against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() > 0 else v


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device` without making the host wait for the device: a copy from pageable CPU memory
    synchronises the stream (torch waits for it to finish; the driver may too), so a CPU tensor bound for a
    GPU is staged in pinned memory and copied asynchronously (torch's pinned-memory cache keeps the staging
    block until the copy is done)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) like x; one generator per image makes the noise independent of the batch size. Drawn on the
    generators' device (the CPU for `sample.generate`'s per-image generators) and moved to x's in one copy
    that does not wait for the device: the stochastic solvers draw every step."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        draw = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        return _to_device(draw, x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    draws = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
    if len({d.device for d in draws}) > 1:  # generators on several devices: gather them on x's first
        draws = [_to_device(d, x.device) for d in draws]
    return _to_device(torch.stack(draws), x.device)  # (B, ...)


def _eps(eps_fn: EpsFn, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return eps_fn(x, schedule.timestep_input(t))


def _data_pred(eps_fn: EpsFn, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = (x - sigma_t eps) / alpha_t (DPM-Solver++ data prediction, Lu et al. 2022b eq. 5)."""
    eps = _eps(eps_fn, schedule, x, t)
    return (x - _bcast(schedule.marginal_std(t), x) * eps) / _bcast(schedule.marginal_alpha(t), x)


def _setup(
    x_T: torch.Tensor, schedule: NoiseSchedule, t_start: float | None, t_end: float | None
) -> tuple[float, float, torch.Tensor]:
    t_start = schedule.T if t_start is None else float(t_start)
    t_end = schedule.eps if t_end is None else float(t_end)
    ones = torch.ones(x_T.shape[0], dtype=_work_dtype(x_T), device=x_T.device)  # (B,)
    return t_start, t_end, ones


def _default_schedule(
    schedule: NoiseSchedule | None, steps: int, kind: Literal["discrete", "continuous"]
) -> NoiseSchedule:
    """The schedule given, else the one the official scripts pair with the solver (discrete SD, N = 1000,
    or the VP-SDE); `steps` checked to be a positive int. A flow model's path is refused: these solvers
    integrate a noise prediction on a VP schedule."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TypeError(f"steps must be a positive int, got {steps!r}")
    if isinstance(schedule, FlowSchedule):
        raise ValueError(
            "this solver integrates a noise prediction on a VP schedule, not the linear path of a flow model: "
            "use flow_euler, flow_heun or flow_euler_maruyama"
        )
    return make_schedule(kind) if schedule is None else schedule
