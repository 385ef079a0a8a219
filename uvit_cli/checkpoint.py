"""Checkpoints: safetensors weights with the resolved preset in their metadata, and the training state.

    <run_dir>/preset.toml                     the resolved preset the run was started with
    <run_dir>/data.json                       the identity of the prepared set it trains on (train.rundir)
    <run_dir>/metrics.jsonl                   one JSON object per log interval
    <run_dir>/ckpts/<step:08d>/model.safetensors   online weights  } metadata: format, preset (TOML),
    <run_dir>/ckpts/<step:08d>/ema.safetensors     EMA weights     } step, weights, uvit_version
    <run_dir>/ckpts/<step:08d>/state.pt       optimizer, LR scheduler, step, RNG states, data position
    <run_dir>/ckpts/latest                    text: the name of the newest complete step directory
    <run_dir>/samples/<step:08d>.png          sample grids of the EMA model

A step directory appears (rename) only when all its files are written, so a killed run never leaves a
half checkpoint under a step name; `latest` is replaced atomically after that. A step directory's step is
the one its weights record, not its name (`list_checkpoints`). Official `nnet.pth` /
`nnet_ema.pth` files (plain state dicts) load too: with the preset they belong to, or recognised by their
shapes among the packaged presets (`state_dicts`: reading them, key-by-key checks, recognition). A weights
file without an embedded preset takes the `preset.toml` beside it (an exported folder, `export.export`); a
`--ckpt` that names a Hub model (`org/name`, `hf://org/name/file`) is found through the Hugging Face cache
(`hub.resolve_hub`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uvit_cli.config import Preset, load_preset, preset_from_toml
from uvit_cli.errors import CheckpointError
from uvit_cli.fileio import atomic_open, atomic_path, fsync_dir, sha256_file, write_text_atomic
from uvit_cli.safe_pickle import torch_load_tensors
from uvit_cli.state_dicts import check_state_dict as check_state_dict
from uvit_cli.state_dicts import first_line, read_official, recognise_preset

if TYPE_CHECKING:
    import torch

    from uvit_cli.model import UViT

FORMAT = "uvit"
CKPTS = "ckpts"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
PRESET_FILE = "preset.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES = "samples"
_STEP_RE = re.compile(r"^\d{8,}$")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_MAX_HEADER_BYTES = 100 << 20  # safetensors refuses larger headers too


RUNS_DIR = Path("runs")


def default_run_dir(preset: Preset) -> Path:
    """Where `uvit train` writes a preset's run, and where `uvit sample --preset` looks: runs/<name>."""
    return RUNS_DIR / preset.name


def step_dir_name(step: int) -> str:
    return f"{step:08d}"


# --------------------------------------------------------------------------------------------------
# Weights


def save_weights(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    preset: Preset | None,
    step: int | None,
    weights: str,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write `state_dict` as safetensors with the uvit metadata (`extra` added to it; no step recorded when
    `step` is None); temp file + rename (atomic)."""
    from safetensors.torch import save_file

    from uvit_cli import __version__

    if weights not in ("ema", "model", "released"):  # released: the paper's files, which do not say
        raise ValueError(f"weights must be 'ema', 'model' or 'released', got {weights!r}")
    path = Path(path)
    meta = {**(extra or {}), "format": FORMAT, "weights": weights, "uvit_version": __version__}
    if step is not None:
        meta["step"] = str(int(step))
    if preset is not None:
        meta["preset"] = preset.to_toml()
    # safetensors wants contiguous, unshared CPU tensors; the copy also detaches from the live model.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    with write_errors(path), atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_weights(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], Preset | None, dict[str, str]]:
    """(state_dict, embedded preset or None, metadata) of a uvit safetensors file or an official .pth."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({first_line(e)})") from None
        preset = None
        if "preset" in meta:
            preset = preset_from_toml(meta["preset"], source=f"{path} (embedded preset)")
        return sd, preset, meta
    weights = "ema" if "ema" in path.stem else "model"
    return read_official(path), None, {"format": "official", "weights": weights}


# --------------------------------------------------------------------------------------------------
# Finding checkpoints in a run directory


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, directory) of a run's complete step directories, oldest first (temporaries are ignored).

    The step is the one the checkpoint records (`stored_step`), not its directory's name: a folder renamed
    to a higher number sorts where its contents belong. The name counts only where nothing is recorded."""
    d = Path(run_dir) / CKPTS
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    return sorted((_step_of(p), p) for p in found)


def _step_of(step_dir: Path) -> int:
    stored = stored_step(step_dir)
    return int(step_dir.name) if stored is None else stored


def stored_step(step_dir: Path) -> int | None:
    """The step a step directory's weights record (safetensors metadata, read from the header only), or
    None when neither weights file records one."""
    for name in (MODEL_FILE, EMA_FILE):
        try:
            with open(step_dir / name, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= _MAX_HEADER_BYTES:
                    continue
                header = json.loads(f.read(size))
        except (OSError, ValueError, RecursionError):
            continue
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        step = meta.get("step") if isinstance(meta, dict) else None
        if isinstance(step, str) and step.isdigit():
            return int(step)
    return None


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The step directory `ckpts/latest` names, else the highest step directory, else None."""
    d = Path(run_dir) / CKPTS
    try:
        name = (d / LATEST).read_text().strip()
    except OSError:
        name = ""
    if name and _STEP_RE.match(name) and (d / name).is_dir():
        return d / name
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path_or_run_dir: str | os.PathLike[str], ema: bool = True) -> Path:
    """A weights file from a file, a step directory, a run directory (its latest step) or a Hub reference
    (`org/name` where no such local path exists, `hf://org/name[/file]`: `hub.resolve_hub`); EMA preferred."""
    p = Path(path_or_run_dir)
    if p.is_file():
        return p
    from uvit_cli.hub import hub_ref, resolve_hub

    # `org/name` (no such local path) or `hf://org/name[/file]`: a Hub model, through the Hugging Face cache
    if (ref := hub_ref(path_or_run_dir)) is not None:
        return resolve_hub(ref, ema=ema)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such file or directory (pass a .safetensors/.pth file, a run dir or a Hub id ORG/NAME)"
        )
    step_dir = p
    if not (p / MODEL_FILE).exists() and not (p / EMA_FILE).exists():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(
                f"{p}: no checkpoint found (expected {CKPTS}/<step>/{EMA_FILE}; has the run saved one yet?)"
            )
        step_dir = latest
    order = (EMA_FILE, MODEL_FILE) if ema else (MODEL_FILE, EMA_FILE)
    for name in order:
        if (step_dir / name).is_file():
            return step_dir / name
    raise CheckpointError(f"{step_dir}: holds neither {EMA_FILE} nor {MODEL_FILE}")


