"""`uvit prepare coco|imagenet|cifar10|celeba|folder|shapes|official-features`: data sets into feature shards;
`uvit prepare verify DIR`: the full hash check of a prepared folder (see docs/data.md).

Each command is a typed function that calls its workflow by name (`uvit_cli.prepare` imports torch only when a
workflow runs); its parameters are named as the workflow's keywords, with their defaults (tests/test_cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uvit_cli import config, prepare
from uvit_cli.cli.common import ClipOpt, PrepareReport, VaeOpt, handle_errors, option
from uvit_cli.cli.prepare_verify import verify

app = typer.Typer(
    help="Turn a data set into feature shards for training (docs/data.md).", no_args_is_help=True
)

# Options several sources take alike. Every set: --out/--name, after a source's own options. The sources that
# decode images (cifar10, celeba): --items-per-shard, --workers; those that run the autoencoder (coco,
# imagenet, folder): --batch-size, --dtype, --precision before these two.
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Data root: the set is written to OUT/<name> (coco256, imagenet256, ...: what the presets read), "
        "or to OUT itself if it is that set already. Resumable.",
    ),
]
NameOpt = Annotated[
    str | None, option("--name", help="Folder of the set under --out (default: the presets' name).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per encoder call (per GPU).")]
ShardOpt = Annotated[int, typer.Option("--items-per-shard", min=1, help="Images per shard.")]
DtypeOpt = Annotated[config.StorageDtype, typer.Option("--dtype", help="Storage of moments and contexts.")]
PrecisionOpt = Annotated[
    config.EncoderPrecision, typer.Option("--precision", help="Autoencoder compute: fp32 (as U-ViT) or bf16.")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=0, help="Image-decoding processes per GPU (default: min(8, CPUs))."),
]
OUT = Path(config.DATA_ROOT)  # --out by default: where the packaged presets read


_HOLDS = {  # what the folder of each data set's originals holds
    "coco": "Holds train2014/, val2014/ and annotations/captions_*2014.json",
    "imagenet": "ImageNet directory holding train/<synset>/*.JPEG",
    "cifar10": "Holds cifar-10-batches-py/ (cifar-10-python.tar.gz extracted)",
    "celeba": "Holds img_align_celeba/*.jpg and optionally list_eval_partition.txt",
}


def _source_root(flag: str, kind: str) -> Any:
    """The option that names where data set `kind`'s originals are; its default is the core's DATA_ROOTS."""
    env, conventional = config.DATA_ROOTS[kind]
    return option(flag, help=f"{_HOLDS[kind]} (default: ${env}, else ./{conventional}).")


@app.command("coco")
@handle_errors
def coco(
    coco_root: Annotated[Path | None, _source_root("--coco-root", "coco")] = None,
    split: Annotated[
        config.PrepareSplit, typer.Option("--split", help="Which split(s) to prepare.")
    ] = "both",
    vae: VaeOpt = None,
    clip: ClipOpt = None,
    resolution: Annotated[int, typer.Option("--resolution", help="Image side (U-ViT: 256).")] = 256,
    out: OutOpt = OUT,
    name: NameOpt = None,
    batch_size: BatchOpt = 64,
    dtype: DtypeOpt = "float16",
    precision: PrecisionOpt = "fp32",
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """MS-COCO 2014 as U-ViT: autoencoder moments + CLIP features of every caption, and CLIP("")."""
    with PrepareReport(precision) as report:
        report.done(prepare.prepare_coco(
            coco_root, out, name=name, split=split, vae=vae, clip=clip, resolution=resolution,
            batch_size=batch_size, dtype=dtype, precision=precision, items_per_shard=items_per_shard,
            num_workers=num_workers, progress=report.update,
        ))  # fmt: skip


@app.command("imagenet")
@handle_errors
def imagenet(
    root: Annotated[Path | None, _source_root("--root", "imagenet")] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="256 or 512 (latent), 64 (pixel) (default: 256 / 64).")
    ] = None,
    space: Annotated[
        config.Space,
        typer.Option("--space", help="latent: moments of image and mirror image; pixel: uint8 (ImageNet64)."),
    ] = "latent",
    vae: VaeOpt = None,
    out: OutOpt = OUT,
    name: NameOpt = None,
    batch_size: BatchOpt = 64,
    dtype: DtypeOpt = "float16",
    precision: PrecisionOpt = "fp32",
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """ImageNet train as U-ViT: ADM centre crop, labels; moments of each image and its mirror image, or pixels."""
    with PrepareReport(precision) as report:
        report.done(prepare.prepare_imagenet(
            root, out, name=name, resolution=resolution, space=space, vae=vae, batch_size=batch_size,
            dtype=dtype, precision=precision, items_per_shard=items_per_shard, num_workers=num_workers,
            progress=report.update,
        ))  # fmt: skip


@app.command("cifar10")
@handle_errors
def cifar10(
    root: Annotated[Path | None, _source_root("--root", "cifar10")] = None,
    out: OutOpt = OUT,
    name: NameOpt = None,
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """CIFAR-10 as U-ViT: uint8 32x32 pixels with labels; train (50,000) and test (10,000) splits."""
    with PrepareReport() as report:
        report.done(prepare.prepare_cifar10(
            root, out, name=name, items_per_shard=items_per_shard, num_workers=num_workers,
            progress=report.update,
        ))  # fmt: skip


@app.command("celeba")
@handle_errors
def celeba(
    root: Annotated[Path | None, _source_root("--root", "celeba")] = None,
    resolution: Annotated[int, typer.Option("--resolution", help="Side after the 128x128 face crop.")] = 64,
    out: OutOpt = OUT,
    name: NameOpt = None,
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """CelebA as U-ViT: 128x128 face crop, Resize(64), uint8 pixels; the official splits if listed."""
    with PrepareReport() as report:
        report.done(prepare.prepare_celeba(
            root, out, name=name, resolution=resolution, items_per_shard=items_per_shard,
            num_workers=num_workers, progress=report.update,
        ))  # fmt: skip


@app.command("folder")
@handle_errors
def folder(
    directory: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    space: Annotated[
        config.Space, typer.Option("--space", help="latent: autoencoder moments; pixel: uint8 images.")
    ] = "latent",
    resolution: Annotated[int, typer.Option("--resolution", help="Image side after cropping.")] = 256,
    crop: Annotated[
        config.Crop, typer.Option("--crop", help="adm (ImageNet style) or lanczos (COCO style).")
    ] = "adm",
    flip: Annotated[bool, typer.Option("--flip", help="Also store each image's mirror image.")] = False,
    labels: Annotated[
        config.FolderLabels,
        typer.Option(
            "--labels", help="Classes from first-level sub-folders (auto: if all images are in one)."
        ),
    ] = "auto",
    captions: Annotated[
        config.FolderCaptions,
        typer.Option("--captions", help="auto: use captions.jsonl or a .txt beside each image."),
    ] = "auto",
    vae: VaeOpt = None,
    clip: ClipOpt = None,
    out: OutOpt = OUT,
    name: NameOpt = None,
    batch_size: BatchOpt = 64,
    dtype: DtypeOpt = "float16",
    precision: PrecisionOpt = "fp32",
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """Your own images: optional captions (text) or sub-folder classes; latent or pixel space."""
    with PrepareReport(precision) as report:
        report.done(prepare.prepare_folder(
            directory, out, name=name, space=space, resolution=resolution, crop=crop, flip=flip,
            labels=labels, captions=captions, vae=vae, clip=clip, batch_size=batch_size, dtype=dtype,
            precision=precision, items_per_shard=items_per_shard, num_workers=num_workers,
            progress=report.update,
        ))  # fmt: skip


@app.command("official-features")
@handle_errors
def official_features(
    src: Annotated[
        Path, typer.Argument(help="An official coco256_features/ or imagenet{256,512}_features/ directory.")
    ],
    kind: Annotated[
        config.OfficialKind, typer.Option("--kind", help="What SRC holds (auto: from its layout).")
    ] = "auto",
    items_per_shard: ShardOpt = 1000,
    dtype: DtypeOpt = "float16",
    num_workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel file reads.")] = 8,
    out: OutOpt = OUT,
    name: NameOpt = None,
) -> None:
    """Features extracted by U-ViT's own scripts, copied into shards (no encoder runs)."""
    with PrepareReport() as report:
        report.done(prepare.import_official_features(
            src, out, name=name, kind=kind, items_per_shard=items_per_shard, dtype=dtype,
            num_workers=num_workers, progress=report.update,
        ))  # fmt: skip


@app.command("shapes")
@handle_errors
def shapes(
    out_dir: OutOpt = OUT,
    name: Annotated[str, typer.Option("--name", help="Folder of the set under --out.")] = "shapes",
    n: Annotated[int, typer.Option("--n", min=1, help="Training images.")] = 10000,
    n_val: Annotated[int | None, option("--val", min=0, help="Held-out images (default: n / 10).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scenes.")] = 0,
    resolution: Annotated[
        int | None, option("--resolution", help="Image side in pixels (default: shapes_uvit_tiny's, 16).")
    ] = None,
) -> None:
    """Captioned shapes ("a small red circle at the top left"): pixels + toy-CLIP contexts, no downloads."""
    from uvit_cli.shapes.prepare import prepare_shapes

    with PrepareReport() as report:
        report.done(prepare_shapes(
            out_dir, name=name, n=n, n_val=n_val, seed=seed, resolution=resolution, progress=report.update
        ))  # fmt: skip


app.command("verify")(verify)  # the full check of a prepared folder (cli/prepare_verify.py)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="prepare")
