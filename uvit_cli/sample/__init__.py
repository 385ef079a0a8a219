"""`uvit sample`: seeded, guided, resumable image generation (docs/sampling.md).

generate(model, preset, indices, conditions, uncond, seed=..., autoencoder=..., settings=...)
    -> Iterator[(indices, uint8 (B, H, W, 3))]      the library hook (`uvit fid` streams it)
sample_to_dir(out, SamplerSpec(ckpt=..., preset=..., seed=...), prompts=..., classes=..., n=...)
    -> SampleResult                                   the CLI workflow: PNGs, samples.jsonl, grid, npz
"""

from __future__ import annotations

from uvit_cli.sample.generate import (
    ConditionFn,
    SampleSettings,
    check_guidance,
    class_conditions,
    context_conditions,
    decode_latents,
    generate,
    image_generators,
    image_seed,
    null_condition,
    random_class_conditions,
    sample_latents,
    to_uint8,
    valid_classes,
)
from uvit_cli.sample.resolve import SamplerSpec, load_sampler, pick_run, resolve_model
from uvit_cli.sample.run import SampleProgress, SampleResult, read_prompts_file, sample_to_dir

__all__ = [
    "ConditionFn",
    "SampleProgress",
    "SampleResult",
    "SamplerSpec",
    "SampleSettings",
    "check_guidance",
    "class_conditions",
    "context_conditions",
    "decode_latents",
    "generate",
    "image_generators",
    "image_seed",
    "load_sampler",
    "null_condition",
    "pick_run",
    "random_class_conditions",
    "read_prompts_file",
    "resolve_model",
    "sample_latents",
    "sample_to_dir",
    "to_uint8",
    "valid_classes",
]
