"""`uvit sample`: seeded, guided, resumable image generation (docs/sampling.md).

SampleSettings.from_preset(preset, SampleOptions(steps=..., cfg_scale=...)) -> SampleSettings
    what to sample with: explicit option > preset [sample] > default, and the model's objective (eps, v,
    flow) from its preset; checked once (the guidance rule and the solver against the objective included)
generate(model, preset, indices, conditions, uncond, seed=..., autoencoder=..., settings=...)
    -> Iterator[(indices, uint8 (B, H, W, 3))]      THE sampling function (sample, fid, training, bench)
sample_to_dir(out, SamplerSpec(ckpt=..., preset=..., seed=..., settings=SampleOptions(...)), prompts=..., n=...)
    -> SampleResult                                   the CLI workflow: PNGs, samples.jsonl, grid, npz
label_conditions("balanced" | "random", seed, K)    each image's class from its index (FID label protocols)

Modules: `settings` (options, settings, guidance rule), `conditions` (per-index conditions, the null
condition), `generate` (seeds, schedule, network call, solver, decoding, uint8), `resolve` (checkpoint and
preset to a model), `plan` and `run` (the `uvit sample` workflow), `outputs` (what it writes).
"""

from __future__ import annotations

from uvit_cli.config import LabelProtocol
from uvit_cli.sample.conditions import (
    LABEL_PROTOCOLS,
    ConditionFn,
    balanced_class_conditions,
    class_conditions,
    class_label,
    context_conditions,
    describe_labels,
    example_conditions,
    label_conditions,
    null_condition,
    random_class_conditions,
    valid_classes,
)
from uvit_cli.sample.generate import (
    decode_latents,
    generate,
    image_generators,
    image_seed,
    sample_latents,
    sampling_schedule,
    to_uint8,
)
from uvit_cli.sample.plan import read_prompts_file
from uvit_cli.sample.resolve import SamplerSpec, load_sampler, pick_run, resolve_model
from uvit_cli.sample.run import SampleProgress, SampleResult, sample_to_dir
from uvit_cli.sample.settings import SampleOptions, SampleSettings, guidance_refusal

__all__ = [
    "LABEL_PROTOCOLS",
    "ConditionFn",
    "LabelProtocol",
    "SampleOptions",
    "SampleProgress",
    "SampleResult",
    "SampleSettings",
    "SamplerSpec",
    "balanced_class_conditions",
    "class_conditions",
    "class_label",
    "context_conditions",
    "decode_latents",
    "describe_labels",
    "example_conditions",
    "generate",
    "guidance_refusal",
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
    "sampling_schedule",
    "to_uint8",
    "valid_classes",
]
