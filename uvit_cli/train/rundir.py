"""The run directory (layout in `uvit_cli.checkpoint`), the preset it was made with, metrics, data checks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from uvit_cli.checkpoint import METRICS_FILE, PRESET_FILE
from uvit_cli.config import Preset, preset_from_toml
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.fileio import write_text_atomic

# What may change between two invocations on the same run dir without --force: run length, logging and
# checkpoint cadence, loader threads, compilation, where the shards live, how samples are drawn and how
# FID is measured during training.
# Everything else (model, schedule, data set, optimiser recipe, seed) decides what the run IS.
MUTABLE = {
    "description",
    "data.path",
    "train.steps",
    "train.log_interval",
    "train.sample_interval",
    "train.save_interval",
    "train.keep_last",
    "train.compile",
    "train.num_workers",
    "sample",
    "eval",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# What a rerun may change to recover a run that diverged (the advice of the divergence stop): allowed
# without --force, reported as a warning, and the old preset file is kept beside the new one.
RECOVERY = {"train.lr", "train.grad_clip"}


def preset_differences(old: Preset, new: Preset, skip: set[str] = MUTABLE | RECOVERY) -> list[str]:
    """`key: old -> new` for every setting that differs and is not in `skip` (a key or its table)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in skip or key.split(".")[0] in skip:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def claim_run_dir(run_dir: Path, preset: Preset, force: bool, write: bool = True) -> list[str]:
    """Create the run dir or check it belongs to `preset`; write the resolved preset. Returns warnings.

    A run dir made by a different preset is refused unless `force`; a change of a RECOVERY setting only
    warns. Either way the old preset file is kept as `preset.<unix time>.toml` and the new one replaces it.
    Only the writer (`write`, rank 0) touches files.
    """
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PRESET_FILE
    notes: list[str] = []
    if path.exists():
        old: Preset | None = None
        try:
            old = preset_from_toml(path.read_text(encoding="utf-8"), source=str(path))
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            if not force:
                raise ConfigError(f"{path}: unreadable ({e}); pass --force to replace it") from None
        if old is not None:
            diffs = preset_differences(old, preset)
            if diffs and not force:
                more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
                raise ConfigError(
                    f"{run_dir} was created by a different preset ({'; '.join(diffs[:3])}{more}); "
                    "use another --run-dir, or --force to continue it with the new settings"
                )
            recovery = preset_differences(old, preset, skip=set())
            recovery = [d for d in recovery if d.split(":")[0] in RECOVERY]
            if (diffs or recovery) and write:
                kept = run_dir / f"preset.{int(time.time())}.toml"
                os.replace(path, kept)
                notes += [f"{d} from here on (the old preset is kept as {kept.name})" for d in recovery]
    if write:
        write_text_atomic(path, preset.to_toml())
    return notes


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, entries past the resumed step (from a killed run) are dropped."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
            write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_data_fits(preset: Preset, ds: Any) -> None:
    """Refuse shards whose space, shape, channels, context width or classes do not fit the model."""
    m, where = preset.model, f"{ds.root}"
    if ds.space != preset.data.space:
        raise DataError(f"{where} holds {ds.space} shards but the preset trains on {preset.data.space} data")
    want = (m.in_chans, m.img_size, m.img_size)
    if tuple(ds.z_shape) != want:
        what = "latents" if ds.space == "latent" else "images"
        raise DataError(
            f"{where} holds {what} of shape {tuple(ds.z_shape)} but the model takes {want} "
            "(model.in_chans, model.img_size); prepare the data at the preset's resolution"
        )
    cond = m.conditioning
    if cond == "text":
        if ds.conditioning != "text":
            raise DataError(
                f"{where} has no captions ({ds.conditioning} set) but the model is text-conditional"
            )
        ctx = tuple(ds.manifest.get("context_shape") or ())
        if ctx != (m.num_clip_token, m.clip_dim):
            raise DataError(
                f"{where} holds text contexts of shape {ctx} but the model takes "
                f"({m.num_clip_token}, {m.clip_dim}) (model.num_clip_token, model.clip_dim)"
            )
    elif cond == "class":
        if ds.conditioning != "class":
            raise DataError(
                f"{where} has no class labels ({ds.conditioning} set) but the model is class-conditional"
            )
        k, p = ds.num_classes, preset.train.p_uncond
        need = k + 1 if p > 0 else k
        if m.num_classes not in ((k + 1,) if p > 0 else (k, k + 1)):
            null = " plus the CFG null class" if p > 0 else ""
            raise DataError(
                f"{where} has {k} classes{null}, so model.num_classes must be {need}, not {m.num_classes}"
            )
    elif preset.train.p_uncond > 0:
        raise ConfigError(
            "train.p_uncond > 0 needs a conditional model (model.num_classes or model.clip_dim)"
        )
