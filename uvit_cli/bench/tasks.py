"""The timed tasks of `uvit bench` that run the network: the real training step and generator, each built from
a preset with random weights of the real size and inputs of the real shapes, our recipe beside the official
one (bench/recipes.py). The encoders are timed in bench/encoders.py, the device in bench/device.py;
`uvit_cli.bench.run_bench` picks a task and wraps the result in a report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uvit_cli import dist
from uvit_cli.bench.measure import Measurement, Timing, count_flops
from uvit_cli.bench.recipes import OFFICIAL, OURS, Recipe, apply_attention, for_device, official_ema_update
from uvit_cli.config import ModelConfig, NetworkPrecision, Preset
from uvit_cli.data import to_model
from uvit_cli.model import UViT

if TYPE_CHECKING:
    from uvit_cli.sample.generate import Decoder
    from uvit_cli.sample.settings import SampleSettings

_PRECISION: dict[str | None, NetworkPrecision] = {"fp16": "fp16", "bf16": "bf16", None: "fp32"}  # recipe.amp


def use_recipe_settings(r: Recipe, device: torch.device) -> None:
    """The CUDA settings a recipe's code base runs with: ours `dist.cuda_defaults`, the official torch's."""
    dist.cuda_defaults(device, tf32=r.tuned, autotune=r.tuned)


def conditions(model: ModelConfig, batch: int, device: torch.device, g: torch.Generator) -> tuple[dict, dict]:
    """Random conditions of the real shapes, and the matching null condition (for CFG), on `device`."""
    from uvit_cli.sample.conditions import example_conditions

    cond, null = example_conditions(model, batch, g)
    return {k: v.to(device) for k, v in cond.items()}, {k: v.to(device) for k, v in null.items()}


def network(model: ModelConfig, device: torch.device, official: bool) -> UViT:
    """The network of the [model] table with seed-0 weights, its attention the official or ours."""
    torch.manual_seed(0)
    return apply_attention(UViT(**model).to(device), official)


def forward_flops(m: ModelConfig, batch: int) -> int:
    """FLOPs of one forward of the network at `batch`, counted on the meta device (no memory, no time)."""
    from uvit_cli.sample.conditions import example_conditions

    with torch.device("meta"):
        net = UViT(**m.model_dump())
        x = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
        cond, _ = example_conditions(m, batch)
        return count_flops(lambda: net(x, torch.ones(batch), **cond))


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def each_recipe(task: str, recipes: Sequence[Recipe], t: Timing) -> Iterator[tuple[Recipe, Recipe]]:
    """(recipe, what it becomes on `t.device`) one at a time, with its code base's CUDA settings set; the
    device's cached memory is freed after each (the caller drops its step first)."""
    for recipe in recipes:
        t.say(f"{task} / {recipe.name}")
        r = for_device(recipe, t.device)
        use_recipe_settings(r, t.device)
        yield recipe, r
        free_memory(t.device)


# --------------------------------------------------------------------------------------------------
# Training


def bench_train(
    preset: Preset,
    *,
    batch: int | None = None,
    recipes: Sequence[Recipe] = (OFFICIAL, OURS),
    data_dir: str | Path | None = None,
    timing: Timing | None = None,
) -> list[Measurement]:
    """Images/s of full training steps (noising, forward, backward, optimiser, EMA) for each recipe; with
    `data_dir`, every step takes its batch from the loader `uvit train` builds over that prepared folder,
    and the note says how long the steps waited for it. `timing.on_row` gets each row as soon as it is
    measured."""
    t = timing or Timing.of("train")
    device = t.device
    batch = batch or preset.train.batch_size
    m = preset.model
    latent = preset.data.space == "latent"
    g = torch.Generator().manual_seed(0)
    # Stored moments (mean | logvar) for latent data sets, pixels in [-1, 1] otherwise.
    x = torch.randn(batch, m.in_chans * (2 if latent else 1), m.img_size, m.img_size, generator=g).to(device)
    cond, null = conditions(preset.model, batch, device, g)
    flops = 3 * forward_flops(preset.model, batch)

    results: list[Measurement] = []
    for recipe, r in each_recipe("train", recipes, t):
        feed = data_feed(preset, data_dir, batch, device) if data_dir is not None else None
        step = make_train_step(r, preset, {"x": x, **cond}, null, device, feed)
        row = t.measure(
            "train", recipe.name, step, batch=batch, flops=flops, note=recipe_note(r, preset, device)
        )
        if feed is not None:
            wait = feed.waited / (t.steps + t.warmup)  # the warm-up steps' waits count too: an upper bound
            share = min(wait * 1e3 / row.ms_per_step, 1)
            row.note += f"; data {data_dir}: waited {wait * 1e3:.1f} ms/step ({share:.0%})"
        t.add(results, row)
        del step  # before each_recipe frees the device's cached memory
    return results


