"""FP8 linears for training (`train.fp8`): the transformer blocks' nn.Linear layers as per-tensor scaled float8
matmuls (`torch._scaled_mm`), the recipe of torchao's float8 training with dynamic scaling, in plain torch.

Forward: activations and weights in e4m3 (3 mantissa bits, max 448); backward: the output gradient in e5m2
(2 mantissa bits, max 57344: gradients need range more than precision). Each tensor is scaled by
max / amax(|tensor|) before the cast, the products are accumulated in fp32 and written in the autocast dtype.
The parameters stay fp32 (AdamW, the EMA and checkpoints do not change); a converted layer changes class, not
names, so state-dict keys are the same. The patch embedding, the time and context embeddings and the output
layers keep full precision. On CUDA `torch._scaled_mm` needs compute capability 8.9 (Ada, Hopper) or newer
and every dimension a multiple of 16; a layer whose shapes are not falls back to `F.linear`. torch's CPU
build runs `_scaled_mm` too, so the tests run this exact code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x scaled into `dtype`'s range and cast, the inverse scale): x ~= x8.float() * inv_scale."""
    top = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)  # an all-zero tensor keeps a finite scale
    scale = top / amax
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major, as `_scaled_mm`'s second operand must be on CUDA."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """x (N, K) @ weight (O, K)^T in float8, and its backward in float8 (grad e5m2 against e4m3 operands)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        x8, x_inv = to_float8(x, E4M3)  # (N, K)
        w8, w_inv = to_float8(weight, E4M3)  # (O, K)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)  # one byte an element: less than the bf16 activations
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        # w8.t() is (K, O) column-major already
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)  # (N, O)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_float8(grad, E5M2)  # (N, O)
        grad_x = torch._scaled_mm(g8, _col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.x_dtype)
        grad_w = torch._scaled_mm(
            g8.t().contiguous(), _col_major(x8), scale_a=g_inv, scale_b=x_inv, out_dtype=torch.float32
        )  # (O, K)
        return grad_x, grad_w.to(ctx.w_dtype), None


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through float8 matmuls, in the autocast dtype when autocast is on (else x's); `F.linear`
    itself where a dimension (tokens, in, out) is not a multiple of 16."""
    out_features, in_features = weight.shape
    if (x.numel() // in_features) % 16 or in_features % 16 or out_features % 16:
        return F.linear(x, weight, bias)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out = _Float8Matmul.apply(x.reshape(-1, in_features), weight, dtype)  # (N, O)
    out = out.reshape(*x.shape[:-1], out_features)  # (..., O)
    return out if bias is None else out + bias.to(dtype)


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in float8 (`float8_linear`); same parameters, same state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias)


def convert_to_float8(model: nn.Module) -> int:
    """Make every nn.Linear inside the transformer blocks of `model` (in place) a Float8Linear; returns how
    many. The layers outside the blocks (embeddings, decoder_pred) keep full precision."""
    from uvit_cli.model import Block

    n = 0
    for block in model.modules():
        if isinstance(block, Block):
            for m in block.modules():
                if type(m) is nn.Linear:
                    m.__class__ = Float8Linear
                    n += 1
    return n


def fp8_refusal(device: torch.device) -> str | None:
    """Why float8 matmuls cannot run on `device` (a GPU before compute capability 8.9), or None."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {major}.{minor}; float8 matmuls need 8.9 or newer (L4, L40S, H100)"
    return None
