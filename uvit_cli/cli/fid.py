"""`uvit fid SAMPLES REF.npz` (default: compare), `uvit fid --ckpt PATH --n N REF.npz` (generate: FID straight
from a checkpoint) and `uvit fid ref IMAGES --out REF.npz`; `--metrics` picks the numbers on each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from uvit_cli.cli.common import (
    SAMPLING,
    ClassesOpt,
    DeviceOpt,
    describe_os_error,
    fail,
    handle_errors,
    image_progress,
    log_rank0,
    option,
    option_group,
    out,
    sampler_spec,
    warn,
    with_options,
)
from uvit_cli.config import FidMode
from uvit_cli.fileio import check_outputs

_REF_HELP = (
    "Reference .npz: mu/sigma (fid), mu_s/sigma_s (sfid), pool_features or arr_0 images (pr); made by "
    "`uvit fid ref`, U-ViT's fid_stats, an ADM reference batch."
)
# Options that only generating from a checkpoint takes: their presence routes `uvit fid ...` to `generate`.
_GENERATE_OPTS = ("--ckpt", "--preset", "--n", "-n")


def _wants_generate(args: list[str]) -> bool:
    for a in args:
        if a == "--":
            return False
        if a.split("=", 1)[0] in _GENERATE_OPTS or (a.startswith("-n") and a[2:].isdigit()):
            return True
    return False


class _DefaultToCompare(TyperGroup):
    """A group whose first argument, unless it names a subcommand, starts the default command: `generate`
    when a checkpoint option (--ckpt, --preset, --n) is given, else `compare`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["generate" if _wants_generate(args) else "compare", *args]
        return super().parse_args(ctx, args)


