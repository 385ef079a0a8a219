"""`uvit sample`: seeded, guided, resumable image generation (docs/sampling.md).

generate(model, preset, indices, conditions, uncond, seed=..., autoencoder=..., settings=...)
    -> Iterator[(indices, uint8 (B, H, W, 3))]      the library hook (`uvit fid` streams it)
sample_to_dir(out, SamplerSpec(ckpt=..., preset=..., seed=...), prompts=..., classes=..., n=...)
    -> SampleResult                                   the CLI workflow: PNGs, samples.jsonl, grid, npz
label_conditions("balanced" | "random", seed, K)    each image's class from its index (FID label protocols)
"""

from __future__ import annotations

from uvit_cli.sample.generate import (
    LABEL_PROTOCOLS,
    ConditionFn,
    LabelProtocol,
    SampleSettings,
    balanced_class_conditions,
    check_guidance,
    class_conditions,
    class_label,
    context_conditions,
    decode_latents,
    describe_labels,
    generate,
    image_generators,
    image_seed,
    label_conditions,
    null_condition,
    random_class_conditions,
    sample_latents,
    to_uint8,
    valid_classes,
)
from uvit_cli.sample.resolve import SamplerSpec, load_sampler, pick_run, resolve_model
from uvit_cli.sample.run import SampleProgress, SampleResult, read_prompts_file, sample_to_dir

__all__ = [
    "LABEL_PROTOCOLS",
    "ConditionFn",
    "LabelProtocol",
    "SampleProgress",
    "SampleResult",
    "SamplerSpec",
    "SampleSettings",
    "balanced_class_conditions",
    "check_guidance",
    "class_conditions",
    "class_label",
    "context_conditions",
    "decode_latents",
    "describe_labels",
    "generate",
    "image_generators",
    "image_seed",
    "label_conditions",
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
