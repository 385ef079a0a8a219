"""Tiny seeded encoders saved in the REAL file formats, for encoder, prepare and sample tests.

Stable helper API (other tests import it):
    tiny_autoencoder(seed=0, ...) -> AutoencoderKL           f8 (4 levels), ch 32, 1 resnet per level
    save_autoencoder(vae, path, fmt) -> Path                 fmt: "uvit" | "sd_ckpt" | "diffusers" | "diffusers_legacy"
    ldm_to_diffusers(sd, config, legacy=False) -> dict       ldm keys -> diffusers keys by diffusers' converter
    tiny_text_encoder(seed=0, **sizes) -> CLIPTextEncoder     sizes override TINY_TOWER
    save_text_encoder(clip, directory, layout=..., fmt=..., tokenizer=True) -> Path (the directory)
    tiny_clip_model(seed=0, text=None, **sizes) -> CLIPModel  both towers (vision at the real 224 px, patch 14)
    save_clip_model(model, directory, fmt=..., tokenizer=True) -> Path   the Hugging Face CLIPModel layout
    write_tokenizer_files(directory) -> Path                 HF vocab.json + merges.txt from the bundled .gz
All writers use only torch/safetensors/json (no transformers or diffusers needed).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from uvit_cli.encoders.autoencoder import AutoencoderKL
from uvit_cli.encoders.clip import CLIPTextConfig, CLIPTextEncoder
from uvit_cli.encoders.clip_vision import CLIPModel, CLIPVisionConfig
from uvit_cli.encoders.tokenizer import BUNDLED_BPE, NUM_MERGES, _merges_from_gz, _vocab_from_merges

TINY_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
# The sizes of a tiny CLIP tower, text or vision (the real vocabulary, context, image size and patch kept).
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# transformers' CLIPTextConfig arguments for the same tiny text tower, the real values written out (parity
# references are built from these, not from transformers' defaults).
TINY_TEXT_HF = dict(TINY_TOWER, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic, non-trivial weights (norm gains around 1, small biases, fan-in scaled weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif p.ndim <= 1:  # GroupNorm / LayerNorm gains (and CLIP's class token, logit scale)
                p.copy_(1.0 + 0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def tiny_autoencoder(seed: int = 0, scale_factor: float = 0.18215, **sizes) -> AutoencoderKL:
    """A small seeded f8 KL autoencoder (GroupNorm 32 as the real one); sizes override TINY_VAE."""
    with torch.device("meta"):  # skip the default init: randomize_ sets every weight
        vae = AutoencoderKL(**{**TINY_VAE, **sizes}, scale_factor=scale_factor)
    vae.to_empty(device="cpu")
    return randomize_(vae, seed).eval().requires_grad_(False)


def diffusers_vae_config(vae: AutoencoderKL) -> dict:
    """The diffusers `AutoencoderKL` config.json describing the same network."""
    c = vae.config
    n = len(c["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [c["ch"] * m for m in c["ch_mult"]],
        "layers_per_block": c["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": c["embed_dim"],
        "norm_num_groups": c["norm_groups"],
        "sample_size": 256,
        "scaling_factor": vae.scale_factor,
    }


def save_autoencoder(vae: AutoencoderKL, path: str | Path, fmt: str = "uvit") -> Path:
    """Write `vae` as U-ViT's plain .pth ("uvit"), an SD .ckpt ("sd_ckpt": state_dict wrapper,
    first_stage_model. prefix, loss.* and a UNet key), or a diffusers folder ("diffusers", "diffusers_legacy":
    config.json + diffusion_pytorch_model.safetensors). Returns the file or folder written."""
    path = Path(path)
    sd = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    if fmt == "uvit":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)
    elif fmt == "sd_ckpt":
        path.parent.mkdir(parents=True, exist_ok=True)
        full = {f"first_stage_model.{k}": v for k, v in sd.items()}
        full["first_stage_model.loss.logvar"] = torch.zeros(())
        full["model.diffusion_model.out.0.weight"] = torch.ones(4)
        torch.save({"state_dict": full, "global_step": 470000}, path)
    elif fmt in ("diffusers", "diffusers_legacy"):
        path.mkdir(parents=True, exist_ok=True)
        config = diffusers_vae_config(vae)
        dsd = ldm_to_diffusers(sd, config, legacy=fmt == "diffusers_legacy")
        save_file(
            {k: v.contiguous() for k, v in dsd.items()}, str(path / "diffusion_pytorch_model.safetensors")
        )
        (path / "config.json").write_text(json.dumps(config, indent=2))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return path


def ldm_to_diffusers(
    sd: dict[str, torch.Tensor], config: dict, legacy: bool = False
) -> dict[str, torch.Tensor]:
    """ldm keys -> diffusers `AutoencoderKL` keys by diffusers' own converter (its single-file loader), to write
    the diffusers layouts; `legacy`: the pre-2023 attention names (query, key, value, proj_attn)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out = convert_ldm_vae_checkpoint(dict(sd), config)
    if legacy:
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for new, old in names.items():
            out = {k.replace(f"attentions.0.{new}.", f"attentions.0.{old}."): v for k, v in out.items()}
    return out


