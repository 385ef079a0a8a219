"""`uvit prepare coco|imagenet|cifar10|celeba|folder|shapes|official-features`: data sets into feature shards;
`uvit prepare verify DIR`: the full hash check of a prepared folder (see docs/data.md).

Each command is a typed function that calls its workflow by name (imported when it runs: `--help` loads no
torch); its parameters are named as the workflow's keywords, with the same defaults (tests/test_cli.py checks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uvit_cli import config
from uvit_cli.cli.common import ClipOpt, VaeOpt, handle_errors, image_progress, is_rank0, option, warn
from uvit_cli.cli.common import out as stdout

if TYPE_CHECKING:
    from uvit_cli.prepare import PrepareResult, Progress

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


def _source_root(flag: str, kind: str, holds: str) -> Any:
    """The option that names where data set `kind`'s originals are; its default is the core's DATA_ROOTS."""
    env, conventional = config.DATA_ROOTS[kind]
    return option(flag, help=f"{holds} (default: ${env}, else ./{conventional}).")


class _Report:
    """A prepare workflow's progress bar (it reports to `report.update`), then its one-screen summary."""

    def __init__(self, precision: config.EncoderPrecision = "fp32") -> None:
        if precision == "bf16" and is_rank0():
            import torch

            if not torch.cuda.is_available():  # measured: bf16 convolutions ~140x slower than fp32 on a CPU
                warn(
                    "--precision bf16 without a GPU: CPU bf16 convolutions are far slower than fp32 "
                    "(use the default fp32 here)"
                )
        self.t0 = time.perf_counter()
        self.bar = image_progress(note=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Report:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, p: Progress) -> None:
        if p.split not in self.tasks:
            self.tasks[p.split] = self.bar.add_task(p.split, total=p.total, note="")
        note = f"{p.skipped} skipped" if p.skipped else ""
        if p.shards_reused:
            note += f"{', ' if note else ''}{p.shards_reused} shards reused"
        self.bar.update(self.tasks[p.split], completed=p.done, total=p.total, note=note)

    def summary(self, result: PrepareResult) -> None:
        if not is_rank0():
            return
        m = result.manifest
        for split, entry in m["splits"].items():
            skipped = entry.get("skipped", [])
            stdout.print(
                f"{split}: {entry.get('items', 0)} items in {len(entry.get('shards', []))} shards"
                + (f", {entry['captions']} captions" if entry.get("captions") else "")
                + (f", {len(skipped)} unreadable images skipped (listed in manifest.json)" if skipped else "")
            )
            if skipped:  # named, so that a named pipe or a broken link among the images is seen
                more = f", and {len(skipped) - 3} more" if len(skipped) > 3 else ""
                named = "; ".join(f"{s.get('key')} ({s.get('reason')})" for s in skipped[:3])
                warn(f"{split}: skipped {named}{more}")
        for name, e in m.get("encoders", {}).items():
            stdout.print(f"{name}: {e['path']} sha256 {e['sha256'][:16]}")
        stdout.print(f"wrote {result.out} in {time.perf_counter() - self.t0:.1f} s")


