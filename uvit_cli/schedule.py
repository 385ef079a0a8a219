"""Noise schedules of U-ViT: the discrete SD scaled-linear schedule, the continuous VP-SDE, and the linear
path of flow matching.

Two views of the same schedules:
* training (used by `train/objective.py`): `DiscreteSchedule` (float64 alpha_bar indexed by the integer step n = 0..N, spec §3.1),
  `ContinuousVPSchedule.sample_t` (t ~ U(0,1), spec §3.2), and the time densities beyond the paper
  (`logit_normal_t`, `shift_time`: SD3, Esser et al. 2024 §3.1, §5.3.2);
* sampling: `DiscreteVPSchedule` / `ContinuousVPSchedule`, the `NoiseScheduleVP('discrete' | 'linear')`
  of DPM-Solver (Lu et al. 2022), and `FlowSchedule` (x_t = (1 - t) x0 + t eps), which every solver in
  `solvers/` reads through one interface (`NoiseSchedule`): alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t),
  its inverse, and what the network is fed for a solver time t.
Time grids for the solvers are pure functions at the bottom.
"""

from __future__ import annotations

import abc
import math
from typing import Literal, Protocol

import torch

__all__ = [
    "ContinuousVPSchedule",
    "DiscreteSchedule",
    "DiscreteVPSchedule",
    "FlowSchedule",
    "NoiseSchedule",
    "logit_normal_t",
    "make_schedule",
    "shift_time",
    "stable_diffusion_betas",
    "time_grid",
    "time_logsnr",
    "time_quadratic",
    "time_uniform",
]


def stable_diffusion_betas(n: int = 1000) -> torch.Tensor:
    """Stable Diffusion "scaled linear" betas, float64 (U-ViT spec §3.1): linspace of sqrt(beta), squared."""
    return torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), n, dtype=torch.float64) ** 2


# ---------------------------------------------------------------------------------------------------
# Training side


class DiscreteSchedule:
    """Training view of a discrete DDPM schedule (Ho et al. 2020): alpha_bar_n for n = 0..N, alpha_bar_0 = 1."""

    def __init__(self, betas: torch.Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.N = int(betas.shape[0])
        self.betas = torch.cat([betas.new_zeros(1), betas])  # (N+1,) with beta_0 = 0, spec §3.1
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (N+1,) float64

    def coefficients(
        self, n: torch.Tensor, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_n), sqrt(1 - alpha_bar_n)) for integer steps n (B,): x_n = a x0 + s eps (DDPM eq. 4)."""
        ab = self.alphas_cumprod.to(n.device)[n.long()]  # (B,) float64
        device = n.device if device is None else device
        return ab.sqrt().to(device=device, dtype=dtype), (1.0 - ab).sqrt().to(device=device, dtype=dtype)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """n uniform in {1..N}, int64 (B,); the official LSimple feeds this integer n to the network."""
        gen_device = generator.device if generator is not None else "cpu"
        n = torch.randint(1, self.N + 1, (batch,), generator=generator, device=gen_device)
        return n.to(device)


# ---------------------------------------------------------------------------------------------------
# Sampling side: one interface for every solver


class NoiseSchedule(Protocol):
    """What a solver needs from a schedule x_t = alpha_t x0 + sigma_t eps (DPM-Solver's NoiseScheduleVP interface,
    Lu et al. 2022 §3); the VP schedules have alpha^2 + sigma^2 = 1, `FlowSchedule` has alpha + sigma = 1."""

    T: float  # solver start time
    eps: float  # default solver end time
    time_scale: float  # network timestep = t * time_scale

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor: ...
    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor: ...
    def marginal_std(self, t: torch.Tensor) -> torch.Tensor: ...
    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor: ...
    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor: ...
    def beta(self, t: torch.Tensor) -> torch.Tensor: ...
    def timestep_input(self, t: torch.Tensor) -> torch.Tensor: ...


class _VPMixin(abc.ABC):
    """alpha, sigma and lambda from log(alpha_t); the same float formulas as DPM-Solver's NoiseScheduleVP."""

    @abc.abstractmethod
    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t: what a concrete schedule defines."""

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t = exp(log alpha_t)."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2) (variance preserving)."""
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR lambda_t = log alpha_t - log sigma_t (DPM-Solver eq. 3.2)."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std


