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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

from uvit_cli.schedule import NoiseSchedule, make_schedule, time_grid

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

Callback = Callable[[int, torch.Tensor], None]
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # The official solver's times and schedule tensors are float32 whatever x is; float64 x gets float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () coefficient -> shape broadcastable against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() > 0 else v


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) like x; one generator per image makes the noise independent of the batch size."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [
            torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
            for g in generator
        ]
    )


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
    or the VP-SDE); `steps` checked to be a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TypeError(f"steps must be a positive int, got {steps!r}")
    return make_schedule(kind) if schedule is None else schedule


def fast_orders(steps: int, order: int = 3) -> list[int]:
    """Orders of DPM-Solver 'fast' (Lu et al. 2022 §3.4): sum = steps = NFE; order 3 as in spec §4.1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        if steps % 3 == 1:
            return [3] * (k - 1) + [1]
        return [3] * (k - 1) + [2]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction), the official discrete sampler


def _dpmpp_singlestep(
    eps_fn: EpsFn,
    ns: NoiseSchedule,
    x: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    order: int,
    r1: torch.Tensor | None,
    r2: torch.Tensor | None,
) -> torch.Tensor:
    """One single-step DPM-Solver++ update s -> t of order 1-3, solver_type 'dpm_solver' (Lu et al. 2022b §4)."""
    lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)  # (B,)
    h = lambda_t - lambda_s
    sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
    alpha_t = ns.marginal_alpha(t)
    phi_1 = torch.expm1(-h)
    d_s = _data_pred(eps_fn, ns, x, s)
    x_lin = _bcast(sigma_t / sigma_s, x) * x - _bcast(alpha_t * phi_1, x) * d_s  # the order-1 (DDIM) part
    if order == 1:
        return x_lin
    assert r1 is not None
    s1 = ns.inverse_lambda(lambda_s + r1 * h)  # ~ the skipped grid point (spec §4.1)
    sigma_s1, alpha_s1 = ns.marginal_std(s1), ns.marginal_alpha(s1)
    u1 = _bcast(sigma_s1 / sigma_s, x) * x - _bcast(alpha_s1 * torch.expm1(-r1 * h), x) * d_s
    d_1 = _data_pred(eps_fn, ns, u1, s1)
    if order == 2:
        return x_lin - (0.5 / r1) * _bcast(alpha_t * phi_1, x) * (d_1 - d_s)
    assert r2 is not None
    s2 = ns.inverse_lambda(lambda_s + r2 * h)
    sigma_s2, alpha_s2 = ns.marginal_std(s2), ns.marginal_alpha(s2)
    phi_12 = torch.expm1(-r2 * h)
    phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
    phi_2 = phi_1 / h + 1.0
    u2 = (
        _bcast(sigma_s2 / sigma_s, x) * x
        - _bcast(alpha_s2 * phi_12, x) * d_s
        + r2 / r1 * _bcast(alpha_s2 * phi_22, x) * (d_1 - d_s)
    )
    d_2 = _data_pred(eps_fn, ns, u2, s2)
    # 'dpm_solver' variant: d_1 only feeds u2 (spec §4.1).
    return x_lin + (1.0 / r2) * _bcast(alpha_t * phi_2, x) * (d_2 - d_s)


@torch.no_grad()
def sample_dpm_solver_pp(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    order: int = 3,
    skip_type: str = "time_uniform",
    method: str = "fast",
    t_start: float | None = None,
    t_end: float | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022b), the official U-ViT discrete sampler `DPM_Solver(predict_x0=True).sample`.

    Defaults = spec §4.1: 'fast' orders [3, ..., 3, 2|1] with sum = steps network evaluations on a grid of
    steps + 1 times; a step of order o spans o grid intervals and evaluates at the skipped grid points.
    No final denoising step. `method='multistep'` runs `sample_dpm_solver_pp_2m` (order <= 2).
    """
    schedule = _default_schedule(schedule, steps, "discrete")
    if method == "multistep":
        if order > 2:
            raise ValueError("multistep DPM-Solver++ is implemented for order <= 2 (2M); use method='fast'")
        return sample_dpm_solver_pp_2m(eps_fn, x_T, steps, schedule=schedule, skip_type=skip_type,
                                       t_start=t_start, t_end=t_end, order=order, callback=callback)  # fmt: skip
    if method != "fast":
        raise ValueError(f"unknown method {method!r}; expected 'fast' or 'multistep'")
    t_start, t_end, ones = _setup(x_T, schedule, t_start, t_end)
    grid = time_grid(skip_type, schedule, t_start, t_end, steps, x_T.device).to(ones.dtype)  # (steps+1,)
    lambdas = schedule.marginal_lambda(grid)  # (steps+1,)
    x, i = x_T, 0
    for o in fast_orders(steps, order):
        h = lambdas[i + o] - lambdas[i]
        r1 = (lambdas[i + 1] - lambdas[i]) / h if o >= 2 else None
        r2 = (lambdas[i + 2] - lambdas[i]) / h if o >= 3 else None
        x = _dpmpp_singlestep(eps_fn, schedule, x, ones * grid[i], ones * grid[i + o], o, r1, r2)
        i += o
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_dpm_solver_pp_2m(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    skip_type: str = "time_uniform",
    t_start: float | None = None,
    t_end: float | None = None,
    order: int = 2,
    lower_order_final: bool = True,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) multistep (Lu et al. 2022b, Algorithm 2); `steps` network evaluations.

    The first step is first order (no history); with `lower_order_final` and steps < 10 the last one is too,
    as in the DPM-Solver reference code. `order=1` gives DDIM in DPM-Solver++ form.
    """
    schedule = _default_schedule(schedule, steps, "discrete")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    t_start, t_end, ones = _setup(x_T, schedule, t_start, t_end)
    grid = time_grid(skip_type, schedule, t_start, t_end, steps, x_T.device).to(ones.dtype)
    lambdas = schedule.marginal_lambda(grid)
    sigmas, alphas = schedule.marginal_std(grid), schedule.marginal_alpha(grid)
    x = x_T
    d_prev: torch.Tensor | None = None
    h_prev = lambdas[0]  # placeholder, read only once d_prev exists
    for i in range(steps):
        d = _data_pred(eps_fn, schedule, x, ones * grid[i])
        h = lambdas[i + 1] - lambdas[i]
        first_order = order == 1 or d_prev is None or (lower_order_final and steps < 10 and i == steps - 1)
        if first_order:
            d_eff = d
        else:
            assert d_prev is not None and h_prev is not None
            r = h_prev / h
            d_eff = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - (alphas[i + 1] * torch.expm1(-h)) * d_eff
        if callback is not None:
            callback(i + 1, x)
        d_prev, h_prev = d, h
    return x


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    skip_type: str = "time_uniform",
    t_start: float | None = None,
    t_end: float | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 the DDPM-like posterior (eq. 16)."""
    schedule = _default_schedule(schedule, steps, "discrete")
    t_start, t_end, ones = _setup(x_T, schedule, t_start, t_end)
    grid = time_grid(skip_type, schedule, t_start, t_end, steps, x_T.device).to(ones.dtype)
    sigmas, alphas = schedule.marginal_std(grid), schedule.marginal_alpha(grid)
    x = x_T
    for i in range(steps):
        eps = _eps(eps_fn, schedule, x, ones * grid[i])
        x0 = (x - sigmas[i] * eps) / alphas[i]
        if eta > 0:
            # eq. 16: sigma_eta = eta * (sigma_t / sigma_s) * sqrt(1 - alpha_s^2 / alpha_t^2)
            ratio = (alphas[i] / alphas[i + 1]) ** 2
            sigma_eta = eta * sigmas[i + 1] / sigmas[i] * torch.sqrt((1.0 - ratio).clamp(min=0.0))
            dir_coeff = torch.sqrt((sigmas[i + 1] ** 2 - sigma_eta**2).clamp(min=0.0))
            x = alphas[i + 1] * x0 + dir_coeff * eps + sigma_eta * _randn_like(x, generator)
        else:
            x = alphas[i + 1] * x0 + sigmas[i + 1] * eps
        if callback is not None:
            callback(i + 1, x)
    return x


