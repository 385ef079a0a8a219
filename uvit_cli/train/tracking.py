"""Run logging to TensorBoard and Weights & Biases (the preset's [log] table), on rank 0: every record of
metrics.jsonl at its step (`train/<key>`, `eval/<key>`), each sample grid (`samples`), the preset as text.

metrics.jsonl stays the record of the run; the trackers get what it gets, through `MetricsLog.listeners`.
A tracker that cannot start stops the start in one line (a missing extra names it); one that fails later
(a full disk, a W&B error) is one warning and is switched off, and training goes on.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from uvit_cli.config import LogConfig, Preset
from uvit_cli.errors import ConfigError
from uvit_cli.fileio import atomic_open, write_text_atomic

if TYPE_CHECKING:
    from uvit_cli.train.observers import Due

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files
WANDB_ID_FILE = "wandb_id"  # RUN/wandb_id: the W&B run id, made at the first start with [log] wandb
PRESET_TAG = "preset"  # the preset as text; TensorBoard stores it as "preset/text_summary"
GRID_TAG = "samples"  # the sample grids

NEEDS_TENSORBOARD = '[log] tensorboard = true needs TensorBoard: pip install "uvit[tensorboard]"'
NEEDS_WANDB = '[log] wandb = true needs Weights & Biases: pip install "uvit[wandb]"'


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {name: value}) of a metrics.jsonl record: an FID row's numbers as `eval/<key>`, a log
    record's as `train/<key>`; `step`, `time` and flags (`fid_is_best`) are not series."""
    prefix = "eval/" if "fid" in record else "train/"
    values = {
        prefix + k: float(v)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)
    }
    return int(record["step"]), values


def check_trackers(log: LogConfig) -> None:
    """Refuse, in one line naming the extra, a [log] tracker whose package is not installed."""
    if log.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
            from tensorboard.compat.proto import event_pb2  # noqa: F401
        except ImportError:
            raise ConfigError(NEEDS_TENSORBOARD) from None
    if log.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(NEEDS_WANDB) from None


# --------------------------------------------------------------------------------------------------
# TensorBoard


def _records(data: bytes) -> tuple[list[tuple[bytes, int, int]], bool]:
    """((body, start, end) of each record of a TFRecord file's bytes, whether the file ends cleanly).

    A record is u64 length, u32 masked CRC of the length, the body, u32 masked CRC of the body. Only the
    length's CRC is checked (the body's would cost ~0.1 s per MB in TensorBoard's pure-Python CRC); a tail
    cut short by a kill, or a length whose CRC fails, ends the list."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    found: list[tuple[bytes, int, int]] = []
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        if len(header) < 8 or pos + 12 > len(data):
            return found, False
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        end = pos + 12 + length + 4
        if crc != masked_crc32c(header) or end > len(data):
            return found, False
        found.append((data[pos + 12 : end - 4], pos, end))
        pos = end
    return found, True


def truncate_events(log_dir: Path, step: int) -> set[str]:
    """Drop every event past `step` from the event files in `log_dir` (written by a run killed after its
    last checkpoint), so that each step of each tag is written once, whichever reader reads the files.
    Files with nothing to drop are left as they are; the others are rewritten atomically from their
    kept records' bytes. Returns the tags that have an event at `step`."""
    from tensorboard.compat.proto import event_pb2

    at_step: set[str] = set()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        found, clean = _records(data)
        kept = []
        for body, start, end in found:
            event = event_pb2.Event()
            try:
                event.ParseFromString(body)
            except Exception:  # a damaged body (protobuf's DecodeError): the rest of the file goes with it
                clean = False
                break
            if event.step > step:
                continue
            kept.append((start, end))
            if event.step == step:
                at_step.update(v.tag for v in event.summary.value)
        if clean and len(kept) == len(found):
            continue
        with atomic_open(path, "wb") as f:
            for start, end in kept:
                f.write(data[start:end])
    return at_step


class _Sink(Protocol):
    name: str

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def grid(self, step: int, path: Path) -> None: ...
    def flush(self) -> None: ...
    def close(self, failed: bool) -> None: ...


