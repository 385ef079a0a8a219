"""CLIP ViT-L/14 image tower and both projections (Radford et al. 2021), torch only: the embeddings CLIP score
compares.

`CLIPModel` holds the two towers under the Hugging Face `CLIPModel` keys (`text_model.*`, `vision_model.*`,
`visual_projection.weight`, `text_projection.weight`, `logit_scale`), so the hub's `model.safetensors` of
openai/clip-vit-large-patch14, the file the COCO models already read their text tower from, loads key by key.
The vision tower reuses the text tower's layers (`clip.py`) with non-causal attention:
patches (conv, no bias) + class token + positions -> pre_layrnorm -> layers -> post_layernorm(class token).
The text embedding is the final-layer-norm state at the end token, the highest id (49407) of each row: what
transformers' `argmax` rule picks for this checkpoint (its config's `eos_token_id` is 2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uvit_cli.encoders.clip import (
    CLIPEncoder,
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPTowerConfig,
    config_from_state_dict,
)
from uvit_cli.encoders.tokenizer import CLIPTokenizer
from uvit_cli.errors import CheckpointError


@dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig(CLIPTowerConfig):
    """The image tower: the shared sizes, its input side, patch and channels."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3


# openai/clip-vit-large-patch14's image tower (CLIP score).
CLIP_L14_VISION = CLIPVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D), N = (224/14)^2
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N+1, D)


class CLIPVisionTransformer(nn.Module):
    """Pixels (B, 3, 224, 224), CLIP-normalised -> the pooled class token (B, D) after post_layernorm."""

    def __init__(self, cfg: CLIPVisionConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or CLIP_L14_VISION
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # HF's spelling
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if tuple(pixel_values.shape[1:]) != (self.config.num_channels, s, s):
            raise ValueError(f"CLIP vision tower takes (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, N+1, D)
        for layer in self.encoder.layers:
            x = layer(x)  # (B, N+1, D)
        return self.post_layernorm(x[:, 0])  # (B, D)


class CLIPModel(nn.Module):
    """Both towers and their projections: `image_embeds(pixels)`, `text_embeds(ids)`, `encode_text(texts)`."""

    def __init__(
        self,
        text_cfg: CLIPTextConfig | None = None,
        vision_cfg: CLIPVisionConfig | None = None,
        projection_dim: int = 768,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.text_model = CLIPTextEncoder(text_cfg, tokenizer)
        self.vision_model = CLIPVisionTransformer(vision_cfg)
        self.visual_projection = nn.Linear(self.vision_model.config.hidden_size, projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_model.config.hidden_size, projection_dim, bias=False)
        # CLIP's contrastive temperature: in the file, unused by the score
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.weights_sha256: str | None = None
        self.weights_path: str | None = None

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.text_model.tokenizer

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) preprocessed pixels -> (B, P) projected image embeddings (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values))  # (B, P)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids -> (B, P) projected text embeddings (not normalised), pooled at the end token."""
        h = self.text_model(input_ids)  # (B, N, D) after final_layer_norm
        eos = input_ids.argmax(dim=-1)  # the first 49407: the end token, since padding comes after it
        return self.text_projection(h[torch.arange(h.shape[0], device=h.device), eos])  # (B, P)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (B, P) text embeddings; the tokenizer truncates to 77 tokens, keeping the end token."""
        ids = self.tokenizer(texts).input_ids.to(self.text_projection.weight.device)
        return self.text_embeds(ids).float()


# --- loading ----------------------------------------------------------------------------------------------
FULL_MODEL_HINT = (
    "CLIP score needs the full CLIPModel file (text and vision towers with their projections), e.g. "
    "`huggingface-cli download openai/clip-vit-large-patch14 config.json model.safetensors vocab.json "
    "merges.txt`; pass that folder with --clip or $UVIT_CLIP"
)


def vision_config_from_state_dict(
    sd: dict[str, torch.Tensor], overrides: dict | None = None
) -> CLIPVisionConfig:
    """Image-tower sizes from `vision_model.*` shapes; heads (not visible in shapes) default to hidden/64."""
    try:
        hidden, channels, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        inter = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a CLIP vision tower: no {e.args[0]}; {FULL_MODEL_HINT}") from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(
            f"CLIP vision tower with {positions} positions: not a square grid plus a class token"
        )
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    cfg: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
    )
    cfg.update(overrides or {})
    return CLIPVisionConfig(**cfg)


def configs_from_json(path: Path | None) -> tuple[dict, dict]:
    """(text, vision) size overrides from a CLIPModel `config.json` (`*_config` or the older `*_config_dict`)."""
    if path is None or not path.is_file():
        return {}, {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    out = []
    for tower, fields in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
        conf = raw.get(f"{tower}_config") or raw.get(f"{tower}_config_dict") or {}
        out.append({k: v for k, v in conf.items() if k in fields.__dataclass_fields__ and v is not None})
    return out[0], out[1]


def build_clip_model(
    sd: dict[str, torch.Tensor],
    config_json: Path | None = None,
    tokenizer: CLIPTokenizer | None = None,
    source: str = "the weights",
) -> CLIPModel:
    """A CLIPModel from a Hugging Face `CLIPModel` state dict (strict; `position_ids` buffers dropped)."""
    from uvit_cli.encoders.autoencoder import strict_load

    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    needed = ("vision_model.embeddings.class_embedding", "visual_projection.weight", "text_projection.weight")
    if missing := [k for k in needed if k not in sd]:
        raise CheckpointError(f"{source} has no {missing[0]}: {FULL_MODEL_HINT}")
    text_json, vision_json = configs_from_json(config_json)
    text_sd = {k[len("text_model.") :]: v for k, v in sd.items() if k.startswith("text_model.")}
    text_cfg = config_from_state_dict(text_sd, text_json)
    vision_cfg = vision_config_from_state_dict(sd, vision_json)
    with torch.device("meta"):
        model = CLIPModel(text_cfg, vision_cfg, sd["visual_projection.weight"].shape[0], tokenizer)
    strict_load(model, sd, what=f"CLIP model ({source})")
    return model