# ---------------------------------------------------------------------------------------------------
# Classic DPM-Solver (noise prediction): the continuous eval scripts' sampler


def _dpm_singlestep(
    eps_fn: EpsFn, ns: NoiseSchedule, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, order: int
) -> torch.Tensor:
    """One DPM-Solver-1/2/3 step s -> t (Lu et al. 2022a, Algorithms 1 and 2; r1 = 1/2 or 1/3, r2 = 2/3)."""
    lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
    h = lambda_t - lambda_s
    log_alpha_s, log_alpha_t = ns.marginal_log_mean_coeff(s), ns.marginal_log_mean_coeff(t)
    sigma_t = ns.marginal_std(t)
    phi_1 = torch.expm1(h)
    n_s = _eps(eps_fn, ns, x, s)
    x_lin = _bcast(torch.exp(log_alpha_t - log_alpha_s), x) * x - _bcast(sigma_t * phi_1, x) * n_s
    if order == 1:
        return x_lin
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = ns.inverse_lambda(lambda_s + r1 * h)
    log_alpha_s1, sigma_s1 = ns.marginal_log_mean_coeff(s1), ns.marginal_std(s1)
    u1 = (
        _bcast(torch.exp(log_alpha_s1 - log_alpha_s), x) * x - _bcast(sigma_s1 * torch.expm1(r1 * h), x) * n_s
    )
    n_1 = _eps(eps_fn, ns, u1, s1)
    if order == 2:
        return x_lin - (0.5 / r1) * _bcast(sigma_t * phi_1, x) * (n_1 - n_s)
    r2 = 2.0 / 3.0
    s2 = ns.inverse_lambda(lambda_s + r2 * h)
    log_alpha_s2, sigma_s2 = ns.marginal_log_mean_coeff(s2), ns.marginal_std(s2)
    phi_12 = torch.expm1(r2 * h)
    phi_22 = torch.expm1(r2 * h) / (r2 * h) - 1.0
    phi_2 = phi_1 / h - 1.0
    u2 = (
        _bcast(torch.exp(log_alpha_s2 - log_alpha_s), x) * x
        - _bcast(sigma_s2 * phi_12, x) * n_s
        - r2 / r1 * _bcast(sigma_s2 * phi_22, x) * (n_1 - n_s)
    )
    n_2 = _eps(eps_fn, ns, u2, s2)
    return x_lin - (1.0 / r2) * _bcast(sigma_t * phi_2, x) * (n_2 - n_s)