def tiny_text_encoder(seed: int = 0, **sizes: int) -> CLIPTextEncoder:
    """A small seeded CLIP text tower with the real vocabulary (49408) and context (77); sizes override
    TINY_TOWER."""
    with torch.device("meta"):  # skip the default init: randomize_ sets every weight
        clip = CLIPTextEncoder(CLIPTextConfig(**{**TINY_TOWER, **sizes}))
    return randomize_(clip.to_empty(device="cpu"), seed).eval().requires_grad_(False)


@functools.cache
def _tokenizer_file_texts() -> tuple[str, str]:
    merges = _merges_from_gz(BUNDLED_BPE)
    assert len(merges) == NUM_MERGES
    vocab = json.dumps(_vocab_from_merges(merges), ensure_ascii=False)
    return vocab, "\n".join(["#version: 0.2", *(" ".join(m) for m in merges)]) + "\n"


def write_tokenizer_files(directory: str | Path) -> Path:
    """Hugging Face `vocab.json` + `merges.txt`, derived from the bundled OpenAI .gz as the hub files are."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_file_texts()
    (directory / "vocab.json").write_text(vocab, encoding="utf-8")
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    return directory


def save_text_encoder(
    clip: CLIPTextEncoder,
    directory: str | Path,
    layout: str = "text_model",
    fmt: str = "safetensors",
    tokenizer: bool = True,
    config: bool = True,
) -> Path:
    """Write a HF-style folder: `model.safetensors` (fmt "safetensors") or `pytorch_model.bin` ("bin").

    layout: "text_model" (CLIPTextModel, transformers 4: `text_model.` prefix + a position_ids buffer),
    "unprefixed" (what transformers 5 save_pretrained writes), "clipmodel" (a full, loadable CLIPModel:
    `clip` plus `tiny_clip_model`'s seeded vision tower and projections, by `save_clip_model`).
    """
    if layout == "clipmodel":
        return save_clip_model(tiny_clip_model(text=clip), directory, fmt, tokenizer, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    cfg: dict = {k: getattr(clip.config, k) for k in clip.config.__dataclass_fields__}
    if layout == "text_model":
        sd = {f"text_model.{k}": v for k, v in sd.items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **cfg}
    _write_weights(sd, directory, fmt)
    if config:
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        write_tokenizer_files(directory)
    return directory


def _write_weights(sd: dict[str, torch.Tensor], directory: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(sd, str(directory / "model.safetensors"))
    elif fmt == "bin":
        torch.save(sd, directory / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown format {fmt!r}")


def tiny_clip_model(
    seed: int = 0, text: CLIPTextEncoder | None = None, projection_dim: int = 24, **sizes: int
) -> CLIPModel:
    """A small seeded CLIPModel: `text` (else `tiny_text_encoder(seed)`) plus a vision tower of `sizes`
    (overriding TINY_TOWER) at the real input (224 px, patch 14, so 257 tokens) and projections to
    `projection_dim`."""
    text = text if text is not None else tiny_text_encoder(seed)
    vision = CLIPVisionConfig(**{**TINY_TOWER, **sizes})
    with torch.device("meta"):
        model = CLIPModel(text.config, vision, projection_dim)
    randomize_(model.to_empty(device="cpu"), seed + 1000)
    model.text_model.load_state_dict(text.state_dict())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))  # CLIP's initial temperature, as the hub files hold
    return model.eval().requires_grad_(False)


def save_clip_model(
    model: CLIPModel,
    directory: str | Path,
    fmt: str = "safetensors",
    tokenizer: bool = True,
    config: bool = True,
) -> Path:
    """Write a Hugging Face `CLIPModel` folder as transformers 4 saved the hub files: `text_model.` /
    `vision_model.` keys with their `position_ids` buffers, the projections, `logit_scale`, a nested config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    num_positions = model.vision_model.embeddings.position_embedding.num_embeddings
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(num_positions)[None]
    _write_weights(sd, directory, fmt)
    text = {k: getattr(model.text_model.config, k) for k in CLIPTextConfig.__dataclass_fields__}
    vision = {k: getattr(model.vision_model.config, k) for k in CLIPVisionConfig.__dataclass_fields__}
    cfg = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": model.visual_projection.out_features,
        "logit_scale_init_value": 2.6592,
        "text_config": {**text, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},  # as the hub file
        "vision_config": vision,
    }
    if config:
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        write_tokenizer_files(directory)
    return directory
