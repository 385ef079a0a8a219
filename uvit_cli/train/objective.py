"""U-ViT's training objective (spec §3.3-3.4): noise prediction, condition dropout, latents, flips; and the
objectives beyond the paper (docs/training.md, *Objectives*): v-prediction and flow matching, logit-normal time.

The optimiser, warm-up, EMA and the step that uses them are in `uvit_cli.train.step`.

Randomness: every random number of a training step comes from ONE generator seeded by (seed, step) and is
drawn for the whole global batch in a fixed order (timesteps, noise, latent noise, condition drop, flip);
a rank and a micro-batch take the rows of their samples. What sample i of step s sees therefore depends
only on (seed, s, i): not on the number of ranks, the micro-batch size or a resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from uvit_cli.schedule import (
    ContinuousVPSchedule,
    DiscreteSchedule,
    FlowSchedule,
    logit_normal_t,
    shift_time,
    stable_diffusion_betas,
)

if TYPE_CHECKING:
    from uvit_cli.config import Preset


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step `step` of a run seeded `seed` (hash, so nearby steps are unrelated)."""
    digest = hashlib.sha256(f"uvit-train:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class StepDraws:
    """The random numbers of one step for a run of global-batch rows (one per sample)."""

    timesteps: torch.Tensor  # (B,) int64 n in 1..N (discrete) or float32 t in [0, 1) (continuous, flow)
    eps: torch.Tensor  # (B, C, H, W) the noise of x_t (the eps objective's target)
    latent_eps: torch.Tensor | None  # (B, C, H, W) noise that samples z from the stored moments
    drop: torch.Tensor | None  # (B,) bool: condition replaced by the null condition (CFG)
    flip: torch.Tensor | None  # (B,) bool: horizontal flip (pixel data sets)

    def rows(self, lo: int, hi: int) -> StepDraws:
        cut = {f.name: _rows(getattr(self, f.name), lo, hi) for f in fields(self)}
        return StepDraws(**cut)  # type: ignore[arg-type]  # timesteps and eps are never None


def _rows(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if t is None else t[lo:hi]


class Objective:
    """Noising and loss of one preset: x_t = a x0 + s eps and loss = mean (target - prediction)^2 per sample
    (optionally Min-SNR weighted, `loss_weight`; off in every paper preset), where by `objective`:

    * "eps" (the paper's): a = sqrt(ab), s = sqrt(1 - ab), target eps;
    * "v" (Salimans & Ho 2022 §4): the same a, s; target v = a eps - s x0;
    * "flow" (SiT, SD3): a = 1 - t, s = t, target eps - x0 (the velocity dx_t/dt), network fed 1000 t.

    Discrete schedules (spec §3.1) draw n uniform in {1..N} and feed the integer n; the continuous VP-SDE
    (§3.2) draws t ~ U(0, 1) and feeds t * 999. `t_sampling="logit_normal"` draws t = sigmoid(mean + std z)
    instead (SD3 eq. 19; on the discrete schedule n = ceil(t N)), and a flow run's t passes `shift_time`.
    """

    def __init__(
        self,
        *,
        kind: str,
        z_shape: Sequence[int],
        num_steps: int = 1000,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        p_uncond: float = 0.0,
        conditioning: str = "none",
        latent: bool = False,
        scale_factor: float = 1.0,
        random_flip: bool = False,
        min_snr_gamma: float | None = None,
        objective: str = "eps",
        t_sampling: str = "uniform",
        t_mean: float = 0.0,
        t_std: float = 1.0,
        time_shift: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if kind not in ("discrete", "continuous"):
            raise ValueError(f"unknown schedule kind {kind!r}")
        if objective not in ("eps", "v", "flow"):
            raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'v' or 'flow'")
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown t_sampling {t_sampling!r}; expected 'uniform' or 'logit_normal'")
        if min_snr_gamma is not None and objective == "flow":
            raise ValueError("min_snr_gamma weights the eps and v losses; flow weights time by t_sampling")
        if time_shift != 1.0 and objective != "flow":
            raise ValueError("time_shift shifts the flow path's times: it needs objective 'flow'")
        self.objective, self.t_sampling = objective, t_sampling
        self.t_mean, self.t_std, self.time_shift = float(t_mean), float(t_std), float(time_shift)
        self.kind, self.z_shape = kind, tuple(z_shape)
        self.num_steps, self.beta_min, self.beta_max = num_steps, beta_min, beta_max
        self.p_uncond = p_uncond if conditioning != "none" else 0.0
        self.conditioning, self.latent, self.scale_factor = conditioning, latent, scale_factor
        self.random_flip = random_flip and not latent
        self.min_snr_gamma = min_snr_gamma
        self.device = torch.device(device)
        self.schedule: DiscreteSchedule | ContinuousVPSchedule | FlowSchedule
        if objective == "flow":
            self.schedule = FlowSchedule(time_shift)  # the linear path: [schedule] is not read
        elif kind == "discrete":
            self.schedule = DiscreteSchedule(stable_diffusion_betas(num_steps))
            # A device-resident table: indexing it needs no host transfer in the step loop.
            ab = self.schedule.alphas_cumprod  # (N+1,) float64
            self.sqrt_ab = ab.sqrt().float().to(self.device)  # (N+1,)
            self.sqrt_1m_ab = (1.0 - ab).sqrt().float().to(self.device)  # (N+1,)
        else:
            self.schedule = ContinuousVPSchedule(beta_min, beta_max)

    @classmethod
    def for_preset(cls, preset: Preset, device: torch.device | str = "cpu") -> Objective:
        """The objective a preset trains with (its schedule, prediction, time density, condition dropout, latent
        scale, flips)."""
        m, tc = preset.model, preset.train
        return cls(
            kind=preset.schedule.kind,
            z_shape=(m.in_chans, m.img_size, m.img_size),
            num_steps=preset.schedule.num_steps,
            beta_min=preset.schedule.beta_min,
            beta_max=preset.schedule.beta_max,
            p_uncond=preset.train.p_uncond,
            conditioning=m.conditioning,
            latent=preset.data.space == "latent",
            scale_factor=preset.autoencoder.scale_factor if preset.autoencoder else 1.0,
            random_flip=preset.data.random_flip,
            min_snr_gamma=tc.min_snr_gamma,
            objective=tc.objective,
            t_sampling=tc.t_sampling,
            t_mean=0.0 if tc.t_mean is None else tc.t_mean,
            t_std=1.0 if tc.t_std is None else tc.t_std,
            time_shift=1.0 if tc.time_shift is None else tc.time_shift,
            device=device,
        )

    def draw(self, generator: torch.Generator, batch: int) -> StepDraws:
        """All random numbers of one step for `batch` (global) samples, in the fixed order."""
        dev = generator.device
        timesteps = self._draw_times(batch, generator, dev)
        eps = torch.randn(batch, *self.z_shape, generator=generator, device=dev)
        latent_eps = (
            torch.randn(batch, *self.z_shape, generator=generator, device=dev) if self.latent else None
        )
        drop = (
            torch.rand(batch, generator=generator, device=dev) < self.p_uncond if self.p_uncond > 0 else None
        )
        flip = torch.rand(batch, generator=generator, device=dev) < 0.5 if self.random_flip else None
        return StepDraws(timesteps, eps, latent_eps, drop, flip)

    def _draw_times(self, batch: int, generator: torch.Generator, dev: torch.device) -> torch.Tensor:
        """The step's times (B,), drawn first: n in {1..N} (int64) on the discrete schedule, else t (float32)."""
        if self.t_sampling == "logit_normal":
            t = logit_normal_t(batch, self.t_mean, self.t_std, generator, device=dev)  # in (0, 1)
            if isinstance(self.schedule, DiscreteSchedule):
                return (t * self.schedule.N).ceil().long().clamp(1, self.schedule.N)  # n in {1..N}
        elif isinstance(self.schedule, DiscreteSchedule):
            return self.schedule.sample_timesteps(batch, generator, device=dev)  # n in {1..N}
        elif isinstance(self.schedule, ContinuousVPSchedule):
            t = self.schedule.sample_t(batch, generator, device=dev)  # t ~ U(0, 1), sde.LSimple (spec §3.2)
        else:
            t = torch.rand(
                batch, generator=generator, device=dev
            )  # U(0, 1): SiT's (train_eps = 0 for Linear)
        return shift_time(t, self.time_shift) if self.objective == "flow" else t

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, s, network timestep) per sample, float32 (B,): x_t = a x0 + s eps; on the VP schedules
        a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), on the flow path a = 1 - t, s = t."""
        if isinstance(self.schedule, FlowSchedule):
            t = timesteps
            return 1.0 - t, t, self.schedule.timestep_input(t)
        if self.kind == "discrete":
            return self.sqrt_ab[timesteps], self.sqrt_1m_ab[timesteps], timesteps  # integer n, as official
        assert isinstance(self.schedule, ContinuousVPSchedule)
        t = timesteps
        # alpha_bar in sde.py's operation order (spec §3.2), which the parity tests pin to the bit
        log_ab = -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab)), self.schedule.timestep_input(t)

    def loss_weight(self, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weight of the loss (B,) under `train.min_snr_gamma` (Min-SNR-gamma, Hang et al. 2023 §3.4),
        SNR = alpha_bar / (1 - alpha_bar): min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v (the
        same weighting of the eps error); None (the paper's unweighted mean) otherwise."""
        if self.min_snr_gamma is None:
            return None
        snr = sqrt_ab.square() / sqrt_1m_ab.square()
        if self.objective == "v":
            return snr.clamp(max=self.min_snr_gamma) / (snr + 1.0)
        return snr.clamp(max=self.min_snr_gamma) / snr

    def clean_data(self, x: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        """x0 from a batch's `x`: a latent sampled from the moments (× scale factor), or flipped pixels."""
        if self.latent:
            mean, logvar = x.chunk(2, dim=1)  # (b, C, h, w) each
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            assert draws.latent_eps is not None  # drawn for every latent objective
            return self.scale_factor * (mean + std * draws.latent_eps)  # spec §3.3
        if draws.flip is not None:
            x = torch.where(draws.flip[:, None, None, None], x.flip(-1), x)
        return x

    def condition(
        self, batch: dict[str, torch.Tensor], draws: StepDraws, uncond: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The model's condition keywords, those of `uncond` (the null condition, `sample.null_condition`:
        the null class, or CLIP('') of the data set), with the dropped rows replaced by it."""
        cond = {k: batch[k] for k in uncond}
        if draws.drop is None:
            return cond
        return {
            k: torch.where(draws.drop.view(-1, *[1] * (v.dim() - 1)), uncond[k].to(v.dtype), v)
            for k, v in cond.items()
        }


def prediction_mse(
    net: nn.Module,
    x0: torch.Tensor,
    eps: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    timesteps: torch.Tensor,
    objective: str = "eps",
    **cond: torch.Tensor,
) -> torch.Tensor:
    """Per-sample loss (B,): mean over non-batch dims of (target - net(x_t, timesteps))^2, x_t = a x0 + s eps, the
    target eps (DDPM L_simple), v = a eps - s x0 or the flow velocity eps - x0 (`Objective`)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x_n = a.view(shape) * x0 + s.view(shape) * eps  # (B, C, H, W)
    pred = net(x_n, timesteps, **cond)  # (B, C, H, W), autocast dtype on CUDA
    if objective == "eps":
        target = eps
    elif objective == "v":
        target = a.view(shape) * eps - s.view(shape) * x0  # Salimans & Ho 2022 §4
    else:
        target = eps - x0  # d x_t / dt on the linear path
    return (target - pred.float()).pow(2).flatten(1).mean(1)  # (B,) float32


def eps_mse(
    net: nn.Module,
    x0: torch.Tensor,
    eps: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1m_ab: torch.Tensor,
    timesteps: torch.Tensor,
    **cond: torch.Tensor,
) -> torch.Tensor:
    """Per-sample noise-prediction loss (B,): mean over non-batch dims of (eps - net(x_n, n))^2 (DDPM L_simple)."""
    return prediction_mse(net, x0, eps, sqrt_ab, sqrt_1m_ab, timesteps, "eps", **cond)


class DiffusionLoss(nn.Module):
    """`prediction_mse` of one objective as a module, so DDP and torch.compile wrap the network and the loss in
    one graph."""

    def __init__(self, net: nn.Module, objective: str = "eps") -> None:
        super().__init__()
        self.net = net
        self.objective = objective

    def forward(self, x0, eps, sqrt_ab, sqrt_1m_ab, timesteps, **cond):  # type: ignore[no-untyped-def]
        return prediction_mse(self.net, x0, eps, sqrt_ab, sqrt_1m_ab, timesteps, self.objective, **cond)