@torch.no_grad()
def sample_dpm_solver(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    steps: int = 50,
    *,
    schedule: NoiseSchedule | None = None,
    order: int = 3,
    skip_type: str = "logSNR",
    t_start: float | None = None,
    t_end: float | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022a §3.4), noise prediction, as the continuous U-ViT scripts (spec §4.4).

    K = len(fast_orders(steps)) = steps // 3 + 1 intervals on a uniform-logSNR grid of K + 1 points; each
    interval gets one step of its order, intermediate points at r = 1/3, 2/3 (order 3) or 1/2 (order 2).
    """
    schedule = _default_schedule(schedule, steps, "continuous")
    t_start, t_end, ones = _setup(x_T, schedule, t_start, t_end)
    orders = fast_orders(steps, order)
    grid = time_grid(skip_type, schedule, t_start, t_end, len(orders), x_T.device).to(ones.dtype)
    x = x_T
    for i, o in enumerate(orders):
        x = _dpm_singlestep(eps_fn, schedule, x, ones * grid[i], ones * grid[i + 1], o)
        if callback is not None:
            callback(sum(orders[: i + 1]), x)
    return x


# ---------------------------------------------------------------------------------------------------
# Euler schemes for the VP-SDE (U-ViT sde.py): reverse SDE and probability-flow ODE


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


# ---------------------------------------------------------------------------------------------------
# Name table and dispatcher used by the workflows

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


# ---------------------------------------------------------------------------------------------------
# Model adapters: conditioning and classifier-free guidance (Ho & Salimans 2022) around the network call


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
