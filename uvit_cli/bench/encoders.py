"""The timed encoders of `uvit bench`: `uvit prepare`'s autoencoder and CLIP against the official extraction,
and `uvit fid`'s Inception; random weights of the real sizes, inputs of the real shapes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from uvit_cli import dist
from uvit_cli.bench.measure import Measurement, Timing, count_flops
from uvit_cli.config import Preset
from uvit_cli.errors import ConfigError


def bench_prepare(
    preset: Preset,
    *,
    batch: int = 64,
    captions_per_image: int = 5,
    timing: Timing | None = None,
) -> list[Measurement]:
    """Encoder throughput of `uvit prepare` (VAE moments + CLIP of every caption), random real-size weights.

    Official: one image (and its captions) per call, fp32, each result copied to the host
    (scripts/extract_mscoco_feature.py). Ours: `uvit prepare`'s defaults, the VAE in fp32 on batches of
    `batch` images, CLIP in fp32 on batches of `PrepareSpec.text_batch_size` captions; on CUDA a third row
    runs the VAE under bf16 autocast (`--precision bf16`). Both run torch's CUDA defaults, as `uvit prepare`
    does (`dist.cuda_defaults(tf32=False, autotune=False)`). Image decoding is not timed (DataLoader workers).
    """
    from uvit_cli.encoders import AutoencoderKL, CLIPTextEncoder
    from uvit_cli.encoders.clip import CLIP_L14_TEXT
    from uvit_cli.prepare.run import PrepareSpec

    t = timing or Timing.of("prepare")
    device = t.device
    if preset.data.space != "latent":
        raise ConfigError(f"bench prepare needs a latent preset; '{preset.name}' is pixel-space")
    settings = dist.cuda_defaults(device, tf32=False, autotune=False)
    torch.manual_seed(0)
    vae = AutoencoderKL().to(device).eval()
    text = preset.model.conditioning == "text"
    clip = CLIPTextEncoder(CLIP_L14_TEXT).to(device).eval() if text else None
    res = preset.data.resolution
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    tokens = torch.randint(0, 49406, (batch * captions_per_image, 77), device=device)
    text_batch = PrepareSpec.text_batch_size
    with torch.device("meta"):
        meta_vae = AutoencoderKL()
        flops = count_flops(lambda: meta_vae.encode_moments(torch.randn(batch, 3, res, res)))
        if text:
            meta_clip = CLIPTextEncoder(CLIP_L14_TEXT)
            flops += count_flops(
                lambda: meta_clip(torch.zeros(batch * captions_per_image, 77, dtype=torch.long))
            )

    def official() -> None:
        with torch.no_grad():
            for i in range(batch):
                vae.encode_moments(images[i : i + 1]).cpu()
                if clip is not None:
                    clip(tokens[i * captions_per_image : (i + 1) * captions_per_image]).cpu()

    def ours(precision: str) -> Callable[[], None]:
        def run() -> None:  # as prepare.run._Encoders: images(), then texts()
            with torch.no_grad():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    moments = vae.encode_moments(images)
                moments.float().cpu()
                if clip is not None:
                    for i in range(0, len(tokens), text_batch):
                        clip(tokens[i : i + text_batch]).float().cpu()

        return run

    where = f"fp32, {settings}" if settings else "fp32"
    rows = [
        ("official", official, f"1 image per call, {where}"),
        ("uvit", ours("fp32"), f"batched, {where} (uvit prepare's defaults)"),
    ]
    if device.type == "cuda":  # bf16 convolutions on a CPU are ~140x slower than fp32 (docs/data.md)
        rows.append(("uvit --precision bf16", ours("bf16"), "batched, VAE under bf16 autocast, CLIP fp32"))
    results: list[Measurement] = []
    for name, fn, note in rows:
        t.say(f"prepare / {name}")
        t.add(results, t.measure("prepare", name, fn, batch=batch, flops=flops, note=note))
    return results


def bench_fid(*, batch: int = 200, timing: Timing | None = None) -> list[Measurement]:
    """Inception feature throughput at 299x299 (random weights of the real FID Inception), as `uvit fid`
    extracts: fp32 with TF32 off (`exact_fp32`), cuDNN autotuning (`dist.cuda_defaults(tf32=False)`)."""
    from uvit_cli.fid.features import exact_fp32
    from uvit_cli.inception import FIDInception

    t = timing or Timing.of("fid")
    device = t.device
    settings = "cuDNN autotuning" if dist.cuda_defaults(device, tf32=False) else ""
    net = FIDInception().to(device).eval()
    x = torch.rand(batch, 3, 299, 299, device=device) * 255
    with torch.device("meta"):
        meta = FIDInception()
        flops = count_flops(lambda: meta(torch.rand(batch, 3, 299, 299)))

    def run() -> None:
        with torch.no_grad(), exact_fp32():
            net(x)

    t.say("fid / uvit")
    note = "fp32, TF32 off (exact_fp32)" + (f"; {settings}" if settings else "")
    rows: list[Measurement] = []
    t.add(rows, t.measure("fid", "uvit", run, batch=batch, flops=flops, note=note))
    return rows