fid_app = typer.Typer(
    cls=_DefaultToCompare,
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
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per Inception forward.")]
WorkersOpt = Annotated[
    int | None,
    option("--workers", min=0, help="Decoding workers (default: 0 on CPU, up to 8 on GPU)."),
]


# How images become Inception statistics, as `compute_fid` and `make_ref_stats` take it (compare, ref).
_FEATURES = option_group(
    ("metrics", MetricsOpt, "fid"),
    ("mode", ModeOpt, None),
    ("inception_weights", InceptionWeightsOpt, None),
    ("batch_size", BatchOpt, 50),
    ("workers", WorkersOpt, None),
    ("device", DeviceOpt, None),
)


def _progress_bar(description: str, transient: bool = True) -> tuple[Any, Any]:
    """A rich bar on stderr and the `progress(done, total)` callback that advances it."""
    bar = image_progress(transient=transient)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _with_features_bar(fn: Any, images: Path, target: Path, **options: Any) -> Any:
    """`fn(images, target, **options)` (compute_fid, make_ref_stats) under a features bar; its warnings are
    printed on the main rank."""
    bar, update = _progress_bar("features")
    with bar:
        result = fn(images, target, progress=update, **options)
    if result.is_main:
        for w in result.warnings:
            warn(w)
    return result


def _resolve_metrics(metrics: str, mode: str | None) -> tuple[tuple[str, ...], str]:
    """The metrics asked and the mode they run in (the flag, else the one they need)."""
    from uvit_cli.fid.metrics import default_mode, parse_metrics

    names = parse_metrics(metrics)
    return names, mode or default_mode(names)


def _clip_scorer(names: tuple[str, ...], spec: str | None, device: Any) -> Any:
    """For --metrics clip: the CLIP scorer (`fid.metrics.clip_scorer`), its weights found now, else None."""
    if "clip" not in names:
        return None
    from uvit_cli.fid.metrics import clip_scorer

    return clip_scorer(spec, device)


def _warn_skipped(folder: Path) -> None:
    """One warning line naming the first entries of an image folder that are not regular files (named pipes,
    sockets, broken links): they are skipped, never opened."""
    if not folder.is_dir():
        return
    from uvit_cli.fid.images import scan_images, skipped_note

    note = skipped_note(folder, scan_images(folder).skipped)
    if note is not None:
        warn(note)


def _inputs(**paths: Any) -> dict[str, Any]:
    """The files a `uvit fid` route reads, by the option that names them (for `check_outputs`); the Inception
    weights come from --inception-weights, else $UVIT_INCEPTION."""
    from uvit_cli.inception import ENV_VAR

    return {**paths, f"${ENV_VAR}": os.environ.get(ENV_VAR) or None}


def _print_result(line: str, stamp: dict[str, Any], path: Path | None, inputs: dict[str, Any]) -> None:
    """Print the FID line, with the stamp file it was recorded in; a stamp that cannot be written (or whose
    path is one of `inputs`) never hides the number: the line is printed first, then the one-line error."""
    from uvit_cli.errors import ConfigError
    from uvit_cli.fid import write_stamp

    error, code = None, 1
    if path is not None:
        try:
            check_outputs({"the stamp (--json)": path}, inputs)
            write_stamp(path, stamp)
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
@with_options(_FEATURES)
def compare(
    samples: Annotated[
        Path, typer.Argument(help="Folder of images, or .npz with uint8 NHWC images in arr_0.")
    ],
    ref: Annotated[
        Path,
        typer.Argument(help=_REF_HELP),
    ],
    json_path: Annotated[
        Path | None,
        option("--json", help="Where to write the protocol stamp (default: SAMPLES.fid-MODE.json)."),
    ] = None,
    no_json: Annotated[bool, typer.Option("--no-json", help="Do not write the stamp file.")] = False,
    clip_model: ClipModelOpt = None,
    **features: Any,
) -> None:
    """FID (and --metrics) of SAMPLES against REF (the default command: `uvit fid SAMPLES REF` runs it)."""
    from uvit_cli.fid import compute_fid, samples_stamp_path

    names, features["mode"] = _resolve_metrics(features.pop("metrics"), features["mode"])
    inputs = _inputs(SAMPLES=samples, REF=ref, **{"--inception-weights": features["inception_weights"]})
    stamp_path = None if no_json else json_path or samples_stamp_path(samples, features["mode"])
    name = "--json" if json_path else "the stamp (--json, default SAMPLES.fid-MODE.json)"
    check_outputs({name: stamp_path}, inputs)  # before any work: an output never replaces an input
    clip_score = _clip_scorer(names, clip_model, features["device"])
    _warn_skipped(samples)
    result = _with_features_bar(compute_fid, samples, ref, metrics=names, clip_score=clip_score, **features)
    if not result.is_main:
        return
    _print_result(result.summary(), result.stamp, stamp_path, inputs)


@fid_app.command("ref")
@handle_errors
@with_options(_FEATURES)
def make_ref(
    images: Annotated[
        Path, typer.Argument(help="Folder of images, or .npz with uint8 NHWC images in arr_0.")
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the statistics (.npz).")],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the stamp here (it is in the npz as `meta`).")
    ] = None,
    **features: Any,
) -> None:
    """A reference of a folder or .npz of images: mu, sigma (float64) + meta, and what --metrics need
    (sfid: mu_s, sigma_s; pr: the images' pool features)."""
    from uvit_cli.fid import make_ref_stats, stats_path, write_stamp

    names, features["mode"] = _resolve_metrics(features.pop("metrics"), features["mode"])
    inputs = _inputs(IMAGES=images, **{"--inception-weights": features["inception_weights"]})
    check_outputs({"--out": stats_path(out_path), "--json": json_path}, inputs)
    _warn_skipped(images)
    result = _with_features_bar(make_ref_stats, images, out_path, metrics=names, **features)
    if not result.is_main:
        return
    if json_path is not None:
        write_stamp(json_path, result.stamp)
    s = result.stamp
    inc = (s["inception"]["sha256"] or "custom")[:12]
    score = f"  IS {s['inception_score']:.3f}" if "inception_score" in s else ""
    out.print(
        f"wrote {result.path} ({', '.join(s['stored'])})  mode {features['mode']}  images {result.num_images}"
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
@with_options(SAMPLING)
def generate(
    ref: Annotated[
        Path,
        typer.Argument(help=_REF_HELP),
    ],
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
    no_json: Annotated[bool, typer.Option("--no-json", help="Do not write the stamp file.")] = False,
    **sampling: Any,
) -> None:
    """FID (and --metrics) of N images generated from a checkpoint, streamed into the statistics (no PNGs).

    Conditions as the paper: uniform labels for class models (--classes balanced: class = index % K), val-split
    captions for text models (CLIP score compares each image with its caption). Image i depends only on
    (seed, i): batch size and GPU count do not change the number.
    """
    spec = sampler_spec(**sampling)
    from uvit_cli.fid.generated import fid_from_checkpoint

    names, fid_mode = _resolve_metrics(metrics, mode)

    read = {"REF": ref, "--ckpt": spec.ckpt, "--preset": spec.preset, "--vae": spec.vae}
    read |= {"--clip": clip, "--contexts-from": contexts_from, "--inception-weights": inception_weights}
    inputs = _inputs(**read)
    # The default stamp path, beside the checkpoint, is known after loading: _print_result checks it.
    check_outputs({"--json": json_path}, inputs)

    clip_score = _clip_scorer(names, clip_model, device)
    bar, update = _progress_bar("generating + features")
    with bar:
        result = fid_from_checkpoint(
            ref, spec, n=n, clip=clip, contexts_from=contexts_from, mode=fid_mode,
            inception_weights=inception_weights, device=device, progress=update, log=log_rank0,
            metrics=names, clip_score=clip_score, classes=classes,
        )  # fmt: skip
    if not result.is_main:
        return
    for w in result.warnings:
        warn(w)
    _print_result(
        result.summary(), result.stamp, None if no_json else json_path or result.default_stamp_path(), inputs
    )


def register(app: typer.Typer) -> None:
    app.add_typer(fid_app, name="fid")