def _segments(x: torch.Tensor, xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right knot indices of the segment used for x; the end segments extrapolate linearly."""
    k = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.shape[0] - 1)
    return k - 1, k


def _interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through increasing knots xp with linear extrapolation (DPM-Solver interpolate_fn)."""
    i, j = _segments(x, xp)
    x0, x1, y0, y1 = xp[i], xp[j], yp[i], yp[j]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule(_VPMixin):
    """DPM-Solver's NoiseScheduleVP('discrete', betas) (spec §4.1): piecewise-linear log alpha on t in [1/N, 1]."""

    def __init__(self, betas: torch.Tensor) -> None:
        # The official scripts pass float32 betas; every knot below is float32 like theirs.
        betas = torch.as_tensor(betas).to(torch.float32)
        self.N = int(betas.shape[0])
        self.T = 1.0
        self.eps = 1.0 / self.N
        self.time_scale = float(self.N)  # network input t * N (spec §4.1, not 1000 (t - 1/N))
        self.t_array = torch.linspace(1.0 / self.N, 1.0, self.N, dtype=torch.float32)  # (N,) knots t_k
        self.log_alpha_array = 0.5 * torch.log(1.0 - betas).cumsum(dim=0)  # (N,) log sqrt(alpha_bar_{k+1})
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _knots(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 inputs see the official float32 knots; float64 inputs get them upcast (for tests).
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (like.device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.t_array.to(device=like.device, dtype=dtype),
                self.log_alpha_array.to(device=like.device, dtype=dtype),
            )
        return self._cache[key]

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t by linear interpolation of the knots (log alpha at t = n/N is 0.5 log alpha_bar_n)."""
        ts, log_alphas = self._knots(t)
        return _interp(t, ts, log_alphas)

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """t with lambda_t = lamb: log alpha = -0.5 logaddexp(0, -2 lamb), interpolated on the flipped knots."""
        ts, log_alphas = self._knots(lamb)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        return _interp(log_alpha, log_alphas.flip(0), ts.flip(0))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = -2 d log alpha / dt of the piecewise-linear interpolant (constant on each segment)."""
        ts, log_alphas = self._knots(t)
        i, j = _segments(t, ts)
        return -2.0 * (log_alphas[j] - log_alphas[i]) / (ts[j] - ts[i])

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """Network timestep for solver time t: t * N as a float (spec §4.1), so 1/N..1 maps to 1..N."""
        return t * self.time_scale


class ContinuousVPSchedule(_VPMixin):
    """The VP-SDE of Song et al. 2021 with linear beta(t) (spec §3.2) = NoiseScheduleVP('linear', 0.1, 20)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_0 = float(beta_min)
        self.beta_1 = float(beta_max)
        self.T = 1.0
        self.eps = 1e-4  # the continuous eval scripts' DPM-Solver end time (spec §4.4)
        self.time_scale = 999.0  # ScoreModel.predict feeds the network t * 999 (spec §3.2)

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2, i.e. alpha_bar = exp(-(b0 t + (b1-b0) t^2/2))."""
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """Closed-form inverse of lambda_t (DPM-Solver, linear schedule): root of the quadratic in t."""
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """Network timestep for solver time t: t * 999 (sde.ScoreModel.predict)."""
        return t * self.time_scale

    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Training times t ~ U(0, 1), float32 (B,) (sde.LSimple, t_init = 0)."""
        gen_device = generator.device if generator is not None else "cpu"
        return torch.rand(batch, generator=generator, device=gen_device).to(device)


class FlowSchedule:
    """The linear path of flow matching (rectified flow; SD3 eq. 1 and §3.1): x_t = (1 - t) x0 + t eps, noise at
    t = 1, data at t = 0, the network predicting the velocity dx_t/dt = eps - x0 and fed t * 1000.

    SiT's transport (willisma/SiT transport/path.py, ICPlan) runs the same path the other way: its time is 1 - t,
    alpha = time, sigma = 1 - time, and its velocity target x1 - x0 (data minus noise) is minus ours. Our
    direction is that of every other solver here (t from 1 down to 0) and of SD3's `shift`.
    `shift` maps the solver grid through `shift_time` (SD3 §5.3.2, RAE), as the training times were.
    """

    def __init__(self, shift: float = 1.0) -> None:
        if not shift > 0:
            raise ValueError(f"time shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.T = 1.0
        self.eps = 0.0  # the path is defined at t = 0 (data): the solvers end there
        self.time_scale = 1000.0  # the range of the discrete schedule's integer n, for the same embedding

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = log(1 - t)."""
        return torch.log1p(-t)

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t = 1 - t."""
        return 1.0 - t

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = t."""
        return t

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log((1 - t) / t)."""
        return torch.log1p(-t) - torch.log(t)

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """t with lambda_t = lamb: sigmoid(-lamb)."""
        return torch.sigmoid(-lamb)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """g(t)^2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2 = 2 t / (1 - t), the diffusion of the forward SDE
        with these marginals (for a VP schedule this is beta(t))."""
        return 2.0 * t / (1.0 - t)

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """Network timestep for solver time t: t * 1000, so noise is 1000 as for the discrete schedule's n."""
        return t * self.time_scale

    def grid(
        self, t_start: float, t_end: float, points: int, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        """`points` times from t_start to t_end, uniform before the shift, float64 arithmetic cast to dtype."""
        u = torch.linspace(t_start, t_end, points, dtype=torch.float64)
        return shift_time(u, self.shift).to(device=device, dtype=dtype)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift (Esser et al. 2024 eq. 23; RAE): t' = s t / (1 + (s - 1) t); s > 1 moves t to noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def logit_normal_t(
    batch: int,
    mean: float,
    std: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times t = sigmoid(mean + std z), z ~ N(0, 1), float32 (B,) (SD3 eq. 19, "lognorm(m, s)")."""
    gen_device = generator.device if generator is not None else "cpu"
    z = torch.randn(batch, generator=generator, device=gen_device).to(device)
    return torch.sigmoid(mean + std * z)


def make_schedule(
    kind: Literal["discrete", "continuous"],
    num_steps: int = 1000,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    *,
    objective: str = "eps",
    time_shift: float | None = None,
) -> DiscreteVPSchedule | ContinuousVPSchedule | FlowSchedule:
    """The sampler-side schedule of a preset: SD scaled-linear discrete (§3.1/§4.1) or the VP-SDE (§3.2) for
    the eps and v objectives; the linear path (`FlowSchedule(time_shift)`) for objective "flow", whatever kind."""
    if objective == "flow":
        return FlowSchedule(1.0 if time_shift is None else time_shift)
    if objective not in ("eps", "v"):
        raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'v' or 'flow'")
    if kind == "discrete":
        return DiscreteVPSchedule(stable_diffusion_betas(num_steps))
    if kind == "continuous":
        return ContinuousVPSchedule(beta_min, beta_max)
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'discrete' or 'continuous'")


# ---------------------------------------------------------------------------------------------------
# Time grids (DPM-Solver get_time_steps): steps + 1 decreasing times from t_start to t_end


def time_uniform(
    t_start: float, t_end: float, steps: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform in t: linspace(t_start, t_end, steps + 1), float32 like the official grid."""
    return torch.linspace(t_start, t_end, steps + 1, device=device)


def time_quadratic(
    t_start: float, t_end: float, steps: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform in sqrt(t) (DPM-Solver 'time_quadratic')."""
    return torch.linspace(t_start**0.5, t_end**0.5, steps + 1, device=device).pow(2)


def time_logsnr(
    schedule: NoiseSchedule, t_start: float, t_end: float, steps: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform in lambda = log-SNR / 2 (DPM-Solver 'logSNR', Lu et al. 2022 §3.3), mapped back to t."""
    lambda_start = schedule.marginal_lambda(torch.tensor([t_start], device=device)).item()
    lambda_end = schedule.marginal_lambda(torch.tensor([t_end], device=device)).item()
    return schedule.inverse_lambda(torch.linspace(lambda_start, lambda_end, steps + 1, device=device))


def time_grid(
    skip_type: str,
    schedule: NoiseSchedule,
    t_start: float,
    t_end: float,
    steps: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Dispatch on DPM-Solver's skip_type: 'time_uniform', 'logSNR' or 'time_quadratic'."""
    if skip_type == "time_uniform":
        return time_uniform(t_start, t_end, steps, device)
    if skip_type == "logSNR":
        return time_logsnr(schedule, t_start, t_end, steps, device)
    if skip_type == "time_quadratic":
        return time_quadratic(t_start, t_end, steps, device)
    raise ValueError(
        f"unknown skip_type {skip_type!r}; expected 'time_uniform', 'logSNR' or 'time_quadratic'"
    )
