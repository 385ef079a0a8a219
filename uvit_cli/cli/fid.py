"""`uvit fid SAMPLES REF.npz` (default: compare) and `uvit fid ref IMAGES --out REF.npz`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from uvit_cli.cli.common import console, handle_errors, out


class _DefaultToCompare(TyperGroup):
    """A group whose first argument, unless it names a subcommand, starts the default `compare` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["compare", *args]
        return super().parse_args(ctx, args)


class Mode(str, Enum):
    clean = "clean"
    legacy_pytorch = "legacy_pytorch"
    legacy_tensorflow = "legacy_tensorflow"


fid_app = typer.Typer(
    cls=_DefaultToCompare,
    no_args_is_help=True,
    help=(
        "FID with clean-fid's protocols and a local Inception (never downloads).\n\n"
        "uvit fid SAMPLES REF.npz  compares a folder or .npz of images with reference mu/sigma;\n\n"
        "uvit fid ref IMAGES --out REF.npz  makes reference statistics."
    ),
)

ModeOpt = Annotated[
    Mode,
    typer.Option(
        "--mode",
        help="clean (clean-fid), legacy_pytorch (pytorch-fid: U-ViT's paper numbers), legacy_tensorflow (TF/ADM).",
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--inception-weights",
        help="FID Inception weights (NVIDIA .pt, fid-helper default_1.pt or pytorch-fid .pth). "
        "Else $UVIT_INCEPTION, else known cache files.",
        show_default=False,
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per Inception forward.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", min=0, help="Decoding workers [default: 0 on CPU, up to 8 on GPU].", show_default=False
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, cuda:1 [default: cuda if available].", show_default=False),
]


def _progress_bar(description: str) -> tuple[Any, Any]:
    """A rich bar on stderr and the callback that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _default_stamp_path(samples: Path, mode: str) -> Path:
    base = samples.with_suffix("") if samples.suffix == ".npz" else samples
    return base.parent / f"{base.name}.fid-{mode}.json"


@fid_app.command("compare")
@handle_errors
def compare(
    samples: Annotated[
        Path, typer.Argument(help="Folder of images, or .npz with uint8 NHWC images in arr_0.")
    ],
    ref: Annotated[
        Path, typer.Argument(help="Reference .npz with mu and sigma (U-ViT fid_stats, ADM batch).")
    ],
    mode: ModeOpt = Mode.clean,
    inception_weights: WeightsOpt = None,
    batch_size: BatchOpt = 50,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Where to write the protocol stamp [default: SAMPLES.fid-MODE.json].",
            show_default=False,
        ),
    ] = None,
    no_json: Annotated[bool, typer.Option("--no-json", help="Do not write the stamp file.")] = False,
) -> None:
    """FID of SAMPLES against REF (the default command: `uvit fid SAMPLES REF` runs it)."""
    from uvit_cli.fid import compute_fid, write_stamp

    bar, update = _progress_bar("features")
    with bar:
        result = compute_fid(
            samples,
            ref,
            mode=mode.value,
            inception_weights=inception_weights,
            device=device,
            batch_size=batch_size,
            workers=workers,
            progress=update,
        )
    if not result.is_main:
        return
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    s = result.stamp
    inc = (s["inception"]["sha256"] or "custom")[:12]
    line = f"FID {result.fid:.4f}  mode {s['mode']}  images {s['num_images']}  inception {inc}  ref {s['reference']['sha256'][:12]}"
    if not no_json:
        path = write_stamp(json_path or _default_stamp_path(samples, mode.value), s)
        line += f"  stamp {path}"
    out.print(line, soft_wrap=True, markup=False)


@fid_app.command("ref")
@handle_errors
def make_ref(
    images: Annotated[
        Path, typer.Argument(help="Folder of images, or .npz with uint8 NHWC images in arr_0.")
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the statistics (.npz).")],
    mode: ModeOpt = Mode.clean,
    inception_weights: WeightsOpt = None,
    batch_size: BatchOpt = 50,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the stamp here (it is in the npz as `meta`).")
    ] = None,
) -> None:
    """Reference statistics (mu, sigma float64 + meta) of a folder or .npz of images."""
    from uvit_cli.fid import make_ref_stats, write_stamp

    bar, update = _progress_bar("features")
    with bar:
        result = make_ref_stats(
            images,
            out_path,
            mode=mode.value,
            inception_weights=inception_weights,
            device=device,
            batch_size=batch_size,
            workers=workers,
            progress=update,
        )
    if not result.is_main:
        return
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    if json_path is not None:
        write_stamp(json_path, result.stamp)
    inc = (result.stamp["inception"]["sha256"] or "custom")[:12]
    out.print(
        f"wrote {result.path}  mode {mode.value}  images {result.num_images}  inception {inc}",
        soft_wrap=True,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(fid_app, name="fid")
