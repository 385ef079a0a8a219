"""U-ViT (Bao et al., CVPR 2023, "All are Worth Words: A ViT Backbone for Diffusion Models").

One class for the unconditional, class-conditional and text-conditional networks. Module names,
token layout, init and state-dict keys follow the official `libs/uvit.py` / `libs/uvit_t2i.py`, so
the released `nnet.pth` / `nnet_ema.pth` files load with `load_state_dict(strict=True)`.

Read leaf to root: embeddings -> attention -> MLP -> block -> model. Sizes come from the preset (`[model]`).
Shapes: B batch, L patch tokens, T all tokens (extras + L), D width, H heads, Dh head width.

Which conditioning: `clip_dim` given -> text (context tokens); else `num_classes > 0` -> class
(label token, with the CFG null class among the classes); else unconditional.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# --------------------------------------------------------------------------------------------------
# Leaves


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] (cos first, as the official code); float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # (half,)
    args = timesteps.reshape(-1, 1).float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    """timm 0.3.2's inverse-CDF truncated normal, which the official init uses.

    Not torch.nn.init.trunc_normal_: torch >= 2.x samples differently, so official seed-for-seed
    weights need this one. Bounds [a, b] are absolute (practically untruncated at std 0.02).
    """

    def norm_cdf(v: float) -> float:
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major patch order."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, L, D)


# --------------------------------------------------------------------------------------------------
# Transformer block


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (q, k, v; head-major), no mask.

    Runs `scaled_dot_product_attention` in the input (autocast) dtype, so bf16 on CUDA takes the
    flash kernel; the official code upcasts q, k, v to fp32 here, which is its main slowness.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, T, Dh)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(x)


def attention_kernels(choice: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The SDPA kernel order around a network call: "auto" is torch's own; "cudnn" puts cuDNN attention first
    (then flash, efficient, math) on CUDA. Off CUDA both are torch's (the CPU has no cuDNN attention)."""
    if choice == "auto" or device.type != "cuda":
        return contextlib.nullcontext()
    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return sdpa_kernel(order, set_priority=True)


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form) -> fc2, as timm's Mlp."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip: h = Linear([h, skip])."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        skip: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        # Creation order = official order (norm1, attn, norm2, mlp, skip_linear): it fixes the RNG
        # stream of the default inits and the state-dict key order.
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            assert skip is not None, "a block with a skip connection needs the skip input"
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, T, 2D) -> (B, T, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------------------------------
# The network


class UViT(nn.Module):
    """U-ViT noise-prediction network. `forward(x, timesteps, y=None, context=None) -> eps` (B, C, H, W).

    Token layout (official): text [time, context(num_clip_token), patches]; class [label, time,
    patches] (label first); unconditional [time, patches]. Long skips pair in_blocks[i] with
    out_blocks[depth//2 - 1 - i] (LIFO).

    `autocast_stream` (False: the official numerics) is the residual stream's dtype under autocast: the
    official time token is fp32, so `torch.cat` promotes every token, and so the whole stream, to fp32; True
    rounds the embedded tokens to the autocast dtype once, and the stream stays bf16 (half the bytes of every
    residual add and LayerNorm). A plain attribute, not a constructor keyword: the presets' `stream_dtype`
    sets it (`set_autocast_stream`), the weights and state-dict keys do not change.
    """

    autocast_stream: bool = False

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        clip_dim: int | None = None,
        num_clip_token: int = 77,
        use_checkpoint: bool = False,
        conv: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        if clip_dim is not None and num_classes > 0:
            raise ValueError(
                "UViT is text-conditional (clip_dim) or class-conditional (num_classes > 0), not both"
            )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.num_classes, self.clip_dim = embed_dim, num_classes, clip_dim
        self.conditioning = "text" if clip_dim is not None else ("class" if num_classes > 0 else "none")

        # Creation order = official order (see Block): patch_embed, time_embed, context/label, blocks...
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        if self.conditioning == "text":
            assert clip_dim is not None
            self.context_embed = nn.Linear(clip_dim, embed_dim)
            self.extras = 1 + num_clip_token
        elif self.conditioning == "class":
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        block: dict[str, Any] = dict(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale
        )
        self.in_blocks = nn.ModuleList(
            [Block(**block, use_checkpoint=use_checkpoint) for _ in range(depth // 2)]
        )
        self.mid_block = Block(**block, use_checkpoint=use_checkpoint)
        self.out_blocks = nn.ModuleList(
            [Block(**block, skip=skip, use_checkpoint=use_checkpoint) for _ in range(depth // 2)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        # Official init rules, in order:
        trunc_normal_(self.pos_embed, std=0.02)  # 1. position embedding ~ TN(0, 0.02)
        self.apply(self._init_weights)  # 2. Linear ~ TN(0, 0.02), bias 0; LayerNorm 1/0
        # 3. Conv2d (patch_embed, final_layer) and the label Embedding keep PyTorch's defaults.

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.patch_embed(x)  # (B, L, D)
        timesteps = timesteps.expand(B) if timesteps.ndim == 0 else timesteps
        # The sinusoid takes the parameters' dtype, not h's: under autocast h is bf16/fp16 but the official
        # time token stays fp32 (torch.cat promotes the stream to fp32); a bf16 module gets a bf16 token.
        t = self.time_embed(timestep_embedding(timesteps, self.embed_dim).to(self.pos_embed.dtype))  # (B, D)
        tokens = [t.unsqueeze(1)]  # [(B, 1, D)]
        if self.conditioning == "text":
            if (
                context is None and y is not None
            ):  # the official uvit_t2i call: forward(x, timesteps, context)
                context = y
            if context is None:
                raise ValueError("this U-ViT is text-conditional: pass context (B, num_clip_token, clip_dim)")
            tokens.append(self.context_embed(context))  # (B, num_clip_token, D)
        elif self.conditioning == "class":
            if y is None:
                raise ValueError(
                    "this U-ViT is class-conditional: pass y (class indices; the null class for CFG)"
                )
            tokens.insert(0, self.label_emb(y).unsqueeze(1))  # label token goes in front of time
        h = torch.cat([*tokens, h], dim=1)  # (B, T, D)
        h = h + self.pos_embed  # (B, T, D)
        if self.autocast_stream and torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))  # (B, T, D) in bf16 / fp16, through every block

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())

        h = self.decoder_pred(self.norm(h))  # (B, T, p*p*C)
        h = h[:, self.extras :, :]  # (B, L, p*p*C)
        p = self.patch_size
        h = rearrange(h, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=H // p, p1=p, p2=p)  # (B, C, H, W)
        return self.final_layer(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def set_autocast_stream(model: nn.Module, on: bool) -> nn.Module:
    """Set `autocast_stream` on every U-ViT inside `model` (itself, or under DDP / a loss module), in place."""
    for m in model.modules():
        if isinstance(m, UViT):
            m.autocast_stream = on
    return model
