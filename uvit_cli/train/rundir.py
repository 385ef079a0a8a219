"""The run directory (layout in `uvit_cli.checkpoint`): the preset it was made with, the data it trains on,
its metrics, and the checks that data fits the model."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvit_cli.checkpoint import METRICS_FILE, PRESET_FILE
from uvit_cli.config import Preset, preset_from_toml
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.fileio import write_json_atomic, write_text_atomic

# What may change between two invocations on the same run dir without --force: run length, logging and
# checkpoint cadence, loader threads, compilation, where the shards live, how samples are drawn, how
# FID is measured during training, and where the numbers are logged ([log]: TensorBoard, W&B).
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
    "log",
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


@dataclass
class RunDirClaim:
    """What `check_run_dir` found: warnings to show, and where the old preset goes when this run's preset
    is recorded (`record_run_dir`)."""

    notes: list[str] = field(default_factory=list)
    keep_old_as: Path | None = None  # preset.<unix time>.toml: the old preset.toml differs from this one


def check_run_dir(run_dir: Path, preset: Preset, force: bool) -> RunDirClaim:
    """Check that `run_dir` is new or belongs to `preset`. Writes nothing: a start that fails after this
    leaves the run dir as it was, so the corrected rerun is not refused.

    A run dir made by a different preset is refused unless `force`; a change of a RECOVERY setting only
    warns. Either way `record_run_dir` keeps the old preset file as `preset.<unix time>.toml`.
    """
    path = run_dir / PRESET_FILE
    claim = RunDirClaim()
    if not path.exists():
        return claim
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
        if diffs or recovery:
            claim.keep_old_as = kept = run_dir / f"preset.{int(time.time())}.toml"
            claim.notes += [f"{d} from here on (the old preset is kept as {kept.name})" for d in recovery]
    return claim


def record_run_dir(run_dir: Path, preset: Preset, claim: RunDirClaim, data: dict[str, Any]) -> None:
    """Write the run's preset and the record of its data (rank 0, once the start has succeeded)."""
    path = run_dir / PRESET_FILE
    if claim.keep_old_as is not None and path.exists():
        os.replace(path, claim.keep_old_as)
    write_text_atomic(path, preset.to_toml())
    write_json_atomic(run_dir / DATA_FILE, data, indent=2)


# --------------------------------------------------------------------------------------------------
# The data a run trains on: recorded at its start, checked when it resumes

DATA_FILE = "data.json"


def data_identity(ds: Any) -> dict[str, Any]:
    """The record of a prepared set's split (`ds`, a FeatureDataset): its identity, a digest of the settings
    fingerprint and of every shard's sha256 in the manifest (the same set moved elsewhere keeps it; another
    set, or one re-made from other sources, does not), and where it was, as a hint for a person."""
    from uvit_cli.data.format import split_entry

    entry = split_entry(ds.manifest, ds.root, ds.split)
    content = {
        "fingerprint": ds.manifest["fingerprint"],
        "split": ds.split,
        "shards": [[s["name"], s["count"], s["sha256"]] for s in entry["shards"]],
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return {"identity": digest, "path": str(Path(ds.root).resolve()), "split": ds.split, "items": len(ds)}


def check_data(run_dir: Path, data: dict[str, Any], *, resuming: bool, data_changed: bool) -> list[str]:
    """Refuse to resume `run_dir` on another prepared set than the one it trained on (`data_identity`),
    unless `data_changed` (then it warns). Returns warnings. A new run, or a run dir from before the record
    existed, is not checked."""
    try:
        old = json.loads((run_dir / DATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        old = None
    if not resuming or not isinstance(old, dict) or old.get("identity") == data["identity"]:
        return []
    was = f"{old.get('path', '?')} (data {str(old.get('identity'))[:12]})"
    now = f"{data['path']} (data {data['identity'][:12]})"
    if not data_changed:
        raise DataError(
            f"{run_dir} was trained on the prepared set {was}, but data.path now gives another one, {now}: "
            "point data.path back at the first, or pass --data-changed to continue this run on the new set"
        )
    return [f"the run continues on {now}, not on {was} (--data-changed)"]


# --------------------------------------------------------------------------------------------------
# metrics.jsonl


def metrics_record(value: Any) -> dict[str, Any] | None:
    """`value` (a parsed metrics.jsonl line) if it is a record: a JSON object whose `step` is a finite
    number >= 0. Every reader of metrics.jsonl skips the rest."""
    if type(value) is not dict:
        return None
    step = value.get("step")
    if isinstance(step, bool) or not isinstance(step, int | float):  # a bool is an int, but no step
        return None
    return value if math.isfinite(step) and step >= 0 else None


def _read_records(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """((line, record) of every record line, numbers of the other lines) of a metrics file. A last line
    without its newline (cut short by a kill) is neither: it is dropped without a word."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and not data.endswith(b"\n"):
        lines.pop()  # cut short by a kill, or empty
    records, bad = [], []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            record = metrics_record(json.loads(text))
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; 1e999-deep lists
            record = None
        if record is None:
            bad.append(i)
        else:
            records.append((text.strip(), record))
    return records, bad


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, entries past the resumed step (from a killed run) are dropped,
    and so are lines that are not records (`metrics_record`), with one warning (`note`). Every record
    written also goes to each of `listeners` (the run's trackers, `train.tracking`). `logged_through` is
    the last step the file held before the resume dropped anything."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        self.note: str | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.logged_through = resume_step
        if self.path.exists():
            records, bad = _read_records(self.path)
            self.logged_through = max([int(r["step"]) for _, r in records] + [resume_step])
            kept = [line for line, r in records if r["step"] <= resume_step]
            if bad:
                lines = f"line {bad[0]}" if len(bad) == 1 else f"{len(bad)} lines (the first: line {bad[0]})"
                self.note = (
                    f"{self.path}: {lines} not a metrics record (a JSON object with a numeric step); "
                    "skipped and dropped from the file"
                )
            write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener(record)


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in file order (lines that are not records are skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [r for _, r in _read_records(path)[0]]


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
