"""Seeded, batched image generation: per-image noise, guidance, solver, decoding, 8-bit images.

The one function other workflows call is `generate` (`uvit fid` streams its batches into Inception
statistics; `uvit sample` writes them as PNGs). Image i draws its initial noise, and any solver noise, from
its own generator seeded from (seed, i) (EDM2's rule), so an image does not depend on the batch size, on
which other images share its batch, or on the number of GPUs.

    settings = SampleSettings.from_preset(preset, cfg_scale=1.0)
    for indices, images in generate(model, preset, range(100), class_conditions(labels),
                                     null_condition(preset), seed=0, settings=settings):
        ...  # images: uint8 numpy (B, H, W, 3), row k is image indices[k]
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, get_args

import numpy as np
import torch

from uvit_cli import solvers
from uvit_cli.config import LabelProtocol, NetworkPrecision, Preset
from uvit_cli.errors import ConfigError, ResourceError
from uvit_cli.resources import fmt_bytes, require_memory
from uvit_cli.schedule import make_schedule

# indices of a batch -> the model's conditioning keywords for those images ({"y": (B,)}, {"context": (B,L,D)}, {})
ConditionFn = Callable[[Sequence[int]], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How to sample; `from_preset` fills what is not given from the preset's [sample] table."""

    solver: str = "dpm_solver_pp"
    steps: int = 50
    cfg_scale: float = 0.0  # official convention: eps = eps_c + s (eps_c - eps_u)
    guidance_interval: tuple[float, float] | None = None  # solver times t in [lo, hi] get guidance
    batch_size: int = 50  # images per network batch (per GPU)
    decode_batch_size: int = 50  # latents per autoencoder call (the official decode_large_batch chunk)
    precision: NetworkPrecision | None = None  # None: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool | None = None  # torch.compile the network; None: on CUDA only (on a CPU it only costs time)
    cuda_graphs: bool = False  # compile with mode="reduce-overhead" (CUDA graphs of the network call)

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> SampleSettings:
        """Explicit (non-None) overrides > preset [sample] > field defaults."""
        s = preset.sample
        base = dict(
            solver=s.solver,
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            guidance_interval=tuple(s.guidance_interval) if s.guidance_interval else None,
            batch_size=s.batch_size,
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown sample settings {sorted(unknown)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        if base.get("guidance_interval") is not None:
            base["guidance_interval"] = tuple(float(v) for v in base["guidance_interval"])
        settings = cls(**base)
        settings.check()
        return settings

    def check(self) -> None:
        if self.solver not in solvers.SOLVERS:
            raise ConfigError(f"unknown solver '{self.solver}' (choose one of {', '.join(solvers.SOLVERS)})")
        if self.steps < 1 or self.batch_size < 1 or self.decode_batch_size < 1:
            raise ConfigError("steps, batch size and decode batch size must be >= 1")
        if not (0 <= self.cfg_scale < float("inf")):  # NaN fails every comparison
            raise ConfigError(
                f"cfg scale must be a finite number >= 0 (official convention), got {self.cfg_scale}"
            )
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ConfigError(f"guidance interval must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")

    def to_dict(self) -> dict[str, Any]:
        """What determines the images (for samples.jsonl and FID stamps); batch sizes do not."""
        d = dataclasses.asdict(self)
        for k in ("batch_size", "decode_batch_size", "compile", "cuda_graphs"):
            d.pop(k)
        d["guidance_interval"] = list(self.guidance_interval) if self.guidance_interval else None
        return d


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
# Conditions


def valid_classes(preset: Preset) -> range:
    """Labels a user may ask for: with condition dropout (p_uncond > 0) the last class is the null class."""
    k = preset.model.num_classes
    return range(k - 1) if preset.train.p_uncond > 0 else range(k)


def class_conditions(labels: Sequence[int] | Mapping[int, int]) -> ConditionFn:
    """Labels per image index (a sequence indexed by image index, or a mapping index -> label)."""

    def fn(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"y": torch.tensor([int(labels[int(i)]) for i in indices], dtype=torch.long)}

    return fn


# How the class of each image of a class-conditional FID set is chosen, by the name recorded in samples.jsonl
# and FID stamps. "random": uniform labels drawn from (seed, index), as U-ViT's official ImageNet FID
# (`sample_label`) and DiT's, SiT's and ADM's FID-50K. "balanced": class = index % K, so N = m K images hold
# m of each class (RAE's and REPA-E's FID-50K: 50 per class); on strong models it reads about 0.1 FID lower
# than random labels, so the protocol is stated beside every number.
LABEL_PROTOCOLS: tuple[str, ...] = get_args(LabelProtocol)


def random_label(seed: int, num_classes: int, index: int) -> int:
    """The uniform label in [0, num_classes) of image `index`, from (seed, index) on a stream of its own."""
    return int(np.random.default_rng(np.random.SeedSequence([seed, int(index), 1])).integers(num_classes))


def class_label(protocol: LabelProtocol, seed: int, num_classes: int, index: int) -> int:
    """The class of image `index` under `protocol` (`LabelProtocol`): a function of the index alone (and the
    seed for "random"), so the set does not depend on batch size, GPU count or resume, and a larger N keeps
    the classes of the first images."""
    if protocol == "balanced":
        return int(index) % num_classes
    if protocol == "random":
        return random_label(seed, num_classes, index)
    raise ConfigError(f"unknown label protocol '{protocol}' (choose one of {', '.join(LABEL_PROTOCOLS)})")


def describe_labels(protocol: LabelProtocol, num_classes: int) -> str:
    """One line for stamps: how the labels of `protocol` over the classes 0..num_classes-1 are made."""
    if protocol == "balanced":
        return f"balanced: class = index % {num_classes} (N/{num_classes} per class when {num_classes} divides N)"
    class_label(protocol, 0, num_classes, 0)  # an unknown protocol is one line
    return f"uniform over 0..{num_classes - 1} from (seed, index)"


def label_conditions(protocol: LabelProtocol, seed: int, num_classes: int) -> ConditionFn:
    """Labels of the real classes 0..num_classes-1 (never the null class) per image index under `protocol`."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    class_label(protocol, seed, num_classes, 0)  # an unknown protocol fails here, not in the first batch

    def fn(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        labels = [class_label(protocol, seed, num_classes, int(i)) for i in indices]
        return {"y": torch.tensor(labels, dtype=torch.long)}

    return fn


def random_class_conditions(seed: int, num_classes: int) -> ConditionFn:
    """Uniform labels in [0, num_classes) per image, drawn from (seed, index) on a stream of their own
    (as the official ImageNet FID's uniform `sample_label`), so they too ignore batching."""
    return label_conditions("random", seed, num_classes)


def balanced_class_conditions(num_classes: int) -> ConditionFn:
    """Class-balanced labels: image i gets class i % num_classes (RAE / REPA-E's 50-per-class FID-50K)."""
    return label_conditions("balanced", 0, num_classes)


def context_conditions(contexts: torch.Tensor, rows: Sequence[int] | Mapping[int, int]) -> ConditionFn:
    """Text contexts: image index i gets `contexts[rows[i]]` (contexts (P, 77, D), e.g. one row per prompt)."""

    def fn(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        sel = torch.tensor([int(rows[int(i)]) for i in indices], dtype=torch.long, device=contexts.device)
        return {"context": contexts.index_select(0, sel)}  # (B, 77, D)

    return fn


def null_condition(preset: Preset, empty_context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The unconditional input of classifier-free guidance (spec §4.2): the null class K-1 for class
    models, CLIP('') (1, 77, D) for text models (pass `text_encoder.encode([''])`), nothing otherwise."""
    cond = preset.model.conditioning
    if cond == "class":
        return {"y": torch.tensor(preset.model.num_classes - 1, dtype=torch.long)}
    if cond == "text":
        if empty_context is None:
            raise ValueError("a text model's null condition is CLIP(''): pass empty_context")
        return {"context": empty_context.reshape(1, *empty_context.shape[-2:])}
    return {}


# --------------------------------------------------------------------------------------------------
# The network call: autocast, compile, guidance


def _autocast_dtype(precision: NetworkPrecision | None, device: torch.device) -> torch.dtype | None:
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def _compiled(settings: SampleSettings, device: torch.device) -> bool:
    """Whether the network call is compiled: as asked, else on CUDA only; CUDA graphs need it."""
    return settings.cuda_graphs or (
        settings.compile if settings.compile is not None else device.type == "cuda"
    )


def sampling_network(
    model: torch.nn.Module, settings: SampleSettings, device: torch.device
) -> Callable[..., torch.Tensor]:
    """model(x, timesteps, **cond) in the chosen precision, returning float32 for the solver."""
    amp = _autocast_dtype(settings.precision, device)
    net: Callable[..., torch.Tensor] = model
    if _compiled(settings, device):
        mode = "reduce-overhead" if settings.cuda_graphs and device.type == "cuda" else None
        net = torch.compile(model, mode=mode, dynamic=False)
    cuda_graphs = settings.cuda_graphs and device.type == "cuda"

    def call(x: torch.Tensor, timesteps: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if cuda_graphs:  # the solver keeps earlier outputs: a new graph step must not overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            raw = net(x, timesteps, **cond)
        out = raw.float()
        return out.clone() if cuda_graphs and out is raw else out

    return call


def check_guidance(preset: Preset, settings: SampleSettings) -> None:
    """Refuse guidance that cannot mean anything: an unconditional model, or one never trained without its condition."""
    if settings.cfg_scale > 0:
        if preset.model.conditioning == "none":
            raise ConfigError("--cfg-scale needs a conditional model; this preset is unconditional")
        if preset.train.p_uncond <= 0:
            raise ConfigError(
                f"--cfg-scale {settings.cfg_scale:g}: preset '{preset.name}' was trained without condition "
                "dropout (train.p_uncond = 0), so it has no unconditional model to guide with; use --cfg-scale 0"
            )


def latent_shape(preset: Preset) -> tuple[int, int, int]:
    m = preset.model
    return (m.in_chans, m.img_size, m.img_size)


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
    """Solver output x_0 (B, C, h, w) float32 for ONE batch of image indices (latents or pixels in [-1, 1])."""
    settings = settings or SampleSettings.from_preset(preset)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_guidance(preset, settings)
    schedule = make_schedule(
        preset.schedule.kind, preset.schedule.num_steps, preset.schedule.beta_min, preset.schedule.beta_max
    )
    net = network or sampling_network(model, settings, device)
    gens = image_generators(seed, indices)
    x_T = torch.stack([torch.randn(latent_shape(preset), generator=g) for g in gens]).to(
        device
    )  # (B, C, h, w)
    cond = {k: v.to(device) for k, v in (conditions(indices) if conditions else {}).items()}
    if settings.cfg_scale > 0:
        if uncond is None:
            raise ValueError("guidance (cfg_scale > 0) needs the unconditional input: pass uncond")
        eps_fn = solvers.guided_eps_fn(
            net,
            settings.cfg_scale,
            cond,
            {k: v.to(device) for k, v in uncond.items()},
            interval=settings.guidance_interval,
            schedule=schedule,
        )
    else:
        eps_fn = solvers.conditional_eps_fn(net, cond)
    return solvers.sample(
        settings.solver, eps_fn, x_T, settings.steps, schedule=schedule, generator=gens
    ).float()


@torch.inference_mode()
def decode_latents(
    autoencoder: torch.nn.Module | None,
    x: torch.Tensor,
    chunk: int = 50,
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
    autoencoder: torch.nn.Module | None = None,
    settings: SampleSettings | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (indices, uint8 images (B, H, W, 3)) for `indices` in batches of `settings.batch_size`;
    `indices` is read a batch at a time (a `range` or a generator of any length holds one batch in memory).

    model: a UViT in eval mode on `device`; conditions: indices -> model keywords (None: unconditional);
    uncond: the guidance input (`null_condition`), needed when cfg_scale > 0; autoencoder: required for
    latent presets, loaded with the preset's scale factor. `progress(n)` is called after each batch with the
    number of images it finished. Images depend only on (seed, index, condition, settings).
    """
    settings = settings or SampleSettings.from_preset(preset)
    settings.check()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if preset.data.space == "latent" and autoencoder is None:
        raise ValueError(f"preset '{preset.name}' samples latents: pass the autoencoder to decode them")
    check_guidance(preset, settings)
    check_batch_memory(preset, settings, device)
    net = sampling_network(model, settings, device)
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
                    autoencoder if preset.data.space == "latent" else None,
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
