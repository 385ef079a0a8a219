"""What `uvit prepare` reads: source listings (COCO 2014, ImageNet, image folders) and image preprocessing.

Preprocessing follows the official scripts exactly (spec §5.1, §5.3, §5.4; the CIFAR-10 and CelebA
listings are in `pixel_sets`); every crop returns a uint8 HWC array and the float conversion
`x / 127.5 - 1` happens on the encoder's device (latent sets) or when the shards are read (pixel sets).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uvit_cli.errors import DataError

IMAGENET_EXTENSIONS = ("jpg", "jpeg", "png", "gif")  # the official list (datasets.py)
FOLDER_EXTENSIONS = (*IMAGENET_EXTENSIONS, "webp", "bmp", "tif", "tiff")


@dataclass
class Source:
    """One input image: a stable key (image id or relative path), its file, and its condition.

    `pixels` (uint8 HWC) holds an image that comes decoded already (CIFAR-10's pickles); `path` then
    names where it came from.
    """

    key: str
    path: str
    label: int | None = None
    captions: list[str] | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------------------------------
# Preprocessing


def center_crop_lanczos(img: Image.Image, resolution: int) -> np.ndarray:
    """COCO (spec §5.1): numpy centre crop to the short side, offset (dim - side) // 2, then LANCZOS."""
    arr = np.asarray(img)
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    arr = arr[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(arr).resize((resolution, resolution), Image.LANCZOS))


def center_crop_adm(img: Image.Image, resolution: int) -> np.ndarray:
    """ImageNet (spec §5.3, ADM): BOX-halve while the short side >= 2*res, BICUBIC to short side res, crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


# The official CelebA Crop(x1=57, x2=185, y1=25, y2=153) calls F.crop(img, top=57, left=25, 128, 128):
# the 128x128 face box of the 178x218 aligned images, as a PIL box (left, top, right, bottom).
CELEBA_SIZE = (178, 218)
CELEBA_BOX = (25, 57, 153, 185)


def celeba_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """CelebA (spec §5.4): the 128x128 face box, then torchvision's Resize(res) on a PIL image.

    For PIL input torchvision 0.29 calls `img.resize((w, h), BILINEAR)`: PIL's bilinear filter, whose
    support widens with the scale factor (PIL always antialiases), and leaves an image already at size alone.
    """
    if img.size != CELEBA_SIZE:
        raise ValueError(f"{img.size[0]}x{img.size[1]} image; img_align_celeba images are 178x218")
    img = img.crop(CELEBA_BOX)
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(img)


def no_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """Images that are already res x res (CIFAR-10): stored unchanged."""
    if img.size != (resolution, resolution):
        raise ValueError(f"{img.size[0]}x{img.size[1]} image, expected {resolution}x{resolution}")
    return np.asarray(img)


CROPS = {"lanczos": center_crop_lanczos, "adm": center_crop_adm, "celeba": celeba_crop, "none": no_crop}
CROP_DESCRIPTIONS = {
    "lanczos": "RGB; centre square crop (offset (dim-side)//2); PIL LANCZOS resize; x/127.5-1 (U-ViT COCO)",
    "adm": "RGB; BOX halving while short side >= 2*res; BICUBIC short side to res (rounded); centre crop;"
    " x/127.5-1 (ADM / U-ViT ImageNet)",
    "celeba": "RGB 178x218; crop 128x128 at top 57, left 25; torchvision Resize(res) on PIL (BILINEAR,"
    " PIL's antialiasing); x/127.5-1 (U-ViT CelebA)",
    "none": "RGB; no crop or resize (images are already res x res, e.g. CIFAR-10 rows as 3x32x32); x/127.5-1",
}


# --------------------------------------------------------------------------------------------------
# Listings


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")


def coco_sources(coco_root: str | os.PathLike[str], split: str) -> list[Source]:
    """COCO 2014: `<root>/<split>2014/*.jpg` and `<root>/annotations/captions_<split>2014.json`, by image id."""
    root = Path(coco_root)
    images = root / f"{split}2014"
    ann = root / "annotations" / f"captions_{split}2014.json"
    _require_dir(images, f"COCO {split} image folder ({split}2014/)")
    if not ann.is_file():
        raise DataError(f"{ann}: COCO caption annotations not found (get annotations_trainval2014.zip)")
    try:
        meta = json.loads(ann.read_text(encoding="utf-8"))
        files = {int(im["id"]): im["file_name"] for im in meta["images"]}
        # pycocotools (U-ViT's MSCOCODatabase): getAnnIds lists an image's annotation ids in file order and
        # loadAnns looks each id up in a dict, so an id used twice yields its last annotation both times.
        by_id = {a["id"]: a for a in meta["annotations"] if "id" in a}
        caps: dict[int, list[str]] = {}
        for a in meta["annotations"]:  # grouped by this annotation's image, text from the id lookup
            text = by_id[a["id"]]["caption"] if "id" in a else a["caption"]
            caps.setdefault(int(a["image_id"]), []).append(str(text))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return [Source(str(i), str(images / files[i]), captions=caps.get(i, [])) for i in sorted(files)]


def list_images(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Image files under root, recursively, as posix paths relative to root, in the official order.

    U-ViT's `_list_image_files_recursively` walks depth first through each directory's entries sorted by
    name, files and sub-folders interleaved. That is not the order of the sorted full paths: "a/x.jpg"
    comes before "a-b/y.jpg" here, after it in a path sort ("-" < "/"). Unlike the official function, hidden
    entries (".DS_Store", "._x.jpg") and other files are skipped rather than crashing the listing.
    """
    found: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():  # follows symlinks, as os.listdir does
                walk(Path(e.path), f"{prefix}{e.name}/")
            elif "." in e.name and e.name.rsplit(".", 1)[1].lower() in extensions:
                found.append(prefix + e.name)

    walk(root, "")
    return found


def imagenet_sources(root: str | os.PathLike[str]) -> tuple[list[Source], list[str]]:
    """ImageNet train: files under `<root>/train`, sorted; label = index of the file's synset (name before '_')."""
    train = Path(root) / "train"
    _require_dir(train, "ImageNet training folder (train/ with one sub-folder per synset)")
    rel = list_images(train, IMAGENET_EXTENSIONS)
    if not rel:
        raise DataError(f"{train}: no images found")
    synset = [Path(r).name.split("_")[0] for r in rel]
    classes = sorted(set(synset))
    index = {c: i for i, c in enumerate(classes)}
    return [Source(r, str(train / r), label=index[s]) for r, s in zip(rel, synset, strict=True)], classes


def _folder_captions(root: Path, rel: list[str]) -> dict[str, list[str]]:
    """Captions from `<root>/captions.jsonl` ({"file", "caption" | "captions"} per line), else sidecar .txt."""
    jsonl = root / "captions.jsonl"
    out: dict[str, list[str]] = {}
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                caps = rec["captions"] if "captions" in rec else [rec["caption"]]
                out.setdefault(Path(rec["file"]).as_posix(), []).extend(str(c) for c in caps)
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f'{jsonl}:{n}: expected {{"file": ..., "caption": ...}} or {{"file": ..., "captions": [...]}}'
                ) from None
        return out
    for r in rel:
        txt = (root / r).with_suffix(".txt")
        if txt.is_file():
            out[r] = [c.strip() for c in txt.read_text(encoding="utf-8").splitlines() if c.strip()]
    return out


