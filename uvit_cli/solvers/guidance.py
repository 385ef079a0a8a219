"""Model adapters around the network call: conditioning, classifier-free guidance (Ho & Salimans 2022), and the
parameterization of the objective the network was trained with (`model_fn_for`)."""

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

    The rule is linear in the output, so it guides a v or velocity prediction the same way: SiT's
    v_u + w (v_c - v_u) is this with s = w - 1 (SiT's `forward_with_cfg` guides only the first 3 of 4 latent
    channels, DiT's reproducibility quirk; we guide all).

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


def eps_from_v_fn(v_fn: EpsFn, schedule: NoiseSchedule) -> EpsFn:
    """eps = sigma_t x + alpha_t v for a v-prediction (Salimans & Ho 2022 §4; DPM-Solver's model_wrapper 'v'),
    t = timesteps / schedule.time_scale on the VP schedule the solver runs."""

    def eps_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps / schedule.time_scale  # (B,)
        v = v_fn(x, timesteps)
        return _bcast(schedule.marginal_std(t), x) * x + _bcast(schedule.marginal_alpha(t), v) * v

    return eps_fn


def model_fn_for(objective: str, net_fn: EpsFn, schedule: NoiseSchedule) -> EpsFn:
    """What the solvers integrate, from the (guided) network call `net_fn` of a model trained with `objective`:
    eps models as they are (the noise the VP solvers take), v models through `eps_from_v_fn`, flow models as
    they are (the velocity the flow solvers take)."""
    if objective in ("eps", "flow"):
        return net_fn
    if objective == "v":
        return eps_from_v_fn(net_fn, schedule)
    raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'v' or 'flow'")
