"""`uvit fid SAMPLES REF.npz` (default: compare), `uvit fid --ckpt PATH --n N REF.npz` (generate: FID straight
from a checkpoint) and `uvit fid ref IMAGES --out REF.npz`; `--metrics` picks the numbers on each."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uvit_cli.cli.common import (
    CfgScaleOpt,
    CkptOpt,
    ClassesOpt,
    DeviceOpt,
    GuidanceIntervalOpt,
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
    describe_os_error,
    fail,
    handle_errors,
    image_progress,
    log_rank0,
    option,
    out,
    sampler_spec,
    warn,
)
from uvit_cli.cli.fid_route import FidGroup
from uvit_cli.cli.fid_route import route as route
from uvit_cli.config import FidMode
from uvit_cli.fileio import check_outputs

if TYPE_CHECKING:
    from uvit_cli.fid.result import FidResult

_REF_HELP = (
    "Reference .npz: mu/sigma (fid), mu_s/sigma_s (sfid), pool_features or arr_0 images (pr); made by "
    "`uvit fid ref`, U-ViT's fid_stats, an ADM reference batch."
)
fid_app = typer.Typer(
    cls=FidGroup,
    no_args_is_help=True,
    help=(
        "FID with clean-fid's protocols and the ADM evaluator's table (IS, FID, sFID, precision, recall), with a "
        "local Inception (never downloads).\n\n"
        "uvit fid SAMPLES REF.npz [--metrics fid,sfid,is,pr,clip|all]  measures a folder or .npz of images "
        "against a reference;\n\n"
        "uvit fid --ckpt PATH --n N REF.npz  generates from a checkpoint and measures on the fly (no PNGs);\n\n"
        "uvit fid ref IMAGES --out REF.npz [--metrics ...]  makes a reference;\n\n"
        "uvit fid pack FOLDER --out SAMPLES.npz  writes an ADM sample batch for openai's evaluator.py."
    ),
)

RefArg = Annotated[Path, typer.Argument(help=_REF_HELP)]
ImagesArg = Annotated[Path, typer.Argument(help="Folder of images, or .npz with uint8 NHWC images in arr_0.")]
NoJsonOpt = Annotated[bool, typer.Option("--no-json", help="Do not write the stamp file.")]
ModeOpt = Annotated[
    FidMode | None,
    option(
        "--mode",
        help="clean (clean-fid), legacy_pytorch (pytorch-fid: U-ViT's paper numbers), legacy_tensorflow (TF "
        "graph's resize: ADM's evaluator). Default: legacy_tensorflow when --metrics asks for sfid, is or pr "
        "(they are ADM's numbers and need it), else clean.",
    ),
]
MetricsOpt = Annotated[
    str,
    option(
        "--metrics",
        help="Comma list of fid (default), sfid, is (Inception Score), pr (precision and recall, k=3), clip "
        "(CLIP score, text-to-image); all = fid,sfid,is,pr, the ADM evaluator's table (DiT, SiT, REPA, RAE). "
        "One Inception pass gives them all.",
    ),
]
ClipModelOpt = Annotated[
    str | None,
    option(
        "--clip-model",
        help="CLIP ViT-L/14 (both towers) for --metrics clip: a path or hub id (default: $UVIT_CLIP, then the "
        "Hugging Face cache of openai/clip-vit-large-patch14).",
    ),
]
InceptionWeightsOpt = Annotated[
    Path | None,
    option(
        "--inception-weights",
        help="FID Inception weights (NVIDIA .pt, fid-helper default_1.pt or pytorch-fid .pth). "
        "Else $UVIT_INCEPTION, else known cache files.",
    ),
]
# compare's and ref's --batch-size: the Inception's batch (generate's is the sampling batch, SampleBatchOpt)
InceptionBatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per Inception forward.")]
WorkersOpt = Annotated[
    int | None,
    option("--workers", min=0, help="Decoding workers (default: 0 on CPU, up to 8 on GPU)."),
]


def _progress_bar(description: str) -> tuple[Any, Callable[[int, int | None], None]]:
    """A rich bar on stderr (gone when it ends) and the `progress(done, total)` callback that advances it."""
    bar = image_progress(transient=True)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _resolve_metrics(metrics: str, mode: str | None) -> tuple[tuple[str, ...], str]:
    """The metrics asked and the mode they run in (the flag, else the one they need)."""
    from uvit_cli.fid.metrics import default_mode, parse_metrics

    names = parse_metrics(metrics)
    return names, mode or default_mode(names)


def _warn_skipped(folder: Path) -> None:
    """One warning line naming the first entries of an image folder that are not regular files (named pipes,
    sockets, broken links): they are skipped, never opened."""
    if not folder.is_dir():
        return
    from uvit_cli.errors import DataError
    from uvit_cli.fid.images import scan_images, skipped_note

    try:
        note = skipped_note(folder, scan_images(folder).skipped)
    except DataError:  # a folder the workflow cannot read says so itself, in its own words
        return
    if note is not None:
        warn(note)


def _inputs(**paths: Any) -> dict[str, Any]:
    """The files a `uvit fid` route reads, by the option that names them (for `check_outputs`); the Inception
    weights come from --inception-weights, else $UVIT_INCEPTION."""
    from uvit_cli.inception import ENV_VAR

    return {**paths, f"${ENV_VAR}": os.environ.get(ENV_VAR) or None}


def _print_result(result: FidResult, path: Path | None, inputs: dict[str, Any]) -> None:
    """Print the run's warnings and the FID line, with the stamp file it was recorded in; a stamp that cannot
    be written (or whose path is one of `inputs`) never hides the number: the line comes first, then the
    one-line error."""
    from uvit_cli.errors import ConfigError
    from uvit_cli.fid import write_stamp

    for w in result.warnings:
        warn(w)
    line, error, code = result.summary(), None, 1
    if path is not None:
        try:
            check_outputs({"the stamp (--json)": path}, inputs)
            write_stamp(path, result.stamp)
            line += f"  stamp {path}"
        except ConfigError as e:
            error, code = str(e), e.exit_code
        except OSError as e:
            error = f"cannot write the stamp {path}: {describe_os_error(e).split(': ', 1)[-1]}; pass --json FILE or --no-json"
    out.print(line, soft_wrap=True, markup=False)
    if error is not None:
        raise fail(error, code)


@fid_app.command("compare")
@handle_errors
def compare(
    samples: ImagesArg,
    ref: RefArg,
    json_path: Annotated[
        Path | None,
        option("--json", help="Where to write the protocol stamp (default: SAMPLES.fid-MODE.json)."),
    ] = None,
    no_json: NoJsonOpt = False,
    clip_model: ClipModelOpt = None,
    metrics: MetricsOpt = "fid",
    mode: ModeOpt = None,
    inception_weights: InceptionWeightsOpt = None,
    batch_size: InceptionBatchOpt = 50,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
) -> None:
    """FID (and --metrics) of SAMPLES against REF (the default command: `uvit fid SAMPLES REF` runs it)."""
    from uvit_cli.fid import compute_fid, samples_stamp_path
    from uvit_cli.fid.metrics import clip_scorer

    names, fid_mode = _resolve_metrics(metrics, mode)
    inputs = _inputs(SAMPLES=samples, REF=ref, **{"--inception-weights": inception_weights})
    stamp_path = None if no_json else json_path or samples_stamp_path(samples, fid_mode)
    name = "--json" if json_path else "the stamp (--json, default SAMPLES.fid-MODE.json)"
    check_outputs({name: stamp_path}, inputs)  # before any work: an output never replaces an input
    clip_score = clip_scorer(clip_model, device) if "clip" in names else None  # its weights found now
    _warn_skipped(samples)
    bar, update = _progress_bar("features")
    with bar:
        result = compute_fid(
            samples, ref, metrics=names, mode=fid_mode, inception_weights=inception_weights, device=device,
            batch_size=batch_size, workers=workers, progress=update, clip_score=clip_score,
        )  # fmt: skip
    if result.is_main:
        _print_result(result, stamp_path, inputs)


@fid_app.command("ref")
@handle_errors
def make_ref(
    images: ImagesArg,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the statistics (.npz).")],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the stamp here (it is in the npz as `meta`).")
    ] = None,
    metrics: MetricsOpt = "fid",
    mode: ModeOpt = None,
    inception_weights: InceptionWeightsOpt = None,
    batch_size: InceptionBatchOpt = 50,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
) -> None:
    """A reference of a folder or .npz of images: mu, sigma (float64) + meta, and what --metrics need
    (sfid: mu_s, sigma_s; pr: the images' pool features)."""
    from uvit_cli.fid import make_ref_stats, stats_path, write_stamp

    names, fid_mode = _resolve_metrics(metrics, mode)
    inputs = _inputs(IMAGES=images, **{"--inception-weights": inception_weights})
    check_outputs({"--out": stats_path(out_path), "--json": json_path}, inputs)
    _warn_skipped(images)
    bar, update = _progress_bar("features")
    with bar:
        result = make_ref_stats(
            images, out_path, metrics=names, mode=fid_mode, inception_weights=inception_weights, device=device,
            batch_size=batch_size, workers=workers, progress=update,
        )  # fmt: skip
    if not result.is_main:
        return
    for w in result.warnings:
        warn(w)
    if json_path is not None:
        write_stamp(json_path, result.stamp)
    s = result.stamp
    inc = (s["inception"]["sha256"] or "custom")[:12]
    score = f"  IS {s['inception_score']:.3f}" if "inception_score" in s else ""
    out.print(
        f"wrote {result.path} ({', '.join(s['stored'])})  mode {fid_mode}  images {result.num_images}"
        f"{score}  inception {inc}",
        soft_wrap=True,
        markup=False,
    )


@fid_app.command("pack")
@handle_errors
def pack(
    images: Annotated[Path, typer.Argument(help="Folder of images (one size), e.g. a `uvit sample` folder.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the sample batch (.npz).")],
) -> None:
    """An ADM sample batch (`arr_0` uint8 NHWC, sorted file order) of a folder, for openai/guided-diffusion's
    evaluator.py or any tool that reads ADM batches; `uvit fid` reads it too."""
    from uvit_cli.fid.images import write_adm_batch

    check_outputs({"--out": out_path}, {"IMAGES": images})
    _warn_skipped(images)
    bar, update = _progress_bar("packing")
    with bar:
        path, shape = write_adm_batch(images, out_path, progress=update)
    out.print(f"wrote {path}  arr_0 uint8 {shape}", soft_wrap=True, markup=False)


@fid_app.command("generate")
@handle_errors
def generate(
    ref: RefArg,
    n: Annotated[
        int | None,
        option(
            "--n",
            "-n",
            min=2,
            help="Images to generate (default: the preset's sample.n_samples: 30,000 COCO, 50,000 others).",
        ),
    ] = None,
    clip: Annotated[
        str | None,
        option(
            "--clip",
            help="CLIP text encoder for the CFG null context CLIP('') (default: the shards' empty_context).",
        ),
    ] = None,
    contexts_from: Annotated[
        Path | None,
        option(
            "--contexts-from",
            help="Prepared shards with a val split: text models' captions (default: the preset's data.path).",
        ),
    ] = None,
    classes: ClassesOpt = "random",
    metrics: MetricsOpt = "fid",
    mode: ModeOpt = None,
    inception_weights: InceptionWeightsOpt = None,
    device: DeviceOpt = None,
    clip_model: ClipModelOpt = None,
    json_path: Annotated[
        Path | None,
        option(
            "--json",
            help="Where to write the protocol stamp (default: beside the checkpoint, "
            "CKPT.fid-MODE-nN-SOLVERSTEPS-cfgS-seedS.json).",
        ),
    ] = None,
    no_json: NoJsonOpt = False,
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
    """FID (and --metrics) of N images generated from a checkpoint, streamed into the statistics (no PNGs).

    Conditions as the paper: uniform labels for class models (--classes balanced: class = index % K), val-split
    captions for text models (CLIP score compares each image with its caption). Image i depends only on
    (seed, i): batch size and GPU count do not change the number.
    """
    spec = sampler_spec(
        ckpt=ckpt, preset=preset, seed=seed, steps=steps, cfg_scale=cfg_scale, solver=solver,
        guidance_interval=guidance_interval, batch_size=batch_size, precision=precision, no_compile=no_compile,
        model_weights=model_weights, vae=vae, set_=set_,
    )  # fmt: skip
    from uvit_cli.fid.generated import fid_from_checkpoint
    from uvit_cli.fid.metrics import clip_scorer

    names, fid_mode = _resolve_metrics(metrics, mode)

    read = {"REF": ref, "--ckpt": spec.ckpt, "--preset": spec.preset, "--vae": spec.vae}
    read |= {"--clip": clip, "--contexts-from": contexts_from, "--inception-weights": inception_weights}
    inputs = _inputs(**read)
    # The default stamp path, beside the checkpoint, is known after loading: _print_result checks it.
    check_outputs({"--json": json_path}, inputs)

    clip_score = clip_scorer(clip_model, device) if "clip" in names else None  # its weights found now
    bar, update = _progress_bar("generating + features")
    with bar:
        result = fid_from_checkpoint(
            ref, spec, n=n, clip=clip, contexts_from=contexts_from, mode=fid_mode,
            inception_weights=inception_weights, device=device, progress=update, log=log_rank0,
            metrics=names, clip_score=clip_score, classes=classes,
        )  # fmt: skip
    if result.is_main:
        _print_result(result, None if no_json else json_path or result.default_stamp_path(), inputs)


def register(app: typer.Typer) -> None:
    app.add_typer(fid_app, name="fid")