def folder_sources(
    root: str | os.PathLike[str], labels: str = "auto", captions: str = "auto"
) -> tuple[list[Source], list[str] | None, bool]:
    """Images under root; returns (sources, class names or None, has captions).

    labels: "folders" = class from the first-level sub-folder; "auto" = that when every image is in one
    and there are at least two; "none". captions: "auto" = use captions.jsonl / sidecar .txt if any; "none".
    """
    root = Path(root)
    _require_dir(root, "image folder")
    rel = list_images(root, FOLDER_EXTENSIONS)
    if not rel:
        raise DataError(f"{root}: no images found ({', '.join(FOLDER_EXTENSIONS)})")
    caps = _folder_captions(root, rel) if captions == "auto" else {}
    tops = [r.split("/", 1)[0] if "/" in r else None for r in rel]
    use_labels = labels == "folders" or (
        labels == "auto" and not caps and None not in tops and len(set(tops)) > 1
    )
    if use_labels and None in tops:
        raise DataError(f"{root}: --labels folders needs every image inside a class sub-folder")
    classes = sorted(set(tops)) if use_labels else None  # type: ignore[arg-type]
    index = {c: i for i, c in enumerate(classes or [])}
    sources = [
        Source(
            r,
            str(root / r),
            label=index[t] if use_labels else None,
            captions=caps.get(r, []) if caps else None,
        )
        for r, t in zip(rel, tops, strict=True)
    ]
    return sources, classes, bool(caps)
