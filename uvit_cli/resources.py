"""The one resource estimate: refuse, before allocating, a request that cannot fit in memory or on disk.

A workflow states what it is about to hold (bytes of memory at its peak, bytes it will write) and calls
`require_memory` / `require_disk` first; the refusal is one line with the numbers and the fix. Plans are
made in bounded chunks so that `need` is the peak, not the total. Stdlib only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from uvit_cli.errors import ResourceError

# Never plan to use more than this share of what is available: the OS, the page cache and the caller's
# own working set need the rest.
MEMORY_SHARE = 0.8
DISK_SHARE = 0.95


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; one decimal, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get without swapping: MemAvailable (Linux), else total RAM; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - platforms without sysconf
        return None


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that `path` (or its nearest existing parent) lives on."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def require_memory(what: str, need_bytes: int, *, fix: str) -> None:
    """Raise ResourceError if `need_bytes` of memory (the peak of `what`) cannot be had on this machine."""
    have = available_memory_bytes()
    if have is not None and need_bytes > MEMORY_SHARE * have:
        raise ResourceError(
            f"{what} needs about {fmt_bytes(need_bytes)} of memory, and {fmt_bytes(have)} is available: {fix}"
        )


def require_disk(path: str | os.PathLike[str], what: str, need_bytes: int, *, fix: str) -> None:
    """Raise ResourceError if writing `need_bytes` under `path` would fill its file system."""
    free = free_disk_bytes(path)
    if need_bytes > DISK_SHARE * free:
        raise ResourceError(
            f"{path}: {what} needs about {fmt_bytes(need_bytes)} on disk and {fmt_bytes(free)} is free: {fix}"
        )