class TensorBoardSink:
    """Event files in RUN/tensorboard/ through `torch.utils.tensorboard.SummaryWriter`; a resumed run first
    drops the events past its checkpoint (`truncate_events`), as metrics.jsonl drops its lines."""

    name = "TensorBoard"

    def __init__(self, run_dir: Path, resume_step: int, preset_toml: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(NEEDS_TENSORBOARD) from None
        log_dir = run_dir / TENSORBOARD_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        at_step = truncate_events(log_dir, resume_step)
        # flush_secs: what a kill -9 can lose; the loop also flushes at every checkpoint
        self.writer = SummaryWriter(str(log_dir), flush_secs=30)
        if f"{PRESET_TAG}/text_summary" not in at_step:  # the preset at each start, never twice at one step
            text = "".join(f"    {line}\n" for line in preset_toml.splitlines())  # a Markdown code block
            self.writer.add_text(PRESET_TAG, text, resume_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def grid(self, step: int, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8, as written
        self.writer.add_image(GRID_TAG, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


# --------------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_mode(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """None where $WANDB_MODE decides (W&B reads it), "online" with an API key ($WANDB_API_KEY or the
    netrc entry `wandb login` writes for $WANDB_BASE_URL's host), else "offline": a run never fails, or
    asks for a key, for want of one."""
    if environ.get("WANDB_MODE"):
        return None
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    file = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(file).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        entry = None
    return "online" if entry is not None and entry[2] else "offline"


_RUN_ID = re.compile(r"[a-z0-9]{1,64}")


def wandb_run_id(run_dir: Path) -> tuple[str, bool]:
    """(the run's W&B id, whether it existed before): RUN/wandb_id, made at the first start (random, from
    `secrets`: no global random number generator is touched)."""
    path = run_dir / WANDB_ID_FILE
    if not path.exists():
        run_id = secrets.token_hex(4)
        write_text_atomic(path, run_id + "\n")
        return run_id, False
    try:
        run_id = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        run_id = ""
    if not _RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"{path}: not a W&B run id (1-64 lowercase letters and digits); delete it to start a new W&B run"
        )
    return run_id, True


class WandbSink:
    """One W&B run per uvit run: its id in RUN/wandb_id, resumed with the uvit run, files in RUN/wandb/.

    W&B takes no step twice and none below its last, so nothing at or below `skip_through` is sent: the
    checkpoint's step and, when the run had already logged to W&B, the steps its killed predecessor logged
    past that checkpoint (`logged_through`, the same records by the exact resume) and, online, every step
    the W&B run already holds."""

    name = "W&B"

    def __init__(self, preset: Preset, run_dir: Path, resume_step: int, logged_through: int) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(NEEDS_WANDB) from None
        self.wandb = wandb
        run_id, existed = wandb_run_id(run_dir)
        log = preset.log
        try:
            self.run = wandb.init(
                project=log.wandb_project,
                entity=log.wandb_entity,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=preset.model_dump(mode="json"),
                mode=wandb_mode(),  # type: ignore[arg-type]
                settings=wandb.Settings(console="off"),  # uvit's own progress bar stays as it is
            )
        except Exception as e:  # W&B raises its own error types (UsageError, CommError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"W&B could not start ({first}); log offline with WANDB_MODE=offline, or turn it off with "
                "--set log.wandb=false"
            ) from None
        self.skip_through = max(
            resume_step, logged_through if existed else resume_step, self.run.starting_step - 1
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step > self.skip_through:
            self.run.log(values, step=step)

    def grid(self, step: int, path: Path) -> None:
        if step > self.skip_through:
            self.run.log({GRID_TAG: self.wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        pass  # each log call is handed to W&B's service process at once

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# --------------------------------------------------------------------------------------------------
# The loop's one handle


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Leave torch's, numpy's and Python's global random states as they were (a library that draws from
    them while starting would change what the run's data loader and checkpoints see)."""
    from uvit_cli.train.resume import rng_state, set_rng_state

    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


class Trackers:
    """The run's trackers: `record` (a metrics.jsonl record, as `MetricsLog.listeners` gets it), `grid`
    (a sample grid written), `after_step` (an observer: flush at each checkpoint, so a kill loses nothing
    that the resume keeps), `close` (on every exit of the loop). A tracker that raises is one warning and
    is dropped; the run goes on."""

    def __init__(self, sinks: list[_Sink], warn: Callable[[str], None]) -> None:
        self.sinks, self.warn = sinks, warn

    def _each(self, when: str, action: Callable[[_Sink], None]) -> None:
        for sink in list(self.sinks):
            try:
                action(sink)
            except Exception as e:  # a third-party library's error of any type must not stop training
                self.sinks.remove(sink)
                with contextlib.suppress(Exception):
                    sink.close(failed=True)
                self.warn(
                    f"{sink.name} logging stopped {when} ({type(e).__name__}: {e}); training goes on, "
                    "and metrics.jsonl and report.html keep every record"
                )

    def record(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        self._each(f"at step {step}", lambda sink: sink.scalars(step, values))

    def grid(self, step: int, path: Path) -> None:
        self._each(f"at step {step}", lambda sink: sink.grid(step, path))

    def after_step(self, step: int, due: Due) -> None:
        if due.save:
            self._each(f"at step {step}", lambda sink: sink.flush())

    def close(self, failed: bool = False) -> None:
        with _global_rng_kept():
            self._each("while closing", lambda sink: sink.close(failed))
        self.sinks = []


def open_trackers(
    preset: Preset, run_dir: Path, resume_step: int, logged_through: int, warn: Callable[[str], None]
) -> Trackers | None:
    """The trackers [log] turns on (None: none), started at `resume_step`; `logged_through` is the last
    step metrics.jsonl held before the resume dropped what lay past the checkpoint. Starting them changes
    no global random state, so a run trains the same numbers with logging on or off."""
    log = preset.log
    if not (log.tensorboard or log.wandb):
        return None
    check_trackers(log)
    sinks: list[_Sink] = []
    try:
        with _global_rng_kept():
            if log.tensorboard:
                sinks.append(TensorBoardSink(run_dir, resume_step, preset.to_toml()))
            if log.wandb:
                sinks.append(WandbSink(preset, run_dir, resume_step, logged_through))
    except BaseException:
        for sink in sinks:
            with contextlib.suppress(Exception):
                sink.close(failed=True)
        raise
    return Trackers(sinks, warn)
