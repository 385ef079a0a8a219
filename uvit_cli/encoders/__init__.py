"""Pretrained encoders U-ViT builds on: SD KL-f8 autoencoder, CLIP ViT-L/14 text encoder, CLIP tokenizer, and
the full CLIP ViT-L/14 (both towers) that CLIP score uses.

Torch-only reimplementations that load the published weight files (docs/encoders.md). Importing this package
is cheap; the submodules load on first use.

    vae = load_autoencoder(None, scale_factor=0.23010)        # flag > $UVIT_VAE > preset > HF cache
    clip = load_text_encoder("openai/clip-vit-large-patch14")  # .encode(texts) -> (B, 77, 768)
    model = load_clip_model(None)   # both towers, for uvit_cli.encoders.clip_score.clip_score(images, prompts, model)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from uvit_cli.errors import CheckpointError
from uvit_cli.lazy import lazy_exports
from uvit_cli.safe_pickle import torch_load_tensors

if TYPE_CHECKING:
    import torch

    from uvit_cli.encoders.autoencoder import AutoencoderKL
    from uvit_cli.encoders.clip import CLIPTextConfig, CLIPTextEncoder
    from uvit_cli.encoders.clip_vision import CLIPModel, CLIPVisionConfig
    from uvit_cli.encoders.tokenizer import CLIPTokenizer, TokenBatch
    from uvit_cli.encoders.weights import ResolvedWeights, resolve_weights

__all__ = [
    "AutoencoderKL",
    "CLIPModel",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTokenizer",
    "CLIPVisionConfig",
    "ResolvedWeights",
    "TokenBatch",
    "load_autoencoder",
    "load_clip_model",
    "load_state_dict_file",
    "load_text_encoder",
    "load_tokenizer",
    "resolve_weights",
]

_LAZY = {
    "AutoencoderKL": "autoencoder",
    "CLIPModel": "clip_vision",
    "CLIPTextConfig": "clip",
    "CLIPTextEncoder": "clip",
    "CLIPVisionConfig": "clip_vision",
    "CLIPTokenizer": "tokenizer",
    "TokenBatch": "tokenizer",
    "ResolvedWeights": "weights",
    "resolve_weights": "weights",
}


__getattr__ = lazy_exports(__name__, _LAZY)


def load_state_dict_file(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pth / .bin / .ckpt file (torch.load with weights_only=True), on the CPU."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:  # reads only the kept tensors
                return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
        try:
            sd = torch_load_tensors(path, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            sd = torch_load_tensors(path)
    except Exception as e:
        raise CheckpointError(
            f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            " (use the .safetensors file, or a plain state dict of tensors)"
        ) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and (keep is None or keep(k))}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _finish(
    module: AutoencoderKL | CLIPTextEncoder | CLIPModel, weights: Path, device: str | torch.device
) -> None:
    from uvit_cli.fileio import sha256_file

    module.eval().requires_grad_(False).to(device)
    module.weights_path = str(weights)
    module.weights_sha256 = sha256_file(weights)


def load_autoencoder(
    spec: str | Path | None,
    scale_factor: float = 0.18215,
    device: str | torch.device = "cpu",
    *,
    preset: str | None = None,
) -> AutoencoderKL:
    """Resolve (`resolve_weights`: `spec` > $UVIT_VAE > `preset`, the preset's `[autoencoder] pretrained` >
    HF cache) and load a KL-f8 autoencoder: eval, no grad, `.weights_path` / `.weights_sha256` set.

    Accepts U-ViT's `autoencoder_kl(_ema).pth`, SD `.ckpt`/`.safetensors` files (whole pipeline or VAE only)
    and diffusers `AutoencoderKL` files. `scale_factor` is U-ViT's: 0.18215 (ImageNet) or 0.23010 (COCO).
    """
    from uvit_cli.encoders.autoencoder import build_autoencoder
    from uvit_cli.encoders.weights import resolve_weights

    path = resolve_weights(None if spec is None else str(spec), "vae", preset=preset).path
    groups = _read_json(path.parent / "config.json").get("norm_num_groups", 32)
    sd = load_state_dict_file(
        path, keep=lambda k: not k.startswith(("cond_stage_model.", "model.", "model_ema."))
    )
    vae = build_autoencoder(sd, scale_factor=scale_factor, norm_groups=groups)
    _finish(vae, path, device)
    return vae


def load_tokenizer(directory: str | Path | None = None) -> CLIPTokenizer:
    """A HF tokenizer directory (vocab.json + merges.txt), else the bundled OpenAI vocabulary (same ids)."""
    from uvit_cli.encoders.tokenizer import CLIPTokenizer

    if directory is not None:
        d = Path(directory)
        for cand in (d, d.parent / "tokenizer"):  # SD pipelines keep it in a sibling folder
            if (cand / "vocab.json").is_file() and (cand / "merges.txt").is_file():
                return CLIPTokenizer.from_directory(cand)
    return CLIPTokenizer()


def load_text_encoder(
    spec: str | Path | None, device: str | torch.device = "cpu", *, preset: str | None = None
) -> CLIPTextEncoder:
    """Resolve (`spec` > $UVIT_CLIP > `preset`, the preset's `[text_encoder] pretrained` > HF cache) and load
    the CLIP text encoder (HF CLIPModel/CLIPTextModel or SD ckpt); eval, no grad.

    Sizes come from a `config.json` beside the weights when present, else from the tensor shapes.
    """
    from uvit_cli.encoders.clip import build_text_encoder
    from uvit_cli.encoders.weights import resolve_weights

    path = resolve_weights(None if spec is None else str(spec), "clip", preset=preset).path
    drop = (
        "vision_model.",
        "visual_projection",
        "model.diffusion_model.",
        "first_stage_model.",
        "model_ema.",
    )
    sd = load_state_dict_file(path, keep=lambda k: not k.startswith(drop))
    clip = build_text_encoder(sd, path.parent / "config.json", load_tokenizer(path.parent))
    _finish(clip, path, device)
    return clip


def load_clip_model(
    spec: str | Path | None, device: str | torch.device = "cpu", *, preset: str | None = None
) -> CLIPModel:
    """Resolve (`spec` > $UVIT_CLIP > `preset` > HF cache, as the text encoder) and load the full CLIP model,
    both towers and projections, for CLIP score; eval, no grad. A text-only file is one clear error.

    Sizes come from a `config.json` beside the weights when present, else from the tensor shapes.
    """
    from uvit_cli.encoders.clip_vision import build_clip_model
    from uvit_cli.encoders.weights import resolve_weights

    path = resolve_weights(None if spec is None else str(spec), "clip_model", preset=preset).path
    sd = load_state_dict_file(path)
    model = build_clip_model(sd, path.parent / "config.json", load_tokenizer(path.parent), source=str(path))
    _finish(model, path, device)
    return model
