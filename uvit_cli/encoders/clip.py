"""CLIP ViT-L/14 text transformer (Radford et al. 2021), torch only: `last_hidden_state` as U-ViT stored it.

The attention, MLP and layer modules serve the vision tower too (`clip_vision.py`), non-causal there.

Module names equal the unprefixed Hugging Face `CLIPTextModel` keys (what transformers 5 writes), so a hub file
loads key by key once an optional `text_model.` / `cond_stage_model.transformer.text_model.` prefix is removed.
Forward: token + position embedding, pre-LN blocks with causal attention and quick_gelu, final layer norm.
No padding mask and padding with 49407: that is what makes the pad rows equal U-ViT's (docs/encoders.md §3).
The op order follows transformers 4.23.1 (U-ViT's pin), so CPU fp32 outputs are bit-identical to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uvit_cli.encoders.tokenizer import CLIPTokenizer
from uvit_cli.errors import CheckpointError


@dataclass(frozen=True, kw_only=True)
class CLIPTowerConfig:
    """The sizes the shared attention, MLP and layer modules read: either tower's (text or image)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True, kw_only=True)
class CLIPTextConfig(CLIPTowerConfig):
    """The text tower: the shared sizes, its vocabulary and its context length."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77


# openai/clip-vit-large-patch14's text tower (U-ViT's COCO encoder).
CLIP_L14_TEXT = CLIPTextConfig(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig, causal: bool = True) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.causal = causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        if not self.causal:  # vision: SDPA, transformers 5's default (bit-identical to it on the CPU)
            q, k, v = (
                f(x).view(b, n, h, d // h).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj)
            )
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads), scale (D/heads)^-0.5
            return self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)
        # transformers 4.23.1's order (U-ViT's pin): scale q, add a finfo.min causal mask, softmax, bmm. On the
        # CPU this is bit-identical to it; SDPA(is_causal=True), which transformers 5 uses, differs by ~2e-6.
        q = (
            (self.q_proj(x) * (d // h) ** -0.5).view(b, n, h, d // h).transpose(1, 2)
        )  # (B, heads, N, D/heads)
        k = self.k_proj(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v_proj(x).view(b, n, h, d // h).transpose(1, 2)
        mask = torch.full((n, n), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu_(1)  # (N, N)
        w = torch.softmax(q @ k.transpose(-1, -2) + mask, dim=-1)  # (B, heads, N, N)
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"unsupported CLIP hidden_act {cfg.hidden_act!r} (quick_gelu or gelu)")
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # (B, N, I)
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)  # quick_gelu: x·σ(1.702x)
        return self.fc2(x)  # (B, N, D)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig, causal: bool = True) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, N, D)
        return x + self.mlp(self.layer_norm2(x))  # (B, N, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig, causal: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.num_hidden_layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class CLIPTextEncoder(nn.Module):
    """Text ids (B, N) -> last_hidden_state (B, N, D) float32; `.encode(texts)` tokenises first."""

    def __init__(self, cfg: CLIPTextConfig | None = None, tokenizer: CLIPTokenizer | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or CLIP_L14_TEXT
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._tokenizer = tokenizer
        self.weights_sha256: str | None = None
        self.weights_path: str | None = None

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:  # built on first use: loading the BPE table takes ~0.1 s
            self._tokenizer = CLIPTokenizer()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: CLIPTokenizer) -> None:
        self._tokenizer = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        # Positions are arange, never a stored `position_ids` buffer (merged SD files carry corrupted ones).
        pos = torch.arange(n, device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(pos)  # (B, N, D)
        for layer in self.encoder.layers:
            x = layer(x)  # (B, N, D)
        return self.final_layer_norm(x)  # (B, N, D)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (B, 77, D) float32 on the module's device, exactly U-ViT's `FrozenCLIPEmbedder.encode`."""
        ids = self.tokenizer(texts).input_ids.to(self.final_layer_norm.weight.device)
        return self(ids).float()


# --- loading ----------------------------------------------------------------------------------------------
_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.", "text_model.")
_IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale", "position_ids")


def clip_state_dict_from_any(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub `CLIPModel`/`CLIPTextModel` (prefixed or transformers-5 unprefixed) or SD ckpt -> our keys."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("cond_stage_model.") for k in sd):  # full SD checkpoint: keep the text tower only
        sd = {k: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    out = {}
    for key, value in sd.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(_IGNORED) or key.endswith("position_ids"):
            continue
        out[key] = value
    return out


def config_from_json(path: Path) -> dict:
    """Text-tower sizes from a `config.json` (CLIPTextConfig, or CLIPModel with text_config[_dict])."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    text = raw.get("text_config") or raw.get("text_config_dict") or raw
    fields = CLIPTextConfig.__dataclass_fields__
    return {k: v for k, v in text.items() if k in fields and v is not None}


def config_from_state_dict(sd: dict[str, torch.Tensor], overrides: dict | None = None) -> CLIPTextConfig:
    """Infer sizes from tensor shapes; heads (not visible in shapes) default to hidden/64 as in ViT-L/14."""
    try:
        vocab, hidden = sd["embeddings.token_embedding.weight"].shape
        max_pos = sd["embeddings.position_embedding.weight"].shape[0]
        inter = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a CLIP text encoder state dict: no {e.args[0]}") from None
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    cfg: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=max_pos,
    )
    cfg.update(overrides or {})
    return CLIPTextConfig(**cfg)


def build_text_encoder(
    sd: dict[str, torch.Tensor], config_json: Path | None = None, tokenizer: CLIPTokenizer | None = None
) -> CLIPTextEncoder:
    """Build a CLIPTextEncoder from any accepted state dict (strict); sizes from config.json if given."""
    from uvit_cli.encoders.autoencoder import strict_load

    sd = clip_state_dict_from_any(sd)
    overrides = config_from_json(config_json) if config_json is not None and config_json.is_file() else None
    cfg = config_from_state_dict(sd, overrides)
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg, tokenizer)
    strict_load(model, sd, what="CLIP text encoder")
    return model
