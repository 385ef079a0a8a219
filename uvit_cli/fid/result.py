"""What `uvit fid` returns and records: the numbers, the one-line summary, the protocol stamp."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvit_cli.fileio import write_json_atomic

MIN_IMAGES = 2048  # below the feature dimension the covariance is singular and FID is biased upward

# The summary line's name and format of each number, in the order printed (stamp keys).
_SHOWN = {
    "fid": ("FID", ".4f"),
    "sfid": ("sFID", ".4f"),
    "inception_score": ("IS", ".3f"),
    "precision": ("precision", ".4f"),
    "recall": ("recall", ".4f"),
    "clip_score": ("CLIP", ".4f"),
}


def samples_stamp_path(samples: str | os.PathLike, mode: str) -> Path:
    """Where the stamp of `uvit fid SAMPLES REF` goes unless told: SAMPLES.fid-MODE.json beside the samples."""
    p = Path(samples)
    base = p.with_suffix("") if p.suffix == ".npz" else p
    return base.parent / f"{base.name}.fid-{mode}.json"


@dataclass
class FidResult:
    fid: float  # clamped at 0 when fid_raw is within round-off below it; NaN when fid was not asked
    fid_raw: float
    num_images: int
    stamp: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    is_main: bool = True  # rank 0 under torchrun: the one that prints and writes
    # every number measured, by stamp key (fid, sfid, inception_score, precision, recall, clip_score)
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """The one result line: the numbers, protocol, what was measured against what (and how, when generated)."""
        s = self.stamp
        values = self.metrics or ({"fid": self.fid} if not math.isnan(self.fid) else {})
        shown = "  ".join(f"{name} {values[k]:{fmt}}" for k, (name, fmt) in _SHOWN.items() if k in values)
        inc = (s["inception"]["sha256"] or "custom")[:12]
        line = f"{shown}  mode {s['mode']}  images {s['num_images']}  inception {inc}  ref {s['reference']['sha256'][:12]}"
        g = s["samples"].get("generator")
        if g:
            gi = f" interval {g['guidance_interval']}" if g["guidance_interval"] else ""
            rate = self.num_images / max(s["seconds"], 1e-9)
            line += (
                f"  {g['preset']} {g['solver']} {g['steps']} steps cfg {g['cfg_scale']:g}{gi} seed {g['seed']}  "
                f"ckpt {g['checkpoint_sha256'][:12]}  {rate:.2f} img/s"
            )
        return line

    def default_stamp_path(self) -> Path:
        """Where the stamp goes unless told: beside the samples (SAMPLES.fid-MODE.json), or for a checkpoint
        beside it, named by what changes the number (<ckpt>.fid-MODE-nN-SOLVERSTEPS-cfgS-seedS.json); for a
        checkpoint in the Hugging Face cache (`--ckpt org/name`), which uvit never writes into, in the current
        folder as <org>--<name>.<file>.fid-....json."""
        s = self.stamp
        g = s["samples"].get("generator")
        if g:
            ck = Path(g["checkpoint"])
            tag = f"{s['mode']}-n{g['n']}-{g['solver']}{g['steps']}-cfg{g['cfg_scale']:g}-seed{g['seed']}"
            if (
                s.get("protocol", {}).get("label_protocol") == "balanced"
            ):  # random (the paper's) keeps its name
                tag += "-balanced"
            repo = _hub_repo(ck)
            if repo is not None:
                return Path.cwd() / f"{repo}.{ck.stem}.fid-{tag}.json"
            return ck.with_name(f"{ck.stem}.fid-{tag}.json")
        return samples_stamp_path(s["samples"]["path"], s["mode"])


def _hub_repo(file: Path) -> str | None:
    """`org--name` of a file in the Hugging Face cache (models--org--name/snapshots/REV/...), else None."""
    from uvit_cli.encoders.weights import hf_hub_cache

    try:
        rel = file.absolute().relative_to(hf_hub_cache().expanduser().absolute())
    except ValueError:
        return None
    top = rel.parts[0] if rel.parts else ""
    return top.removeprefix("models--") if top.startswith("models--") else None


@dataclass
class RefResult:
    path: Path | None  # None on ranks other than 0
    num_images: int
    stamp: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    is_main: bool = True


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("uvit", "clean-fid", "torch", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def size_warnings(n: int, sizes: set[tuple[int, int]], metrics: tuple[str, ...] = ("fid",)) -> list[str]:
    out = []
    if n < MIN_IMAGES and ("fid" in metrics or "sfid" in metrics):
        out.append(
            f"only {n} images: below {MIN_IMAGES} the covariance is singular and FID is biased upward "
            "(the paper uses 50,000; 30,000 for MS-COCO)"
        )
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        out.append(f"images of {len(sizes)} sizes ({shown}...): each was resized to 299x299 on its own")
    return out


def make_stamp(
    metric: str,
    fields: dict[str, Any],
    inception: dict[str, Any],
    device: Any,
    sizes: set[tuple[int, int]],
    world: int,
    t0: float,
    warns: list[str],
) -> dict[str, Any]:
    """A protocol stamp: `metric`, `fields`, then what every stamp records (Inception, image sizes, device,
    ranks, seconds since `t0`, package versions, warnings)."""
    return {
        "metric": metric,
        **fields,
        "inception": inception,
        "image_sizes": [f"{h}x{w}" for h, w in sorted(sizes)[:8]],
        "device": str(device),
        "world_size": world,
        "seconds": round(time.time() - t0, 2),
        "versions": versions(),
        "warnings": warns,
    }


def write_stamp(path: str | os.PathLike, stamp: dict[str, Any]) -> Path:
    """The protocol stamp as indented JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, stamp, indent=2)
    return p
