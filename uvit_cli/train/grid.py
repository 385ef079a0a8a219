"""Sample grids during training: `sample.generate` of the EMA model with the preset's [sample] solver and
guidance, the same images and conditions at every call, tiled into one PNG.

Image i of a grid is image i of `uvit sample` with the run's train.seed (its noise from (seed, i)), with the
class i % K for class models and the first caption of the i-th item of the set for text models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uvit_cli.config import NetworkPrecision, Preset
from uvit_cli.errors import ResourceError, UvitError
from uvit_cli.sample.conditions import data_conditions
from uvit_cli.sample.generate import generate
from uvit_cli.sample.outputs import save_grid
from uvit_cli.sample.settings import SampleOptions, SampleSettings, guidance_refusal

# the training recipe's autocast dtype -> the sampling precision of the same arithmetic
_PRECISION: dict[torch.dtype | None, NetworkPrecision] = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    None: "fp32",
}


class GridSampler:
    """Makes the same `n` images (noise and conditions) at every call, so grids of successive steps compare.

    `disabled` says why grids are off (no autoencoder, no memory for the batch); `note` is one warning to
    show once: a preset whose guidance cannot apply (`sample.guidance_refusal`) is sampled without it, since
    a grid must not stop a run."""

    def __init__(self, preset: Preset, ds: Any, device: torch.device, n: int = 16, seed: int = 0) -> None:
        self.preset, self.device, self.n, self.seed = preset, device, n, seed
        self.conditions, self.uncond = data_conditions(preset.model, ds, n)
        why = guidance_refusal(preset) if preset.sample.cfg_scale > 0 else None
        self.note = f"sample grids are drawn without guidance: {why}" if why is not None else None
        # one batch of the n images, decoded one at a time (bounded memory); never compiled: a grid is rare
        options = SampleOptions(
            cfg_scale=0.0 if why is not None else None, batch_size=n, decode_batch_size=1, compile=False
        )
        self.settings = SampleSettings.from_preset(preset, options)
        self.vae: Any = None
        self.disabled: str | None = None

    def _decoder(self) -> Any:
        if self.vae is None:
            from uvit_cli.sample.resolve import preset_autoencoder

            # $UVIT_VAE > the preset's pretrained > HF cache: the rule of every command (training has no --vae)
            self.vae = preset_autoencoder(self.preset, None, self.device)
        return self.vae

    def pop_note(self) -> str | None:
        """The one-time warning (`note`), then None."""
        note, self.note = self.note, None
        return note

    def images(self, ema: torch.nn.Module, autocast_dtype: torch.dtype | None) -> np.ndarray:
        """The grid's images, uint8 (n, H, W, 3): `generate` of the EMA model, in the training recipe's
        autocast dtype."""
        vae = self._decoder() if self.preset.data.space == "latent" else None
        settings = dataclasses.replace(self.settings, precision=_PRECISION[autocast_dtype])
        was_training = ema.training
        ema.eval()
        try:
            batches = generate(ema, self.preset, range(self.n), self.conditions, self.uncond, seed=self.seed,
                               autoencoder=vae, settings=settings, device=self.device)  # fmt: skip
            return np.concatenate([images for _, images in batches])
        finally:
            ema.train(was_training)

    def __call__(self, ema: torch.nn.Module, path: Path, autocast_dtype: torch.dtype | None) -> Path | None:
        """Sample and save a PNG grid; None (and `disabled` set) when the autoencoder cannot be loaded or the
        batch does not fit in memory."""
        if self.disabled:
            return None
        if self.preset.data.space == "latent":
            try:
                self._decoder()
            except UvitError as e:
                self.disabled = f"no sample grids: the autoencoder could not be loaded ({e})"
                return None
        try:
            images = self.images(ema, autocast_dtype)
        except ResourceError as e:
            self.disabled = f"no sample grids: {e}"
            return None
        return save_grid(images, path)