@app.command("coco")
@handle_errors
def coco(
    coco_root: Annotated[
        Path | None,
        _source_root("--coco-root", "coco", "Holds train2014/, val2014/ and annotations/captions_*2014.json"),
    ] = None,
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
    from uvit_cli import prepare

    with _Report(precision) as report:
        result = prepare.prepare_coco(
            coco_root, out, name=name, split=split, vae=vae, clip=clip, resolution=resolution,
            batch_size=batch_size, dtype=dtype, precision=precision, items_per_shard=items_per_shard,
            num_workers=num_workers, progress=report.update,
        )  # fmt: skip
    report.summary(result)


@app.command("imagenet")
@handle_errors
def imagenet(
    root: Annotated[
        Path | None, _source_root("--root", "imagenet", "ImageNet directory holding train/<synset>/*.JPEG")
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option("--resolution", help="256 or 512 (latent), 64 (pixel) (default: 256 / 64)."),
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
    from uvit_cli import prepare

    with _Report(precision) as report:
        result = prepare.prepare_imagenet(
            root, out, name=name, resolution=resolution, space=space, vae=vae, batch_size=batch_size,
            dtype=dtype, precision=precision, items_per_shard=items_per_shard, num_workers=num_workers,
            progress=report.update,
        )  # fmt: skip
    report.summary(result)


@app.command("cifar10")
@handle_errors
def cifar10(
    root: Annotated[
        Path | None,
        _source_root("--root", "cifar10", "Holds cifar-10-batches-py/ (cifar-10-python.tar.gz extracted)"),
    ] = None,
    out: OutOpt = OUT,
    name: NameOpt = None,
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """CIFAR-10 as U-ViT: uint8 32x32 pixels with labels; train (50,000) and test (10,000) splits."""
    from uvit_cli import prepare

    with _Report() as report:
        result = prepare.prepare_cifar10(
            root, out, name=name, items_per_shard=items_per_shard, num_workers=num_workers,
            progress=report.update,
        )  # fmt: skip
    report.summary(result)


@app.command("celeba")
@handle_errors
def celeba(
    root: Annotated[
        Path | None,
        _source_root(
            "--root", "celeba", "Holds img_align_celeba/*.jpg and optionally list_eval_partition.txt"
        ),
    ] = None,
    resolution: Annotated[int, typer.Option("--resolution", help="Side after the 128x128 face crop.")] = 64,
    out: OutOpt = OUT,
    name: NameOpt = None,
    items_per_shard: ShardOpt = 1000,
    num_workers: WorkersOpt = None,
) -> None:
    """CelebA as U-ViT: 128x128 face crop, Resize(64), uint8 pixels; the official splits if listed."""
    from uvit_cli import prepare

    with _Report() as report:
        result = prepare.prepare_celeba(
            root, out, name=name, resolution=resolution, items_per_shard=items_per_shard,
            num_workers=num_workers, progress=report.update,
        )  # fmt: skip
    report.summary(result)


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
    from uvit_cli import prepare

    with _Report(precision) as report:
        result = prepare.prepare_folder(
            directory, out, name=name, space=space, resolution=resolution, crop=crop, flip=flip,
            labels=labels, captions=captions, vae=vae, clip=clip, batch_size=batch_size, dtype=dtype,
            precision=precision, items_per_shard=items_per_shard, num_workers=num_workers,
            progress=report.update,
        )  # fmt: skip
    report.summary(result)


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
    from uvit_cli import prepare

    with _Report() as report:
        result = prepare.import_official_features(
            src, out, name=name, kind=kind, items_per_shard=items_per_shard, dtype=dtype,
            num_workers=num_workers, progress=report.update,
        )  # fmt: skip
    report.summary(result)


@app.command("shapes")
@handle_errors
def shapes(
    out_dir: OutOpt = OUT,
    name: Annotated[str, typer.Option("--name", help="Folder of the set under --out.")] = "shapes",
    n: Annotated[int, typer.Option("--n", min=1, help="Training images.")] = 10000,
    n_val: Annotated[
        int | None,
        option("--val", min=0, help="Held-out images (default: n / 10)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scenes.")] = 0,
    resolution: Annotated[
        int | None,
        option("--resolution", help="Image side in pixels (default: shapes_uvit_tiny's, 16)."),
    ] = None,
) -> None:
    """Captioned shapes ("a small red circle at the top left"): pixels + toy-CLIP contexts, no downloads."""
    from uvit_cli.shapes.prepare import prepare_shapes

    t0 = time.perf_counter()
    result = prepare_shapes(out_dir, name=name, n=n, n_val=n_val, seed=seed, resolution=resolution)
    for split, entry in result.manifest["splits"].items():
        stdout.print(
            f"{split}: {entry['items']} images, {entry['captions']} captions in {len(entry['shards'])} shards"
        )
    reused = sum(result.reused.values())
    note = f" ({reused} finished shards verified and kept)" if reused else ""
    stdout.print(f"wrote {result.out} in {time.perf_counter() - t0:.1f} s{note}")


@app.command("verify")
@handle_errors
def verify(
    directory: Annotated[
        Path, typer.Argument(help="A folder written by uvit prepare (holds manifest.json).")
    ],
    split: Annotated[str | None, option("--split", help="Check only this split (default: all).")] = None,
) -> None:
    """Recompute the sha256 of every shard file against the manifest (finds flipped bytes; slow on big sets)."""
    from rich.progress import Progress

    from uvit_cli.data import verify as verify_set

    t0 = time.perf_counter()
    with Progress(console=stdout, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"{name} shards", total=total)
            bar.update(tasks[name], completed=done)

        checked = verify_set(directory, split, progress)
    for name, files in checked.items():
        stdout.print(f"{name}: {files} files match the manifest")
    stdout.print(f"{directory}: intact ({time.perf_counter() - t0:.1f} s)")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="prepare")
