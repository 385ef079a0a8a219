"""U-ViT's training objective (spec §3.3-3.5): noise prediction, condition dropout, latents, warm-up, EMA.

Randomness: every random number of a training step comes from ONE generator seeded by (seed, step) and is
drawn for the whole global batch in a fixed order (timesteps, noise, latent noise, condition drop, flip);
a rank and a micro-batch take the rows of their samples. What sample i of step s sees therefore depends
only on (seed, s, i): not on the number of ranks, the micro-batch size or a resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from uvit_cli.schedule import DiscreteSchedule, stable_diffusion_betas


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step `step` of a run seeded `seed` (hash, so nearby steps are unrelated)."""
    digest = hashlib.sha256(f"uvit-train:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class StepDraws:
    """The random numbers of one step for a run of global-batch rows (one per sample)."""

    timesteps: torch.Tensor  # (B,) int64 n in 1..N (discrete) or float32 t in [0, 1) (continuous)
    eps: torch.Tensor  # (B, C, H, W) the noise the network must predict
    latent_eps: torch.Tensor | None  # (B, C, H, W) noise that samples z from the stored moments
    drop: torch.Tensor | None  # (B,) bool: condition replaced by the null condition (CFG)
    flip: torch.Tensor | None  # (B,) bool: horizontal flip (pixel data sets)

    def rows(self, lo: int, hi: int) -> StepDraws:
        return StepDraws(**{f.name: _rows(getattr(self, f.name), lo, hi) for f in fields(self)})


def _rows(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if t is None else t[lo:hi]


class Objective:
    """Noising and loss of one preset: x_n = sqrt(ab) x0 + sqrt(1 - ab) eps, loss = mean (eps - eps_hat)^2.

    Discrete schedules (spec §3.1) draw n uniform in {1..N} and feed the integer n; the continuous VP-SDE
    (§3.2) draws t ~ U(0, 1) and feeds t * 999.
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
        device: torch.device | str = "cpu",
    ) -> None:
        if kind not in ("discrete", "continuous"):
            raise ValueError(f"unknown schedule kind {kind!r}")
        self.kind, self.z_shape = kind, tuple(z_shape)
        self.num_steps, self.beta_min, self.beta_max = num_steps, beta_min, beta_max
        self.p_uncond = p_uncond if conditioning != "none" else 0.0
        self.conditioning, self.latent, self.scale_factor = conditioning, latent, scale_factor
        self.random_flip = random_flip and not latent
        self.device = torch.device(device)
        if kind == "discrete":
            # A device-resident table: indexing it needs no host transfer in the step loop.
            ab = DiscreteSchedule(stable_diffusion_betas(num_steps)).alphas_cumprod  # (N+1,) float64
            self.sqrt_ab = ab.sqrt().float().to(self.device)  # (N+1,)
            self.sqrt_1m_ab = (1.0 - ab).sqrt().float().to(self.device)  # (N+1,)

    def draw(self, generator: torch.Generator, batch: int) -> StepDraws:
        """All random numbers of one step for `batch` (global) samples, in the fixed order."""
        dev = generator.device
        if self.kind == "discrete":
            timesteps = torch.randint(1, self.num_steps + 1, (batch,), generator=generator, device=dev)
        else:
            timesteps = torch.rand(batch, generator=generator, device=dev)
        eps = torch.randn(batch, *self.z_shape, generator=generator, device=dev)
        latent_eps = (
            torch.randn(batch, *self.z_shape, generator=generator, device=dev) if self.latent else None
        )
        drop = (
            torch.rand(batch, generator=generator, device=dev) < self.p_uncond if self.p_uncond > 0 else None
        )
        flip = torch.rand(batch, generator=generator, device=dev) < 0.5 if self.random_flip else None
        return StepDraws(timesteps, eps, latent_eps, drop, flip)

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar), network timestep) per sample, float32 (B,)."""
        if self.kind == "discrete":
            return self.sqrt_ab[timesteps], self.sqrt_1m_ab[timesteps], timesteps  # integer n, as official
        t = timesteps
        log_ab = -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)  # spec §3.2
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab)), t * 999.0

    def clean_data(self, x: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        """x0 from a batch's `x`: a latent sampled from the moments (× scale factor), or flipped pixels."""
        if self.latent:
            mean, logvar = x.chunk(2, dim=1)  # (b, C, h, w) each
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            return self.scale_factor * (mean + std * draws.latent_eps)  # spec §3.3
        if draws.flip is not None:
            x = torch.where(draws.flip[:, None, None, None], x.flip(-1), x)
        return x

    def condition(
        self,
        batch: dict[str, torch.Tensor],
        draws: StepDraws,
        null_class: int | None = None,
        empty_context: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's condition keywords, with dropped ones replaced by the null class / empty context."""
        if self.conditioning == "class":
            y = batch["y"]
            if draws.drop is not None:
                y = torch.where(draws.drop, torch.full_like(y, int(null_class)), y)
            return {"y": y}
        if self.conditioning == "text":
            context = batch["context"]
            if draws.drop is not None:
                context = torch.where(draws.drop[:, None, None], empty_context.to(context.dtype), context)
            return {"context": context}
        return {}


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
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x_n = sqrt_ab.view(shape) * x0 + sqrt_1m_ab.view(shape) * eps  # (B, C, H, W)
    eps_hat = net(x_n, timesteps, **cond)  # (B, C, H, W), autocast dtype on CUDA
    return (eps - eps_hat.float()).pow(2).flatten(1).mean(1)  # (B,) float32


class DiffusionLoss(nn.Module):
    """`eps_mse` as a module, so DDP and torch.compile wrap the network and the loss in one graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x0, eps, sqrt_ab, sqrt_1m_ab, timesteps, **cond):  # type: ignore[no-untyped-def]
        return eps_mse(self.net, x0, eps, sqrt_ab, sqrt_1m_ab, timesteps, **cond)


# --------------------------------------------------------------------------------------------------
# Optimisation (spec §3.5)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LambdaLR factor min(step / warmup, 1): the first optimizer step runs at lr 0, as the official code."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


def build_optimizer(
    params: Sequence[nn.Parameter],
    *,
    lr: float,
    betas: Sequence[float],
    weight_decay: float,
    warmup_steps: int,
    fused: bool = False,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on every parameter (decay on all, as official), eps 1e-8, with the linear warm-up."""
    opt = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        weight_decay=weight_decay,
        eps=1e-8,
        fused=True if fused else None,
    )

    def factor(step: int) -> float:
        return warmup_factor(step, warmup_steps)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def ema_update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], rate: float) -> None:
    """p_ema <- rate * p_ema + (1 - rate) * p, in place (spec §3.5; fp32, no warm-up or bias correction)."""
    torch._foreach_lerp_(list(ema_params), [p.detach().float() for p in params], 1.0 - rate)
