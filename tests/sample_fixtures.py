"""Tiny sampling presets and seeded checkpoints, for the sample, label-protocol and reliability tests.

t2i_toml(name="tiny_t2i", depth=2) -> str         text to 4x4x4 latents (32 px), CLIP contexts 77 x 32
class_toml(steps=2) -> str                        class-conditional 8x8 pixels: 10 classes + the null class
save_tiny_uvit(toml, preset_path, ckpt, seed) -> (Preset, UViT)   the preset file and a seeded U-ViT of it
save_tiny_encoders(vae_path, clip_dir, vae_seed=, clip_seed=) -> (AutoencoderKL, CLIPTextEncoder)
"""

from __future__ import annotations

from pathlib import Path

import torch
from encoder_fixtures import (
    randomize_,
    save_autoencoder,
    save_text_encoder,
    tiny_autoencoder,
    tiny_text_encoder,
)
from train_fixtures import tiny_toml

from uvit_cli.config import Preset, load_preset
from uvit_cli.encoders import AutoencoderKL, CLIPTextEncoder
from uvit_cli.model import UViT


def t2i_toml(name: str = "tiny_t2i", depth: int = 2) -> str:
    """A text-to-image latent preset: DPM-Solver++ in 2 steps, no guidance (scale 1), VAE scale factor 0.5."""
    return tiny_toml(
        name,
        {"kind": "coco", "path": "unused", "space": "latent", "resolution": 32},
        model={"img_size": 4, "in_chans": 4, "depth": depth, "clip_dim": 32, "num_clip_token": 77},
        sample={"solver": "dpm_solver_pp", "steps": 2, "cfg_scale": 1.0, "batch_size": 4},
        autoencoder={"scale_factor": 0.5},
        text_encoder={"kind": "clip"},
    )


def class_toml(steps: int = 2) -> str:
    """A class-conditional pixel preset: Euler-Maruyama, guidance scale 0.5."""
    return tiny_toml(
        "tiny_class",
        {"kind": "imagenet64", "path": "unused", "space": "pixel", "resolution": 8},
        model={"num_classes": 11},  # 10 real classes and the null class 10 (p_uncond 0.1)
        sample={"solver": "euler_maruyama", "steps": steps, "cfg_scale": 0.5, "batch_size": 4},
    )


def save_tiny_uvit(toml: str, preset_path: Path, ckpt: Path, seed: int) -> tuple[Preset, UViT]:
    """Write `toml` to `preset_path` and a U-ViT of it, seeded, to `ckpt` in the official layout (a plain
    state dict .pth); the preset and the model (in eval mode)."""
    preset_path.write_text(toml)
    preset = load_preset(preset_path)
    model = randomize_(UViT(**preset.model.model_dump()), seed=seed).eval()
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ckpt)
    return preset, model


def save_tiny_encoders(
    vae_path: Path, clip_dir: Path, *, vae_seed: int, clip_seed: int
) -> tuple[AutoencoderKL, CLIPTextEncoder]:
    """A seeded tiny VAE written as U-ViT's autoencoder .pth and a seeded tiny CLIP text encoder written as a
    Hugging Face folder; both returned."""
    vae = tiny_autoencoder(seed=vae_seed)
    save_autoencoder(vae, vae_path, "uvit")
    clip = tiny_text_encoder(seed=clip_seed)
    save_text_encoder(clip, clip_dir)
    return vae, clip
