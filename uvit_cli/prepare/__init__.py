"""`uvit prepare`: COCO 2014, ImageNet, CIFAR-10, CelebA and image folders into feature shards (`uvit_cli.data`).

    prepare_coco("coco/", "feats")                        # feats/coco256: moments + every caption's CLIP features
    prepare_imagenet("imagenet/", "feats", resolution=256)  # feats/imagenet256: moments of image and flip + label
    prepare_imagenet("imagenet/", "feats", space="pixel")   # feats/imagenet64: uint8 64x64 pixels + label
    prepare_cifar10("cifar10/", "feats")                  # feats/cifar10: uint8 32x32 pixels + label; train, test
    prepare_celeba("celeba/", "feats")                    # feats/celeba64: uint8 64x64 pixels
    prepare_folder("my_images/", "feats", space="pixel", resolution=64)      # feats/my_images64
    import_official_features("assets/datasets/coco256_features", "feats")  # feats/coco256: official extraction

`out` is the data root: the set goes to `out/<name>` (`config.dataset_name`, the folder the packaged presets
read), unless `out` already is that set (`config.set_dir`); `name=` names the folder otherwise.

Each call runs on every `torchrun` rank (each writes its own shards) and reports progress through
`progress(Progress)`; rerunning the same call resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from uvit_cli.config import (
    DATA_ROOTS,
    Crop,
    EncoderPrecision,
    FolderCaptions,
    FolderLabels,
    PrepareSplit,
    Space,
    StorageDtype,
    dataset_name,
    set_dir,
)
from uvit_cli.errors import DataError
from uvit_cli.lazy import lazy_exports
from uvit_cli.prepare.result import PrepareResult, Progress, ProgressFn

if TYPE_CHECKING:
    from uvit_cli.prepare.official import import_official_features
    from uvit_cli.prepare.run import PrepareSpec

__all__ = [
    "PrepareResult",
    "PrepareSpec",
    "Progress",
    "DATA_ROOTS",
    "ProgressFn",
    "data_root",
    "import_official_features",
    "prepare_celeba",
    "prepare_cifar10",
    "prepare_coco",
    "prepare_folder",
    "prepare_imagenet",
]

# The engine imports torch: read on first use, so that `uvit prepare --help` stays fast.
__getattr__ = lazy_exports(__name__, {"PrepareSpec": "run", "import_official_features": "official"})

Path_ = str | os.PathLike[str]


def data_root(kind: str, given: Path_ | None = None) -> Path:
    """The originals of data set `kind`: `given`, else $UVIT_<KIND>, else ./data/<kind> if it exists."""
    if given is not None:
        return Path(given)
    env, conventional = DATA_ROOTS[kind]
    if os.environ.get(env):
        return Path(os.environ[env])
    if Path(conventional).is_dir():
        return Path(conventional)
    flag = "--coco-root" if kind == "coco" else "--root"
    raise DataError(f"no {kind} data given: pass {flag} DIR, set ${env}, or put it in ./{conventional}/")


def prepare_coco(
    coco_root: Path_ | None,
    out: Path_,
    *,
    name: str | None = None,
    split: PrepareSplit = "both",
    vae: str | None = None,
    clip: str | None = None,
    resolution: int = 256,
    batch_size: int = 64,
    items_per_shard: int = 1000,
    dtype: StorageDtype = "float16",
    precision: EncoderPrecision = "fp32",
    num_workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """MS-COCO 2014 as U-ViT (spec §5.1): moments (8, 32, 32) per image, CLIP features of all its captions."""
    coco_root = data_root("coco", coco_root)
    from uvit_cli.prepare.run import PrepareSpec, SplitJob, run
    from uvit_cli.prepare.sources import coco_sources

    splits = ["train", "val"] if split == "both" else [split]
    jobs = [SplitJob(s, coco_sources(coco_root, s)) for s in splits]
    spec = PrepareSpec(
        kind="coco",
        space="latent",
        resolution=resolution,
        crop="lanczos",
        flip=False,
        conditioning="text",
        vae=vae,
        clip=clip,
        dtype=dtype,
        items_per_shard=items_per_shard,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    return run(set_dir(out, name or dataset_name("coco", resolution)), spec, jobs, progress)


def prepare_imagenet(
    root: Path_ | None,
    out: Path_,
    *,
    name: str | None = None,
    resolution: int | None = None,
    space: Space = "latent",
    vae: str | None = None,
    batch_size: int = 64,
    items_per_shard: int = 1000,
    dtype: StorageDtype = "float16",
    precision: EncoderPrecision = "fp32",
    num_workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """ImageNet train as U-ViT (spec §5.3, §5.4): ADM centre crop and class label, then either the moments
    of the image and its flip (latent: 256 or 512) or the uint8 pixels (pixel: 64; flipped at train time)."""
    root = data_root("imagenet", root)
    from uvit_cli.prepare.run import PrepareSpec, SplitJob, run
    from uvit_cli.prepare.sources import imagenet_sources

    pixel = space == "pixel"
    if resolution is None:
        resolution = 64 if pixel else 256
    if pixel and resolution != 64:
        raise DataError(f"--resolution {resolution}: U-ViT's ImageNet pixels are 64 (--space pixel)")
    if not pixel and resolution not in (256, 512):
        raise DataError(f"--resolution {resolution}: U-ViT's ImageNet latents are 256 or 512")
    sources, classes = imagenet_sources(root)
    spec = PrepareSpec(
        kind="imagenet64" if pixel else "imagenet",
        space=space,
        resolution=resolution,
        crop="adm",
        flip=not pixel,  # the official ImageNet64 set flips at random while training instead
        conditioning="class",
        classes=classes,
        vae=vae,
        dtype=dtype,
        items_per_shard=items_per_shard,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    return run(
        set_dir(out, name or dataset_name("imagenet", resolution)),
        spec,
        [SplitJob("train", sources)],
        progress,
    )


def prepare_cifar10(
    root: Path_ | None,
    out: Path_,
    *,
    name: str | None = None,
    items_per_shard: int = 1000,
    num_workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """CIFAR-10 python pickles (spec §5.4): uint8 32x32 pixels and labels; train (data_batch_1..5), test."""
    root = data_root("cifar10", root)
    from uvit_cli.prepare.pixel_sets import cifar10_classes, cifar10_sources
    from uvit_cli.prepare.run import PrepareSpec, SplitJob, run

    classes = cifar10_classes(root)
    jobs = [SplitJob(s, cifar10_sources(root, s)) for s in ("train", "test")]
    spec = PrepareSpec(
        kind="cifar10",
        space="pixel",
        resolution=32,
        crop="none",
        flip=False,  # flipped at train time (data.random_flip)
        conditioning="class",  # kept for class-conditional runs; unconditional models ignore y
        classes=classes,
        items_per_shard=items_per_shard,
        batch_size=256,
        num_workers=num_workers,
    )
    return run(set_dir(out, name or dataset_name("cifar10", 32)), spec, jobs, progress)


def prepare_celeba(
    root: Path_ | None,
    out: Path_,
    *,
    name: str | None = None,
    resolution: int = 64,
    items_per_shard: int = 1000,
    num_workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """CelebA img_align_celeba (spec §5.4): 128x128 face crop, torchvision Resize(64), uint8 pixels, no labels."""
    root = data_root("celeba", root)
    from uvit_cli.prepare.pixel_sets import celeba_sources
    from uvit_cli.prepare.run import PrepareSpec, SplitJob, run

    if not 0 < resolution <= 128:
        raise DataError(f"--resolution {resolution}: the CelebA face crop is 128x128 (U-ViT: 64)")
    splits = celeba_sources(root)
    spec = PrepareSpec(
        kind="celeba",
        space="pixel",
        resolution=resolution,
        crop="celeba",
        flip=False,  # flipped at train time (data.random_flip)
        conditioning="none",
        items_per_shard=items_per_shard,
        batch_size=256,
        num_workers=num_workers,
    )
    out = set_dir(out, name or dataset_name("celeba", resolution))
    return run(out, spec, [SplitJob(split, sources) for split, sources in splits.items()], progress)


def prepare_folder(
    directory: Path_,
    out: Path_,
    *,
    name: str | None = None,
    space: Space = "latent",
    resolution: int = 256,
    crop: Crop = "adm",
    flip: bool = False,
    labels: FolderLabels = "auto",
    captions: FolderCaptions = "auto",
    vae: str | None = None,
    clip: str | None = None,
    batch_size: int = 64,
    items_per_shard: int = 1000,
    dtype: StorageDtype = "float16",
    precision: EncoderPrecision = "fp32",
    num_workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """A folder of images: captions from captions.jsonl or sidecar .txt files, classes from sub-folders."""
    from uvit_cli.prepare.run import PrepareSpec, SplitJob, run
    from uvit_cli.prepare.sources import folder_sources

    sources, classes, has_captions = folder_sources(directory, labels=labels, captions=captions)
    conditioning = "text" if has_captions else "class" if classes else "none"
    spec = PrepareSpec(
        kind="folder",
        space=space,
        resolution=resolution,
        crop=crop,
        flip=flip,
        conditioning=conditioning,
        classes=classes,
        vae=vae,
        clip=clip,
        dtype=dtype,
        items_per_shard=items_per_shard,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    out = set_dir(out, name or dataset_name("folder", resolution, directory))
    return run(out, spec, [SplitJob("train", sources)], progress)