def data_feed(preset: Preset, root: str | Path, batch: int, device: torch.device) -> Any:
    """`uvit train`'s loader over a prepared folder, as timed batches (epoch after epoch)."""
    from uvit_cli.data import FeatureDataset, ResumableSampler, TimedBatches, make_loader
    from uvit_cli.train.rundir import check_data_fits

    tc = preset.train
    ds = FeatureDataset(root, "train", seed=tc.seed)
    check_data_fits(preset, ds)
    sampler = ResumableSampler(len(ds), batch, seed=tc.seed, with_epoch=True)
    return TimedBatches(make_loader(ds, sampler, batch, tc.num_workers, device.type == "cuda"), sampler)


def make_train_step(
    r: Recipe,
    preset: Preset,
    batch: dict[str, torch.Tensor],
    null: dict[str, torch.Tensor],
    device: torch.device,
    feed: Any = None,
) -> Callable[[], None]:
    """One full training step of recipe `r` (`uvit train`'s `train_step`) over a fresh model, optimiser, EMA;
    on `batch`, or on the next batch of `feed` (TimedBatches) each step."""
    from uvit_cli.train.step import Levers, ema_update, setup_step, train_step

    model = network(preset.model, device, r.official_attention).train()
    state, _ = setup_step(
        preset,
        model,
        device,
        amp_dtype=r.amp_dtype,
        compile=r.compile,
        fused=r.fused_adamw,
        warmup_steps=0,  # every timed step runs at the preset's lr
        uncond=null,
        ema_fn=official_ema_update if r.name == OFFICIAL.name else ema_update,
        levers=Levers("autocast" if r.stream else "fp32", r.attention, r.compile_mode, r.fp8),
    )
    gen = torch.Generator(device).manual_seed(0)
    n = len(batch["x"])

    def step() -> None:
        b = batch if feed is None else to_model(next(feed), device)
        train_step(state, [(b, state.objective.draw(gen, n))], n_micro=1, share=n)

    return step


