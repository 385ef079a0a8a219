"""What `uvit prepare` reads: source listings (COCO 2014, ImageNet, image folders) and image preprocessing.

Preprocessing follows the official scripts exactly (spec §5.1, §5.3, §5.4; the CIFAR-10 and CelebA
listings are in `pixel_sets`); every crop returns a uint8 HWC array and the float conversion
`x / 127.5 - 1` happens on the encoder's device (latent sets) or when the shards are read (pixel sets).

Three rules every listing follows: captions pass `caption_list` (a string, or a non-empty list of
strings); caption and annotation files are read by `read_text` (UTF-8, one line naming the file
otherwise); an image entry that is not a regular file (a named pipe, socket, device, broken link) is
listed with `Source.skip` and skipped without being opened. `source_sha256` is what a shard records of
each source it covers, so that a rerun finds sources whose contents changed under the same names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uvit_cli.errors import DataError
from uvit_cli.imageio import NotARegularFile, non_regular, read_regular

IMAGENET_EXTENSIONS = ("jpg", "jpeg", "png", "gif")  # the official list (datasets.py)
FOLDER_EXTENSIONS = (*IMAGENET_EXTENSIONS, "webp", "bmp", "tif", "tiff")


@dataclass
class Source:
    """One input image: a stable key (image id or relative path), its file, and its condition.

    `pixels` (uint8 HWC) holds an image that comes decoded already (CIFAR-10's pickles); `path` then
    names where it came from. `skip` says why the file is skipped without being opened (it is not a
    regular file).
    """

    key: str
    path: str
    label: int | None = None
    captions: list[str] | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    skip: str | None = None


def source_sha256(src: Source, raw: bytes | None = None) -> str:
    """Digest of everything a source contributes to a shard: key, label, captions and content (the file's
    bytes, `raw` when already read; the decoded pixels; or that it is skipped or unreadable)."""
    h = hashlib.sha256(json.dumps([src.key, src.label, src.captions]).encode())
    if src.skip is not None:
        h.update(b"\0skipped\0" + src.skip.encode())
    elif src.pixels is not None:
        h.update(f"\0pixels {src.pixels.dtype} {src.pixels.shape}\0".encode())
        h.update(np.ascontiguousarray(src.pixels).tobytes())
    else:
        if raw is None:
            try:
                raw = read_regular(src.path)
            except (OSError, NotARegularFile):  # gone or unreadable: the decode worker records the same
                raw = None
        h.update(b"\0unreadable\0" if raw is None else b"\0file\0")
        h.update(raw or b"")
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# Captions and text files


def _shown(value: Any) -> str:
    """A JSON value as an error message shows it: `null`, `42`, `{"a": 1}` (shortened)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def caption_list(value: Any, where: str, *, many: bool = True, blank_ok: bool = False) -> list[str]:
    """The one caption rule: a caption is a string; `many` also allows a non-empty list of strings. Blank
    (empty or whitespace-only) captions are refused unless `blank_ok`. DataError names `where`."""
    texts = value if many and isinstance(value, list) else [value]
    if not texts:
        raise DataError(f"{where}: an empty list of captions; give at least one, or leave the image out")
    for text in texts:
        if not isinstance(text, str):
            kind = "a string or a list of strings" if many else "a string"
            raise DataError(f"{where}: a caption must be {kind}, not {_shown(text)}")
        if not blank_ok and not text.strip():
            raise DataError(f"{where}: an empty caption; write its text, or leave the image out")
    return list(texts)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (captions, annotations, a split list), or one DataError line naming it."""
    kind = non_regular(path)
    if kind is not None:
        raise DataError(f"{path}: the {what} is {kind}, not a regular file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8"
        ) from None


def _load_json(text: str) -> Any:
    """json.loads, with nesting too deep for Python's parser reported as the ValueError it is."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


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
    if not os.path.lexists(ann):
        raise DataError(f"{ann}: COCO caption annotations not found (get annotations_trainval2014.zip)")
    text = read_text(ann, "COCO caption annotation file")
    try:
        meta = _load_json(text)
        files = {int(im["id"]): im["file_name"] for im in meta["images"]}
        bad = next((f for f in files.values() if not isinstance(f, str) or not f), None)
        if bad is not None:
            raise ValueError(f"an image's file_name is {_shown(bad)}")
        # pycocotools (U-ViT's MSCOCODatabase): getAnnIds lists an image's annotation ids in file order and
        # loadAnns looks each id up in a dict, so an id used twice yields its last annotation both times.
        by_id = {a["id"]: a for a in meta["annotations"] if "id" in a}
        caps: dict[int, list[str]] = {}
        for a in meta["annotations"]:  # grouped by this annotation's image, text from the id lookup
            source = by_id[a["id"]] if "id" in a else a
            where = f"{ann}: annotation {_shown(a['id'])}" if "id" in a else f"{ann}: an annotation"
            # blank text is kept: the official extraction encodes every annotation's text as it is
            (caption,) = caption_list(source["caption"], where, many=False, blank_ok=True)
            caps.setdefault(int(a["image_id"]), []).append(caption)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return [Source(str(i), str(images / files[i]), captions=caps.get(i, [])) for i in sorted(files)]


def list_images(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Image entries under root, recursively, as (posix path relative to root, None for a regular file or
    what the entry is instead: "a named pipe", "a broken symbolic link", ...), in the official order.

    U-ViT's `_list_image_files_recursively` walks depth first through each directory's entries sorted by
    name, files and sub-folders interleaved. That is not the order of the sorted full paths: "a/x.jpg"
    comes before "a-b/y.jpg" here, after it in a path sort ("-" < "/"). Unlike the official function, hidden
    entries (".DS_Store", "._x.jpg") and other files are skipped rather than crashing the listing, and a
    directory reached twice through symbolic links is walked once.
    """
    found: list[tuple[str, str | None]] = []
    seen: set[tuple[int, int]] = set()

    def walk(directory: Path, prefix: str) -> None:
        st = directory.stat()
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():  # follows symlinks, as os.listdir does
                walk(Path(e.path), f"{prefix}{e.name}/")
            elif "." in e.name and e.name.rsplit(".", 1)[1].lower() in extensions:
                found.append((prefix + e.name, None if e.is_file() else non_regular(e.path)))

    walk(root, "")
    return found


def imagenet_sources(root: str | os.PathLike[str]) -> tuple[list[Source], list[str]]:
    """ImageNet train: files under `<root>/train`, sorted; label = index of the file's synset (name before '_')."""
    train = Path(root) / "train"
    _require_dir(train, "ImageNet training folder (train/ with one sub-folder per synset)")
    listed = list_images(train, IMAGENET_EXTENSIONS)
    if not listed:
        raise DataError(f"{train}: no images found")
    synset = [Path(r).name.split("_")[0] for r, _ in listed]
    classes = sorted(set(synset))
    index = {c: i for i, c in enumerate(classes)}
    sources = [
        Source(r, str(train / r), label=index[s], skip=skip)
        for (r, skip), s in zip(listed, synset, strict=True)
    ]
    return sources, classes


_JSONL_RECORD = '{"file": ..., "caption": "..."} or {"file": ..., "captions": ["...", ...]}'


def _folder_captions(root: Path, rel: list[str]) -> dict[str, list[str]]:
    """Captions from `<root>/captions.jsonl` ({"file", "caption" | "captions"} per line: a string or a list
    of strings under either key), else from a sidecar .txt beside each image (one caption per non-blank line)."""
    jsonl = root / "captions.jsonl"
    out: dict[str, list[str]] = {}
    if os.path.lexists(jsonl):
        for n, line in enumerate(read_text(jsonl, "captions file").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{n}"
            try:
                rec = _load_json(line)
            except ValueError as e:
                raise DataError(f"{where}: not JSON ({e}); expected {_JSONL_RECORD}") from None
            keys = [k for k in ("caption", "captions") if isinstance(rec, dict) and k in rec]
            if not (isinstance(rec, dict) and isinstance(rec.get("file"), str) and rec["file"] and keys):
                raise DataError(f"{where}: expected {_JSONL_RECORD}, not {_shown(rec)}")
            if len(keys) == 2:
                raise DataError(f'{where}: both "caption" and "captions"; give one of them')
            caps = caption_list(rec[keys[0]], where)
            out.setdefault(Path(rec["file"]).as_posix(), []).extend(caps)
        return out
    for r in rel:
        txt = (root / r).with_suffix(".txt")
        if os.path.lexists(txt):
            lines = [c.strip() for c in read_text(txt, "caption file").splitlines() if c.strip()]
            out[r] = caption_list(lines, str(txt)) if lines else []
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
    listed = list_images(root, FOLDER_EXTENSIONS)
    if not listed:
        raise DataError(f"{root}: no images found ({', '.join(FOLDER_EXTENSIONS)})")
    rel = [r for r, _ in listed]
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
            skip=skip,
        )
        for (r, skip), t in zip(listed, tops, strict=True)
    ]
    return sources, classes, bool(caps)
