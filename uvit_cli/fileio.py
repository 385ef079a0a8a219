"""File I/O every writer shares: sha256 of a file and atomic writes (temp file beside the target, fsync,
rename). A reader never sees a half-written file under the final name: after Ctrl-C, kill -9 or a full
disk the destination holds either its old contents or nothing, and the temporary is removed (or, after
a hard kill, left under a dot-name that no reader lists). A temporary is created afresh (O_CREAT|O_EXCL)
and opened with O_NOFOLLOW, and the rename replaces a symlink at the destination rather than writing
through it: no write ever lands in a file a link points to. Stdlib and numpy only.
"""

from __future__ import annotations

import contextlib
import errno
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


# 0 where the platform has no such flag (Windows): there symlinks need privileges to create.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """`os.open` that refuses to follow a symlink in the last component (OSError ELOOP)."""
    return os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)


def create_temp(path: Path) -> Path:
    """Create `temp_path(path)` as a new, empty regular file and return its name. A leftover of that name
    (a killed run with the same pid, or a symlink planted there) is unlinked first: unlinking removes a
    link, never its target; O_CREAT|O_EXCL|O_NOFOLLOW then fails rather than open anything that is not new."""
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.close(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    return tmp


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
    tmp = create_temp(path)
    try:
        yield tmp
        fd = open_nofollow(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a symlink at `path` is replaced, its target left as it was
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kw: Any) -> Iterator[IO[Any]]:
    """`open(path, mode)` (a writing mode: "w", "wb") whose contents appear under `path` only if the block
    completes."""
    with atomic_path(path) as tmp:
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, mode, **kw) as f:
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
        write_npy(f, np.asarray(arr))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """The one output-path check: refuse, before anything is written, an output that is one of the inputs
    (or another output), whatever the spelling, a symlink in between or a hard link. Keys are the option names
    the user typed (`--json`, `REF`); None values are skipped. Raises ConfigError."""
    from uvit_cli.errors import ConfigError

    outs = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    ins = [(k, Path(v)) for k, v in inputs.items() if v is not None]
    for i, (name, out) in enumerate(outs):
        for other, src in ins + outs[:i]:
            if _same_file(out, src):
                raise ConfigError(
                    f"{out}: {name} is the same file as {other} ({src}); writing it would overwrite {other}: "
                    f"choose another path for {name}"
                )


def write_npy(f: IO[bytes], arr: Any, chunk_bytes: int = 1 << 24) -> None:
    """The bytes `np.save(f, arr)` writes, through `f.write`, so that a full disk is OSError(ENOSPC).

    numpy's own path (`ndarray.tofile`) reports a short write as "N requested and M written" with no
    errno, which says nothing about the cause; a short write here is the full disk it means.
    """
    import numpy as np

    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("object arrays are not stored in shards")
    header = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header over 64 KiB: np.save's format 2.0
        np.lib.format.write_array_header_2_0(f, header)
    data = arr.reshape(-1).view(np.uint8).data if arr.size else memoryview(b"")
    for lo in range(0, len(data), chunk_bytes):
        part = data[lo : lo + chunk_bytes]
        written = f.write(part)
        if written is not None and written < len(part):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(f, "name", None))
