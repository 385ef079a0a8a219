"""Sample grids during training: the EMA model, the preset's solver and guidance, fixed seeds and conditions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uvit_cli.config import Preset
from uvit_cli.errors import UvitError
from uvit_cli.fileio import atomic_path


class GridSampler:
    """Draws the same `n` noises and conditions at every call, so grids of successive steps compare."""

    def __init__(self, preset: Preset, ds: Any, device: torch.device, n: int = 16, seed: int = 0) -> None:
        self.preset, self.device, self.n = preset, device, n
        m = preset.model
        self.shape = (m.in_chans, m.img_size, m.img_size)
        g = torch.Generator().manual_seed(seed)
        self.x_T = torch.randn(n, *self.shape, generator=g)  # (n, C, H, W)
        self.cond: dict[str, torch.Tensor] = {}
        self.uncond: dict[str, torch.Tensor] = {}
        if m.conditioning == "class":
            k = ds.num_classes or m.num_classes
            self.cond = {"y": torch.arange(n) % k}
            self.uncond = {"y": torch.full((n,), ds.null_class)}
        elif m.conditioning == "text":
            # The captions of the first items of the set (caption choice of epoch 0).
            items = [(i * ds.views) % len(ds) for i in range(n)]
            self.cond = {"context": torch.stack([ds[(i, 0)]["context"] for i in items])}
            self.uncond = {"context": ds.empty_context[None].expand(n, -1, -1)}
        self.vae: Any = None
        self.disabled: str | None = None

    def _decoder(self) -> Any:
        if self.vae is None:
            from uvit_cli.encoders import load_autoencoder

            ae = self.preset.autoencoder
            assert ae is not None
            # $UVIT_VAE > the preset's pretrained > HF cache: the rule of every command (training has no --vae)
            self.vae = load_autoencoder(
                None, scale_factor=ae.scale_factor, device=self.device, preset=ae.pretrained
            )
        return self.vae

    @torch.no_grad()
    def __call__(self, ema: torch.nn.Module, path: Path, autocast_dtype: torch.dtype | None) -> Path | None:
        """Sample, decode and save a PNG grid; returns None (and sets `disabled`) if the VAE is missing."""
        from uvit_cli import solvers
        from uvit_cli.schedule import make_schedule

        if self.disabled:
            return None
        p = self.preset
        if p.data.space == "latent":
            try:
                vae = self._decoder()
            except UvitError as e:
                self.disabled = f"no sample grids: the autoencoder could not be loaded ({e})"
                return None
        schedule = make_schedule(
            p.schedule.kind, p.schedule.num_steps, p.schedule.beta_min, p.schedule.beta_max
        )
        dev = self.device
        cond = {k: v.to(dev) for k, v in self.cond.items()}
        uncond = {k: v.to(dev) for k, v in self.uncond.items()}

        def net(x: torch.Tensor, timesteps: torch.Tensor, **c: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return ema(x, timesteps, **c).float()

        if cond and p.sample.cfg_scale > 0 and p.train.p_uncond > 0:
            eps_fn = solvers.guided_eps_fn(
                net, p.sample.cfg_scale, cond, uncond, p.sample.guidance_interval, schedule=schedule
            )
        else:
            eps_fn = solvers.conditional_eps_fn(net, cond)
        gen = torch.Generator(dev).manual_seed(1)
        was_training = ema.training
        ema.eval()
        try:
            x = solvers.sample(p.sample.solver, eps_fn, self.x_T.to(dev), p.sample.steps, schedule=schedule,
                               generator=gen)  # fmt: skip
            if p.data.space == "latent":
                x = torch.cat([vae.decode(z[None].float()) for z in x])  # one at a time: bounded memory
        finally:
            ema.train(was_training)
        save_grid(x, path)
        return path


def save_grid(images: torch.Tensor, path: Path, padding: int = 2) -> Path:
    """Images in [-1, 1] (n, 3, H, W) -> one PNG, rows of ceil(sqrt(n))."""
    from PIL import Image

    imgs = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()  # (n, 3, H, W)
    n, c, h, w = imgs.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, q = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        canvas[y0 : y0 + h, x0 : x0 + w] = img.transpose(1, 2, 0)[..., :3] if c >= 3 else img[0][..., None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path
