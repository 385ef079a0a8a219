"""File I/O every writer shares: sha256 of a file and atomic writes (temp file beside the target, fsync,
rename). A reader never sees a half-written file under the final name: after Ctrl-C, kill -9 or a full
disk the destination holds either its old contents or nothing, and the temporary is removed (or, after
a hard kill, left under a dot-name that no reader lists). Stdlib and numpy only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over `path`.

    On any exception (OSError for a full disk, KeyboardInterrupt) the temporary is deleted and `path`
    keeps what it held before.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kw: Any) -> Iterator[IO[Any]]:
    """`open(path, mode)` whose contents appear under `path` only if the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def save_npy_atomic(path: str | os.PathLike[str], arr: Any) -> None:
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, arr)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """The one output-path check: refuse, before anything is written, an output that is one of the inputs
    (or another output), whatever the spelling or a symlink in between. Keys are the option names the user typed
    (`--json`, `REF`); None values are skipped. Raises ConfigError."""
    from uvit_cli.errors import ConfigError

    outs = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    ins = [(k, Path(v)) for k, v in inputs.items() if v is not None]
    for i, (name, out) in enumerate(outs):
        for other, src in ins + outs[:i]:
            if _same_file(out, src):
                raise ConfigError(f"{out}: {name} is the same path as {other}; writing it would overwrite it")
