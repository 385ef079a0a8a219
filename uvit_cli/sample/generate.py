"""Seeded, batched image generation: per-image noise, guidance, the objective's adapter, solver, decoding,
8-bit images.

`generate` is the one sampling function: `uvit sample` writes its batches as PNGs, `uvit fid --ckpt` and
training's FID stream them into Inception statistics, training's sample grids tile them, `uvit bench sample`
times it. Image i draws its initial noise, and any solver noise, from its own generator seeded from (seed, i)
(EDM2's rule), so an image does not depend on the batch size, on which other images share its batch, or on
the number of GPUs. What the network predicts (eps, v or a flow velocity) is its preset's train.objective,
carried by the settings: the same call samples every model, with no option for it.

    settings = SampleSettings.from_preset(preset, SampleOptions(cfg_scale=1.0))
    for indices, images in generate(model, preset, range(100), class_conditions(labels),
                                     null_condition(preset.model), seed=0, settings=settings):
        ...  # images: uint8 numpy (B, H, W, 3), row k is image indices[k]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from uvit_cli import solvers
from uvit_cli.config import ModelConfig, NetworkPrecision, ObjectiveName, Preset, ScheduleConfig
from uvit_cli.errors import ResourceError
from uvit_cli.model import attention_kernels, set_autocast_stream
from uvit_cli.resources import fmt_bytes, require_memory
from uvit_cli.sample.conditions import ConditionFn
from uvit_cli.sample.settings import DECODE_BATCH_SIZE, SampleSettings
from uvit_cli.schedule import NoiseSchedule, make_schedule


class Decoder(Protocol):
    """What decodes a latent preset's samples: `encoders.AutoencoderKL` loaded at the preset's scale factor."""

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# Per-image seeds


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image `index`: numpy's SeedSequence hash of (seed, index), stable across versions."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image (CPU draws are the same on every machine; the noise is moved after)."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


# --------------------------------------------------------------------------------------------------
# The schedule and the network call: autocast, compile


def sampling_schedule(
    schedule: ScheduleConfig, *, objective: ObjectiveName = "eps", time_shift: float | None = None
) -> NoiseSchedule:
    """The solvers' noise schedule of a preset: its [schedule] table for eps and v models, the linear path
    (`FlowSchedule(time_shift)`) for flow models (train.objective, train.time_shift). The one place it is
    built from a preset's tables."""
    return make_schedule(
        schedule.kind,
        schedule.num_steps,
        schedule.beta_min,
        schedule.beta_max,
        objective=objective,
        time_shift=time_shift,
    )


def check_settings_fit(preset: Preset, settings: SampleSettings) -> None:
    """ValueError when `settings` were made for a model of another objective or time shift than `preset`'s
    (make them with `SampleSettings.from_preset(preset)`): the solver would integrate the wrong prediction."""
    t = preset.train
    shift = t.time_shift if t.objective == "flow" else None
    if (settings.objective, settings.time_shift) != (t.objective, shift):
        raise ValueError(
            f"these sampling settings are for a model with objective {settings.objective!r} (time shift "
            f"{settings.time_shift}), but preset {preset.name!r} has {t.objective!r} ({shift}): make them "
            "with SampleSettings.from_preset(preset)"
        )


def _autocast_dtype(precision: NetworkPrecision | None, device: torch.device) -> torch.dtype | None:
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _compiled(settings: SampleSettings, device: torch.device) -> bool:
    """Whether the network call is compiled: as asked, else on CUDA only; CUDA graphs need it."""
    return settings.cuda_graphs or (
        settings.compile if settings.compile is not None else device.type == "cuda"
    )


def compile_mode(mode: str, cuda_graphs: bool) -> str | None:
    """torch.compile's mode for the network: CUDA graphs ("reduce-overhead") and the autotuning mode
    (`sample.compile_mode`) combine into "max-autotune", which does both."""
    if mode == "default":
        return "reduce-overhead" if cuda_graphs else None
    return "max-autotune" if cuda_graphs else mode


def sampling_network(
    model: torch.nn.Module, settings: SampleSettings, device: torch.device
) -> Callable[..., torch.Tensor]:
    """model(x, timesteps, **cond) in the chosen precision, returning float32 for the solver."""
    amp = _autocast_dtype(settings.precision, device)
    set_autocast_stream(model, settings.stream_dtype == "autocast")
    net: Callable[..., torch.Tensor] = model
    cuda_graphs = settings.cuda_graphs and device.type == "cuda"
    if _compiled(settings, device):
        net = torch.compile(model, mode=compile_mode(settings.compile_mode, cuda_graphs), dynamic=False)

    def call(x: torch.Tensor, timesteps: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if cuda_graphs:  # the solver keeps earlier outputs: a new graph step must not overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        amp_on = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
        with amp_on, attention_kernels(settings.attention, device):
            raw = net(x, timesteps, **cond)
        out = raw.float()
        return out.clone() if cuda_graphs and out is raw else out

    return call


def latent_shape(model: ModelConfig) -> tuple[int, int, int]:
    """(C, h, w) of the solver's x: the network's input."""
    return (model.in_chans, model.img_size, model.img_size)


def image_side(preset: Preset) -> int:
    """Height (= width) of the 8-bit images: the latent side times the autoencoder's 8, or the pixel side."""
    return preset.model.img_size * (8 if preset.data.space == "latent" else 1)


def effective_precision(settings: SampleSettings, device: torch.device) -> dict[str, str]:
    """The arithmetic that makes the pixels on `device`: the network's autocast and the decoder's (fp16 on
    CUDA unless fp32 is asked for, as `decode_latents`)."""
    amp = _autocast_dtype(settings.precision, device)
    network = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp]
    decode = "fp16" if device.type == "cuda" and settings.precision != "fp32" else "fp32"
    return {"network": network, "decode": decode}