def attention_kernel(r: Recipe, preset: Preset, device: torch.device) -> str:
    """The SDPA kernel family (forward/backward) that the preset's attention shape dispatches to under recipe
    `r`'s dtype and kernel order (`uvit bench attention` reads it the same way), at batch 1."""
    from uvit_cli.bench.device import attention_shape, op_families
    from uvit_cli.model import attention_kernels

    _, H, T, Dh = attention_shape(preset.model, 1)
    dtype = torch.float32 if r.official_attention else (r.amp_dtype or torch.float32)
    q, k, v = (torch.randn(1, H, T, Dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    with attention_kernels(r.attention, device):
        fwd, bwd = op_families(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    return f"{fwd}/{bwd}"


def recipe_note(r: Recipe, preset: Preset | None = None, device: torch.device | None = None) -> str:
    """The recipe's switches in words; on CUDA with `preset`, the SDPA kernel its attention runs."""
    parts = [r.amp or "fp32", "fp32 attention" if r.official_attention else "SDPA in autocast dtype"]
    if r.compile:
        parts.append("compiled")
    if r.cuda_graphs:
        parts.append("CUDA graphs")
    if r.tuned:
        parts.append("TF32 matmuls, cuDNN autotuning")
    levers = {"bf16 stream": r.stream, "cuDNN attention first": r.attention == "cudnn", r.compile_mode:
              r.compile_mode != "default", "FP8 linears": r.fp8, "channels_last VAE": r.vae_channels_last}  # fmt: skip
    parts += [name for name, on in levers.items() if on]
    if preset is not None and device is not None and device.type == "cuda":
        parts.append(f"SDPA {attention_kernel(r, preset, device)}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Sampling


def bench_sample(
    preset: Preset,
    *,
    batch: int | None = None,
    solver_steps: int | None = None,
    decode: bool = True,
    recipes: Sequence[Recipe] = (OFFICIAL, OURS),
    timing: Timing | None = None,
) -> list[Measurement]:
    """Images/s of sampling with the preset's solver and guidance, VAE decoding included (latent presets).

    Ours runs `sample.generate` (the code `uvit sample` runs) with the settings `SampleSettings.from_preset`
    makes (the guidance rule included); the official recipe calls the network twice per step (cond, then
    uncond) under fp16 autocast with fp32 attention.
    """
    from uvit_cli.sample.settings import SampleOptions, SampleSettings

    t = timing or Timing.of("sample")
    device = t.device
    settings = SampleSettings.from_preset(preset, SampleOptions(steps=solver_steps, batch_size=batch))
    batch = settings.batch_size
    m = preset.model
    g = torch.Generator().manual_seed(0)
    cond, null = conditions(preset.model, batch, device, g)
    vae = None
    decode_flops = 0
    if preset.data.space == "latent" and decode:
        from uvit_cli.encoders import AutoencoderKL

        assert preset.autoencoder is not None
        torch.manual_seed(0)
        vae = AutoencoderKL(scale_factor=preset.autoencoder.scale_factor).to(device).eval()
        with torch.device("meta"):
            meta_vae = AutoencoderKL()
            z = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
            decode_flops = count_flops(lambda: meta_vae.decode(z))
    passes = 2 if settings.cfg_scale > 0 else 1
    flops = settings.steps * passes * forward_flops(preset.model, batch) + decode_flops

    results: list[Measurement] = []
    for recipe, r in each_recipe("sample", recipes, t):
        run = make_sample_run(r, preset, settings, cond, null, vae, device)
        note = recipe_note(r, preset, device)
        note += ", batched CFG" if r.batched_cfg and settings.cfg_scale > 0 else ""
        t.add(results, t.measure("sample", recipe.name, run, batch=batch, flops=flops, note=note))
        del run  # before each_recipe frees the device's cached memory
    return results


def make_sample_run(
    r: Recipe,
    preset: Preset,
    settings: SampleSettings,
    cond: dict[str, torch.Tensor],
    null: dict[str, torch.Tensor],
    vae: Decoder | None,
    device: torch.device,
) -> Callable[[], None]:
    """Sampling (and decoding) of one batch of `settings.batch_size` with recipe `r`, as a closure over a
    fresh network: `sample.generate` with the recipe's precision and compiling, or the official code's loop."""
    from uvit_cli import solvers
    from uvit_cli.sample.generate import (
        decode_latents,
        generate,
        sample_latents,
        sampling_network,
        sampling_schedule,
        to_uint8,
    )

    m = preset.model
    batch = settings.batch_size
    model = network(preset.model, device, r.official_attention).eval()
    if r.batched_cfg:  # the code `uvit sample` runs
        ours = dataclasses.replace(
            settings,
            precision=_PRECISION[r.amp],
            compile=r.compile,
            cuda_graphs=r.cuda_graphs,
            stream_dtype="autocast" if r.stream else "fp32",
            attention=r.attention,
            compile_mode=r.compile_mode,
            vae_channels_last=r.vae_channels_last,
        )

        def conditions(idx: Any) -> dict[str, torch.Tensor]:
            return {k: v[: len(idx)] for k, v in cond.items()}

        if vae is None and preset.data.space == "latent":  # --no-decode: the solver only (generate decodes)
            ours_net = sampling_network(model, ours, device)

            def solve() -> None:
                sample_latents(model, preset, range(batch), conditions, null, settings=ours, network=ours_net)

            return solve

        def run() -> None:
            for _ in generate(model, preset, range(batch), conditions, null, autoencoder=vae, settings=ours):
                pass

        return run

    amp = r.amp_dtype
    scale = settings.cfg_scale
    tc = preset.train
    schedule = sampling_schedule(preset.schedule, objective=tc.objective, time_shift=tc.time_shift)
    uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in null.items()}

    def net(x: torch.Tensor, t: torch.Tensor, **c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(x, t, **c).float()

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_c = net(x, t, **cond)
        if scale == 0:
            return eps_c
        return eps_c + scale * (eps_c - net(x, t, **uncond))  # two passes, as the official cfg_nnet

    def run_official() -> None:
        with torch.no_grad():
            x_T = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=device)
            model_fn = solvers.model_fn_for(tc.objective, eps_fn, schedule)  # identity for eps, the paper's
            x = solvers.sample(settings.solver, model_fn, x_T, settings.steps, schedule=schedule)
            to_uint8(decode_latents(vae, x, 50, "fp16" if device.type == "cuda" else "fp32"))

    return run_official
