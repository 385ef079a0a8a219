"""`uvit sample`: images from our checkpoints or the paper's released ones (docs/sampling.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from uvit_cli.cli.common import (
    CLASSES_HELP,
    CfgScaleOpt,
    CkptOpt,
    ClipOpt,
    GuidanceIntervalOpt,
    LabelProtocolName,
    ModelWeightsOpt,
    NoCompileOpt,
    PrecisionOpt,
    PresetOpt,
    SampleBatchOpt,
    SeedOpt,
    SetOption,
    SolverOpt,
    StepsOpt,
    VaeOpt,
    handle_errors,
    image_progress,
    log_rank0,
    option,
    out,
    sampler_spec,
)


@handle_errors
def sample(
    prompt: Annotated[list[str] | None, option("--prompt", "-p", help="Text prompt (repeatable).")] = None,
    prompts_file: Annotated[
        Path | None, option("--prompts-file", help="File of prompts, one per line.")
    ] = None,
    class_: Annotated[
        list[int] | None,
        option("--class", "-c", help="Class index (repeatable), e.g. 207 for ImageNet; --n images of each."),
    ] = None,
    classes: Annotated[
        LabelProtocolName | None,
        option(
            "--classes",
            help=f"{CLASSES_HELP}; --n is then the total. Class-conditional presets take --class or --classes "
            "(no default); `uvit fid --ckpt` uses random.",
        ),
    ] = None,
    n: Annotated[
        int,
        typer.Option(
            "--n", "-n", min=1, help="Images per prompt/class (in total if unconditional or with --classes)."
        ),
    ] = 4,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")] = Path(
        "samples"
    ),
    clip: ClipOpt = None,
    decode_batch_size: Annotated[
        int, typer.Option("--decode-batch-size", min=1, help="Latents per VAE call.")
    ] = 50,
    cuda_graphs: Annotated[
        bool,
        typer.Option("--cuda-graphs", help="CUDA graphs of the network call (compile mode reduce-overhead)."),
    ] = False,
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png (first 256 images).")] = False,
    npz: Annotated[
        bool, typer.Option("--npz", help="Also write samples.npz (arr_0 uint8 NHWC, ADM evaluator).")
    ] = False,
    ckpt: CkptOpt = None,
    preset: PresetOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = None,
    cfg_scale: CfgScaleOpt = None,
    solver: SolverOpt = None,
    guidance_interval: GuidanceIntervalOpt = None,
    batch_size: SampleBatchOpt = None,
    precision: PrecisionOpt = None,
    no_compile: NoCompileOpt = False,
    model_weights: ModelWeightsOpt = "ema",
    vae: VaeOpt = None,
    set_: SetOption = None,
) -> None:
    """Generate images: text prompts, ImageNet classes or unconditional; PNGs named by index.

    After `uvit quickstart`: uvit sample --ckpt quickstart/run --prompt "a red circle at the top left"

    An FID set of a class model: --classes random -n 50000 (the paper's labels) or --classes balanced.
    """
    spec = sampler_spec(
        ckpt=ckpt, preset=preset, seed=seed, steps=steps, cfg_scale=cfg_scale, solver=solver,
        guidance_interval=guidance_interval, batch_size=batch_size, precision=precision, no_compile=no_compile,
        model_weights=model_weights, vae=vae, set_=set_, decode_batch_size=decode_batch_size,
        cuda_graphs=cuda_graphs,
    )  # fmt: skip
    from uvit_cli.sample import read_prompts_file, sample_to_dir

    prompts = list(prompt or [])
    if prompts_file is not None:
        prompts += read_prompts_file(prompts_file)
    bar, progress = _sampling_bar()
    try:
        result = sample_to_dir(
            out_dir, spec, prompts=prompts, classes=list(class_ or []), label_protocol=classes, n=n, clip=clip,
            grid=grid, npz=npz, progress=progress, log=log_rank0,
        )  # fmt: skip
    finally:
        bar.stop()
    if not result.is_main:
        return
    out.print(result.summary())
    for f in result.files:
        out.print(f"wrote {f}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def _sampling_bar() -> tuple[Any, Callable[[Any], None]]:
    """A bar that appears with the first `SampleProgress` (naming the images already there), and its callback."""
    bar = image_progress()
    task = None

    def progress(p: Any) -> None:
        nonlocal task
        if task is None:
            bar.start()
            note = f" ({p.skipped} already there)" if p.skipped else ""
            task = bar.add_task(f"sampling{note}", total=p.total)
        bar.update(task, completed=p.done)

    return bar, progress
