"""The recipes `uvit bench` compares: ours, the official code's, and the steps in between.

A recipe is a set of switches over the *same* network and objective, so a ratio measures the
switches and nothing else. `official` reproduces how baofff/U-ViT runs (spec §1.3, §3.5, §4.2):
fp16 autocast with a grad scaler (`accelerate --mixed_precision fp16`), attention upcast to fp32,
eager, non-fused AdamW, a per-parameter EMA loop; sampling with cond and uncond as two passes; torch's
CUDA defaults (fp32 matmuls without TF32, no cuDNN autotuning), where ours runs `dist.cuda_defaults`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from uvit_cli.choices import AttentionKernel, CompileMode
from uvit_cli.model import Attention


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    amp: str | None  # "fp16", "bf16" or None (fp32)
    official_attention: bool  # q, k, v upcast to fp32 before SDPA: no flash kernel
    fused_adamw: bool = False
    compile: bool = False
    batched_cfg: bool = True  # sampling: cond and uncond in one forward
    cuda_graphs: bool = False  # sampling: torch.compile mode="reduce-overhead"
    tuned: bool = False  # CUDA: TF32 matmuls, cuDNN autotuning (`dist.cuda_defaults`); else torch's
    # The speed levers, off in `official` and `uvit` (the presets' defaults); each lever rung sets one.
    stream: bool = False  # the residual stream in the autocast dtype (stream_dtype = "autocast")
    attention: AttentionKernel = "auto"  # "cudnn": cuDNN attention first in SDPA's kernel order (CUDA)
    compile_mode: CompileMode = "default"  # torch.compile's mode
    fp8: bool = False  # training: the blocks' linears as float8 matmuls (compute capability 8.9+)
    vae_channels_last: bool = False  # sampling: the VAE decoder in channels_last (compiled on CUDA)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[self.amp]


OFFICIAL = Recipe("official", amp="fp16", official_attention=True, batched_cfg=False)
OURS = Recipe("uvit", amp="bf16", official_attention=False, fused_adamw=True, compile=True, tuned=True)

# `--compare`: switch one optimisation on at a time, from the official recipe to ours.
TRAIN_LADDER = [
    OFFICIAL,
    dataclasses.replace(OFFICIAL, name="+bf16", amp="bf16"),
    dataclasses.replace(OFFICIAL, name="+flash attention", amp="bf16", official_attention=False),
    dataclasses.replace(
        OFFICIAL, name="+fused AdamW", amp="bf16", official_attention=False, fused_adamw=True
    ),
    dataclasses.replace(OURS, name="+compile (uvit)"),
]
SAMPLE_LADDER = [
    *TRAIN_LADDER[:3],  # official, +bf16, +flash attention
    dataclasses.replace(
        OFFICIAL, name="+batched CFG", amp="bf16", official_attention=False, batched_cfg=True
    ),
    dataclasses.replace(OURS, name="+compile (uvit)"),
    dataclasses.replace(OURS, name="+CUDA graphs", cuda_graphs=True),
]

# `--levers` (and the end of `--compare`): one lever at a time on top of ours, each beside `uvit`. The order is
# what a run cut short should have measured first: the largest expected gain, the longest compile last.
_MAX_AUTOTUNE: CompileMode = "max-autotune-no-cudagraphs"
TRAIN_LEVERS = [
    dataclasses.replace(OURS, name="+FP8 linears", fp8=True),
    dataclasses.replace(OURS, name="+bf16 stream", stream=True),
    dataclasses.replace(OURS, name="+cuDNN attention", attention="cudnn"),
    dataclasses.replace(OURS, name="+max-autotune", compile_mode=_MAX_AUTOTUNE),
]
SAMPLE_LEVERS = [
    dataclasses.replace(OURS, name="+channels_last VAE", vae_channels_last=True),
    dataclasses.replace(OURS, name="+bf16 stream", stream=True),
    dataclasses.replace(OURS, name="+cuDNN attention", attention="cudnn"),
    dataclasses.replace(OURS, name="+max-autotune", compile_mode=_MAX_AUTOTUNE),
]


def for_device(recipe: Recipe, device: torch.device) -> Recipe:
    """What a recipe becomes on the CPU: fp32 (CPU autocast is not what either code base runs), eager, and
    so without the levers that act on autocast, CUDA kernels or compiling (the channels_last decoder runs)."""
    if device.type == "cuda":
        return recipe
    return dataclasses.replace(
        recipe, amp=None, compile=False, cuda_graphs=False, fused_adamw=False, tuned=False, stream=False,
        attention="auto", compile_mode="default", fp8=False,
    )  # fmt: skip


def lever_refusal(lever: Recipe, device: torch.device, *, decodes: bool = True) -> str | None:
    """Why a lever rung cannot show its lever here (then it is skipped with this note), or None."""
    if lever.vae_channels_last and not decodes:
        return "no VAE decoding here (a pixel preset, or --no-decode)"
    if for_device(lever, device) == dataclasses.replace(for_device(OURS, device), name=lever.name):
        return "no CUDA: on the CPU this rung is uvit itself (fp32, eager)"
    if lever.fp8:
        from uvit_cli.fp8 import fp8_refusal

        return fp8_refusal(device)
    return None


class OfficialAttention(Attention):
    """The official 'flash' path: q, k, v cast to fp32 before SDPA, output left in fp32 (spec §1.3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)  # 3 x (B, H, T, Dh) float32
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh) float32
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


def apply_attention(model: nn.Module, official: bool) -> nn.Module:
    """Switch every attention module of `model` to the official upcasting path or back, in place."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.__class__ = OfficialAttention if official else Attention
    return model


def official_ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], rate: float) -> None:
    """The official EMA (utils.ema): a Python loop over the parameters, mul_ then add_, one kernel pair each."""
    with torch.no_grad():
        for p_ema, p in zip(ema_params, params, strict=True):
            p_ema.mul_(rate).add_((1 - rate) * p.detach().float())