# Decoding one image holds about this many float32 values per output pixel at its peak (KL-f8 decoder: 128
# channels at full resolution, several live at once). Measured: 272 MiB per 256x256 image on the CPU.
DECODE_FLOATS_PER_PIXEL = 1088


def batch_memory_bytes(preset: Preset, settings: SampleSettings, *, decode: bool = True) -> int:
    """Peak memory of one batch beyond the loaded weights: the network's activations (the long skips kept,
    one block's qkv, MLP and attention scores; twice the batch under guidance) and the decoder's chunk.
    Measured on the CPU: 420 MiB for cifar10_uvit_s2 at batch 32 (estimate 417 MiB)."""
    m = preset.model
    b = settings.batch_size * (2 if settings.cfg_scale > 0 else 1)
    extras = 1 + (m.num_clip_token if m.clip_dim else 1 if m.num_classes > 0 else 0)
    t = extras + (m.img_size // m.patch_size) ** 2
    hidden = int(m.mlp_ratio * m.embed_dim)
    per_image = t * m.embed_dim * (m.depth // 2 + 12) + t * hidden + m.num_heads * t * t
    need = 4 * b * per_image
    if decode and preset.data.space == "latent":
        chunk = min(settings.decode_batch_size, settings.batch_size)
        need += 4 * DECODE_FLOATS_PER_PIXEL * chunk * image_side(preset) ** 2
    return need


# --------------------------------------------------------------------------------------------------
# Sampling, decoding, 8-bit conversion


@torch.inference_mode()
def sample_latents(
    model: torch.nn.Module,
    preset: Preset,
    indices: Sequence[int],
    conditions: ConditionFn | None = None,
    uncond: Mapping[str, torch.Tensor] | None = None,
    *,
    seed: int = 0,
    settings: SampleSettings | None = None,
    device: torch.device | str | None = None,
    network: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Solver output x_0 (B, C, h, w) float32 for ONE batch of image indices (latents or pixels in [-1, 1]).

    The network's output is read as the preset's train.objective says (`solvers.model_fn_for`): eps as it
    is, v converted to eps for the VP solvers, a flow model's velocity for the flow solvers on its
    `FlowSchedule`."""
    settings = settings or SampleSettings.from_preset(preset)
    check_settings_fit(preset, settings)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    schedule = sampling_schedule(
        preset.schedule, objective=settings.objective, time_shift=settings.time_shift
    )
    net = network or sampling_network(model, settings, device)
    gens = image_generators(seed, indices)
    shape = latent_shape(preset.model)
    x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)  # (B, C, h, w)
    cond = {k: v.to(device) for k, v in (conditions(indices) if conditions else {}).items()}
    # Guidance acts on the raw output (eps, v or velocity: the rule is linear in it), then the adapter.
    if settings.cfg_scale > 0:
        if uncond is None:
            raise ValueError("guidance (cfg_scale > 0) needs the unconditional input: pass uncond")
        net_fn = solvers.guided_eps_fn(
            net,
            settings.cfg_scale,
            cond,
            {k: v.to(device) for k, v in uncond.items()},
            interval=settings.guidance_interval,
            schedule=schedule,
        )
    else:
        net_fn = solvers.conditional_eps_fn(net, cond)
    model_fn = solvers.model_fn_for(settings.objective, net_fn, schedule)
    return solvers.sample(
        settings.solver, model_fn, x_T, settings.steps, schedule=schedule, generator=gens
    ).float()


@torch.inference_mode()
def decode_latents(
    autoencoder: Decoder | None,
    x: torch.Tensor,
    chunk: int = DECODE_BATCH_SIZE,
    precision: NetworkPrecision | None = None,
) -> torch.Tensor:
    """Latents -> images in [-1, 1] (B, 3, H, W) float32, `chunk` at a time (`autoencoder.decode` divides by
    the scale factor it was loaded with: the preset's, spec §9.1). Pixel models (`autoencoder=None`) pass through.

    On CUDA the decoder runs under fp16 autocast as the official eval scripts' decode_large_batch (spec §4.3),
    unless precision is "fp32"."""
    if autoencoder is None:
        return x.float()
    amp = None
    if x.device.type == "cuda" and precision != "fp32":
        amp = torch.float16
    outs = []
    for z in x.split(chunk):
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outs.append(autoencoder.decode(z).float())  # (b, 3, H, W)
    return torch.cat(outs)


class _DecodeWith:
    """A Decoder over a decoding callable (a compiled `ChannelsLastDecoder`)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def decoding_network(
    autoencoder: Decoder | None, settings: SampleSettings, device: torch.device
) -> Decoder | None:
    """What decodes: the autoencoder as it is, or with `settings.vae_channels_last` a channels_last copy of
    its decoder (NHWC: cuDNN's tensor-core convolutions take it without transposes), compiled on CUDA."""
    if autoencoder is None or not settings.vae_channels_last:
        return autoencoder
    from uvit_cli.encoders.autoencoder import AutoencoderKL, ChannelsLastDecoder

    if not isinstance(autoencoder, AutoencoderKL):  # another Decoder (a stand-in) has no decoder to copy
        return autoencoder
    decoder = ChannelsLastDecoder(autoencoder)
    if device.type != "cuda":
        return decoder
    return _DecodeWith(torch.compile(decoder))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 numpy (B, H, W, 3): clamp(0.5 (v + 1), 0, 1) (spec §4.3), then as
    torchvision's save_image: x * 255 + 0.5, clamped, truncated to uint8."""
    x = (0.5 * (images.float() + 1.0)).clamp(0.0, 1.0)
    x = (x * 255.0 + 0.5).clamp(0.0, 255.0).to(torch.uint8)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def check_batch_memory(preset: Preset, settings: SampleSettings, device: torch.device) -> None:
    """Refuse, before anything is allocated, a batch that cannot fit in this machine's memory (`resources`,
    the one estimate). On the CPU only: a GPU's memory is its own, and there `generate` turns an
    out-of-memory error into the same one line."""
    if device.type == "cpu":
        require_memory(
            f"sampling a batch of {settings.batch_size} images",
            batch_memory_bytes(preset, settings),
            fix="pass a smaller --batch-size",
        )


def generate(
    model: torch.nn.Module,
    preset: Preset,
    indices: Iterable[int],
    conditions: ConditionFn | None = None,
    uncond: Mapping[str, torch.Tensor] | None = None,
    *,
    seed: int = 0,
    autoencoder: Decoder | None = None,
    settings: SampleSettings | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (indices, uint8 images (B, H, W, 3)) for `indices` in batches of `settings.batch_size`;
    `indices` is read a batch at a time (a `range` or a generator of any length holds one batch in memory).

    model: a UViT in eval mode on `device`; conditions: indices -> model keywords (None: unconditional);
    uncond: the guidance input (`null_condition`), needed when cfg_scale > 0; autoencoder: required for
    latent presets, loaded with the preset's scale factor; settings: `SampleSettings.from_preset` (None: the
    preset's own), which has checked them, the solver against the objective and the guidance rule.
    `progress(n)` is called after each batch with the number of images it finished. Images depend only on
    (seed, index, condition, settings).
    """
    settings = settings or SampleSettings.from_preset(preset)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if preset.data.space == "latent" and autoencoder is None:
        raise ValueError(f"preset '{preset.name}' samples latents: pass the autoencoder to decode them")
    check_batch_memory(preset, settings, device)
    net = sampling_network(model, settings, device)
    decoder = decoding_network(autoencoder, settings, device) if preset.data.space == "latent" else None
    bs = settings.batch_size
    # Indices are taken a batch at a time, so a plan of any length holds one batch of them.
    # A compiled network is specialised to the batch shape (dynamic=False): a last partial batch would compile
    # (and with CUDA graphs record) it all again. Pad it with copies of its last index instead and drop them;
    # rows do not interact and each has its own generator, so the kept rows are the same images. A partial
    # first batch is the only batch: nothing was compiled for the full size, so it runs as it is.
    compiled = _compiled(settings, device)
    stream = iter(indices)
    for start in itertools.count(0, bs):
        batch = [int(i) for i in itertools.islice(stream, bs)]
        if not batch:
            return
        pad = compiled and start > 0
        run = batch + [batch[-1]] * (bs - len(batch)) if pad else batch
        try:
            x = sample_latents(model, preset, run, conditions, uncond, seed=seed, settings=settings,
                               device=device, network=net)[: len(batch)]  # fmt: skip
            images = to_uint8(
                decode_latents(
                    decoder,
                    x,
                    settings.decode_batch_size,
                    settings.precision,
                )
            )
        except torch.OutOfMemoryError:
            need = fmt_bytes(batch_memory_bytes(preset, settings))
            raise ResourceError(
                f"a batch of {bs} images (about {need} beyond the weights) does not fit in the memory of "
                f"{device}: pass a smaller --batch-size"
            ) from None
        if progress is not None:
            progress(len(batch))
        yield batch, images