# --------------------------------------------------------------------------------------------------
# Models


@dataclass
class CheckpointInfo:
    """Where a model's weights came from."""

    path: Path
    step: int | None
    weights: str  # "ema" | "model"
    sha256: str
    format: str  # "uvit" | "official"


def load_model(
    path: str | os.PathLike[str],
    preset: Preset | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[UViT, Preset, CheckpointInfo]:
    """Build the U-ViT of the embedded preset (or `preset`, required for official .pth) and load strictly."""
    from uvit_cli.model import UViT

    file = find_checkpoint(path, ema=ema)
    sd, embedded, meta = load_weights(file)
    preset = preset if preset is not None else embedded
    if preset is None and (file.parent / PRESET_FILE).is_file():  # an exported folder: weights + preset.toml
        preset = load_preset(file.parent / PRESET_FILE)
    if preset is None:
        preset = recognise_preset(sd, str(file))
    model = UViT(**preset.model)
    check_state_dict(model.state_dict(), sd, str(file))
    model.load_state_dict(sd, strict=True)
    model.eval().requires_grad_(False).to(device)
    step = meta.get("step")
    info = CheckpointInfo(
        path=file,
        step=int(step) if step is not None and str(step).isdigit() else None,
        weights=meta.get("weights", "ema" if ema else "model"),
        sha256=sha256_file(file),
        format=meta.get("format", FORMAT),
    )
    return model, preset, info


# --------------------------------------------------------------------------------------------------
# Training state and whole checkpoints


def save_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """torch.save `state` (tensors, numbers, strings, lists, dicts only: loadable with weights_only=True)."""
    import torch

    path = Path(path)
    with write_errors(path), atomic_open(path, "wb") as f:
        torch.save(dict(state), f)
    return path


# torch.save's zip writer reports a failed write as a RuntimeError ("PytorchStreamWriter failed writing
# file ...", "unexpected pos N vs M"); safetensors as a SafetensorError naming the OS error code.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Raise a failed write of `path` as an OSError naming `path`, so the CLI says what happened in one line
    (`PATH: the disk is full: ...`). The writers' own exceptions carry the OS error as their context or in
    their message; where torch's carries none, the write failed mid-file, which is a full disk."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except Exception as e:
        text = str(e)
        torch_failed = isinstance(e, RuntimeError) and any(m in text for m in _TORCH_WRITE_FAILED)
        code = _OS_ERROR_CODE.search(text) if type(e).__name__ == "SafetensorError" else None
        if not torch_failed and code is None:
            raise
        cause = e.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from None
        no = int(code[1]) if code is not None else errno.ENOSPC
        raise OSError(no, os.strerror(no), str(path)) from None


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:

    path = Path(path)
    try:
        state = torch_load_tensors(path)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training state ({first_line(e)})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: not a uvit training state (no step count)")
    return state


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    preset: Preset,
    keep_last: int,
) -> Path:
    """Write ckpts/<step> (temporary directory, then rename), move `latest` to it, prune to `keep_last`."""
    ckpts = Path(run_dir) / CKPTS
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / step_dir_name(step)
    tmp = ckpts / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(tmp / MODEL_FILE, model, preset, step, "model")
        save_weights(tmp / EMA_FILE, ema, preset, step, "ema")
        save_state(tmp / STATE_FILE, state)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run ends where it resumed)
            old = ckpts / f".old-{step_dir_name(step)}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(ckpts / LATEST, final.name + "\n")
    prune_checkpoints(run_dir, keep_last, keep=final)
    return final


def prune_checkpoints(
    run_dir: str | os.PathLike[str], keep_last: int, keep: Path | None = None
) -> list[Path]:
    """Delete all but the newest `keep_last` step directories (never `keep`), and stale temporaries."""
    found = list_checkpoints(run_dir)
    doomed = [p for _, p in found[: max(len(found) - max(keep_last, 1), 0)] if p != keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for p in (Path(run_dir) / CKPTS).glob(".tmp-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return doomed


def read_checkpoint(
    step_dir: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights, EMA weights, training state) of a step directory; CheckpointError if any is unreadable."""
    for name in (MODEL_FILE, EMA_FILE, STATE_FILE):
        if not (step_dir / name).is_file():
            raise CheckpointError(f"{step_dir}: {name} is missing")
    model, _, _ = load_weights(step_dir / MODEL_FILE)
    ema, _, _ = load_weights(step_dir / EMA_FILE)
    state = load_state(step_dir / STATE_FILE)
    return model, ema, state
