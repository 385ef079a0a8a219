"""Model adapters: conditioning and classifier-free guidance (Ho & Salimans 2022) around the network call."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from uvit_cli.schedule import NoiseSchedule
from uvit_cli.solvers.base import EpsFn, _bcast


def conditional_eps_fn(
    model: Callable[..., torch.Tensor], cond: Mapping[str, torch.Tensor] | None = None
) -> EpsFn:
    """eps_fn(x, timesteps) = model(x, timesteps, **cond): no guidance, one forward pass."""
    kwargs = dict(cond or {})

    def eps_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return model(x, timesteps, **kwargs)

    return eps_fn


def guided_eps_fn(
    model: Callable[..., torch.Tensor],
    scale: float,
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    interval: tuple[float, float] | None = None,
    *,
    schedule: NoiseSchedule | None = None,
) -> EpsFn:
    """Classifier-free guidance eps = eps_c + s (eps_c - eps_u), U-ViT's convention (spec §4.2; w = 1 + s).

    cond and uncond run in ONE forward of batch 2B (x twice; each uncond tensor is broadcast to its cond
    tensor's shape, so an empty context (1, 77, 768) or a null label () works). scale == 0 returns
    `conditional_eps_fn` (one pass of batch B). `interval=(lo, hi)` applies guidance only where the solver
    time t = timesteps / schedule.time_scale lies in [lo, hi] (`schedule` is then required); outside it the result is
    eps_c (the uncond half is still computed: no data-dependent branch, so it compiles without breaks).
    """
    if scale == 0:
        return conditional_eps_fn(model, cond)
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
    both = {
        k: torch.cat([cond[k], uncond[k].to(cond[k].device).expand_as(cond[k])]) for k in cond
    }  # (2B, ...)
    lo, hi = interval if interval is not None else (0.0, 0.0)
    if interval is not None and schedule is None:
        raise ValueError("a guidance interval is in solver time: pass the schedule that maps it to timesteps")
    time_scale = schedule.time_scale if schedule is not None else 1.0

    def eps_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), **both)  # (2B, ...)
        eps_c, eps_u = out.chunk(2)
        if interval is None:
            return eps_c + scale * (eps_c - eps_u)
        t = timesteps / time_scale  # (B,)
        s = torch.where((t >= lo) & (t <= hi), scale, 0.0).to(eps_c.dtype)  # (B,)
        return eps_c + _bcast(s, eps_c) * (eps_c - eps_u)

    return eps_fn
