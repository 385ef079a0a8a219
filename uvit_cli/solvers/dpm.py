"""DPM-Solver++ (data prediction: single-step 'fast' and 2M multistep), DDIM, and the classic DPM-Solver (noise
prediction), with the 'fast' order schedule they share."""

from __future__ import annotations

import torch

from uvit_cli.schedule import NoiseSchedule, time_grid
from uvit_cli.solvers.base import (
    Callback,
    EpsFn,
    Generators,
    _bcast,
    _data_pred,
    _default_schedule,
    _eps,
    _randn_like,
    _setup,
)


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
