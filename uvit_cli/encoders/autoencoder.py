"""SD KL-f8 autoencoder (Rombach et al. 2022, LDM), torch only, as U-ViT's `libs/autoencoder.py` uses it.

The state dict IS the CompVis/ldm layout of U-ViT's `autoencoder_kl.pth` (spec §7): 248 tensors and 83,653,863
parameters for the default sizes, so the official files strict-load as they are. diffusers `AutoencoderKL`
files go through `diffusers_to_ldm` (docs/encoders.md §2b). Read leaf to root: resnet -> attention ->
down/upsample -> encoder/decoder -> autoencoder, then the key maps.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from uvit_cli.errors import CheckpointError


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # ldm's `x * sigmoid(x)`, not F.silu: the fused kernel rounds differently (~1e-6), and this order makes
    # the CPU fp32 output bit-identical to U-ViT's libs/autoencoder.py (tests/test_autoencoder.py).
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # ldm uses a 1x1 "nin" shortcut when the width changes (conv_shortcut=False in every SD config).
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(_swish(self.norm2(h)))  # (B, out, H, W); dropout is 0 at inference
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; 1x1 convs and the explicit softmax as in ldm."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ldm's bmm/softmax order rather than SDPA (which differs by ~1e-6): bit-identical to U-ViT on the
        # CPU. The (HW, HW) weights are 4 MiB per image at 256 px (64 MiB at 512), small next to the convs.
        y = self.norm(x)
        q, k, v = self.q(y), self.k(y), self.v(y)  # (B, C, H, W) each
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w))  # (B, HW, HW)
        w_ = torch.softmax(w_ * (int(c) ** (-0.5)), dim=2)  # row i: weights of query position i
        a = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as ldm: (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: `block` (resnets) and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        in_channels: int,
        z_channels: int,
        groups: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, block_in = [], ch
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, groups))
                block_in = ch * mult
            last = i == len(ch_mult) - 1
            levels.append(Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = Mid(block_in, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch*mult, H/2^i, W/2^i)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        out_channels: int,
        z_channels: int,
        groups: int,
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in, groups)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):  # built lowest resolution first ...
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], groups))
                block_in = ch * ch_mult[i]
            levels.insert(0, Level(blocks, Upsample(block_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)  # ... but indexed by level: up.0 is the highest resolution (ldm)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch*mult[i], 2h, 2w) after each upsample
        return self.conv_out(_swish(self.norm_out(h)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """KL-f8 VAE: `encode_moments`, `sample`, `decode` exactly as U-ViT's `FrozenAutoencoderKL`."""

    def __init__(
        self,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        in_channels: int = 3,
        out_channels: int = 3,
        norm_groups: int = 32,
        scale_factor: float = 0.18215,
    ) -> None:
        super().__init__()
        self.config = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            embed_dim=embed_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, in_channels, z_channels, norm_groups)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, out_channels, z_channels, norm_groups)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.scale_factor = float(scale_factor)
        self.weights_sha256: str | None = None
        self.weights_path: str | None = None

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> moments (B, 2*embed_dim, H/8, W/8) = [mean ‖ logvar], unscaled."""
        return self.quant_conv(self.encoder(x))

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Moments -> scaled latents z = scale_factor·(mean + exp(logvar/2)·ε), logvar clamped to [-30, 20]."""
        mean, logvar = moments.chunk(2, dim=1)  # (B, embed_dim, h, w) each
        logvar = logvar.clamp(-30.0, 20.0)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.scale_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(self.encode_moments(x), generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, embed_dim, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        # (1 / s) * z, not z / s: the official expression, so the result is bit-identical.
        return self.decoder(self.post_quant_conv((1.0 / self.scale_factor) * z))


class ChannelsLastDecoder(nn.Module):
    """`AutoencoderKL.decode` on a copy of the decoding half (post_quant_conv, decoder) in channels_last memory
    (NHWC), the layout cuDNN's tensor-core convolutions run without transposes; `sample.vae_channels_last`.
    The same arithmetic as `decode`, so the images agree to fp32 round-off (the kernels differ)."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.post_quant_conv = copy.deepcopy(autoencoder.post_quant_conv).to(
            memory_format=torch.channels_last
        )
        self.decoder = copy.deepcopy(autoencoder.decoder).to(memory_format=torch.channels_last)
        self.scale_factor = autoencoder.scale_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.contiguous(memory_format=torch.channels_last)  # (B, embed_dim, h, w), NHWC in memory
        return self.decoder(self.post_quant_conv((1.0 / self.scale_factor) * z))  # (B, 3, 8h, 8w)

    decode = forward


# --- loading helpers (shared with clip.py) -----------------------------------------------------------------
def _short(keys: list[str], n: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def strict_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load `sd` into `model` (which may live on the meta device) requiring identical keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {_short(missing)}" if missing else "",
            f"unexpected {_short(unexpected)}" if unexpected else "",
        ]
        parts.append(f"shape {_short(shapes, 3)}" if shapes else "")
        raise CheckpointError(f"{what} weights do not fit: " + "; ".join(p for p in parts if p))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


# --- key maps ---------------------------------------------------------------------------------------------
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_LDM = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}


def _num_up_levels(keys: list[str]) -> int:
    levels = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    return max(levels) + 1 if levels else 0


def diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` keys (new or legacy attention names) -> ldm keys; Linear [C,C] -> 1x1 conv."""
    n_up = _num_up_levels(list(sd))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        for old, modern in _LEGACY_ATTN.items():  # pre-2023 uploads
            new = re.sub(rf"\.attentions\.0\.{old}\.", f".attentions.0.{modern}.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # diffusers counts decoder blocks from the lowest resolution, ldm from the highest.
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        new = re.sub(
            r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0|group_norm)\.",
            lambda m: f".mid.attn_1.{_ATTN_LDM[m[1]]}.",
            new,
        )
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def vae_state_dict_from_any(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official U-ViT .pth, SD .ckpt (`state_dict`, `first_stage_model.`, `loss.*`) or diffusers -> ldm keys."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        sd = diffusers_to_ldm(sd)
    return sd


def config_from_state_dict(sd: dict[str, torch.Tensor], norm_groups: int = 32) -> dict:
    """AutoencoderKL sizes read off ldm tensor shapes (so tiny test models and the real one load alike)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        blocks = 1 + max(
            int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))
        )
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        return dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=blocks,
            z_channels=sd["decoder.conv_in.weight"].shape[1],
            embed_dim=sd["post_quant_conv.weight"].shape[0],
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            norm_groups=norm_groups,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"not an SD KL autoencoder state dict (looked for {e}); keys: {_short(list(sd), 4)}"
        ) from None


def build_autoencoder(
    sd: dict[str, torch.Tensor], scale_factor: float = 0.18215, norm_groups: int = 32
) -> AutoencoderKL:
    """Build an AutoencoderKL of the right sizes from any accepted state dict, strict-loading it."""
    sd = vae_state_dict_from_any(sd)
    cfg = config_from_state_dict(sd, norm_groups)
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]
    if any(w % norm_groups for w in widths):
        raise CheckpointError(
            f"autoencoder widths {widths} do not divide into {norm_groups} GroupNorm groups; "
            "a diffusers config.json beside the weights (norm_num_groups) sets another count"
        )
    with torch.device("meta"):
        model = AutoencoderKL(**cfg, scale_factor=scale_factor)
    strict_load(model, sd, what="autoencoder")
    return model
