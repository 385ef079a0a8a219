"""One training process per run dir: `RUN/lock`, held with an OS lock while the run is alive.

The lock file names its holder (host, pid, start time) and is emptied on a clean exit. The OS releases an
`flock` when its process dies (kill -9 included), so a non-empty lock file that can be locked was left by
a dead process: it is stale and is taken over with a warning; a
live holder makes a second `uvit train` on the same run dir refuse with one line. Where `flock` is not
available the holder's pid is checked instead (same host only).

The lock is opened with O_NOFOLLOW: a `lock` that is a symlink (or anything but a regular file) is refused
in one line, so writing the holder's name never truncates a file elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from uvit_cli.errors import UvitError
from uvit_cli.fileio import open_nofollow

LOCK_FILE = "lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunDirLocked(UvitError):
    """Another live process trains in this run dir."""

    exit_code = 2


class LockNotAFile(UvitError):
    """`RUN/lock` is a symlink, a directory or another non-regular file: never written through."""

    exit_code = 2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _holder_text(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, int | float)
        else "?"
    )
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {when}"


class RunDirLock:
    """`with RunDirLock(run_dir, warn):` holds the run dir for this process; released on exit."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.warn = warn or (lambda _msg: None)
        self._f: IO[str] | None = None

    @staticmethod
    def _read(f: IO[str]) -> dict[str, Any]:
        try:
            f.seek(0)
            info = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _not_a_file(self, what: str) -> LockNotAFile:
        return LockNotAFile(
            f"{self.path} is {what}, not a lock file; uvit does not write through it: delete it "
            f"(`rm {self.path}`) and rerun"
        )

    def _open(self) -> IO[str]:
        """The lock file, created if missing, opened read-write without following a symlink."""
        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP or self.path.is_symlink():
                raise self._not_a_file(f"a symbolic link (to {os.readlink(self.path)})") from None
            if e.errno == errno.EISDIR:
                raise self._not_a_file("a directory") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device, a socket
            os.close(fd)
            raise self._not_a_file("not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "r+", encoding="utf-8")

    def acquire(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        f = self._open()  # held open for the lock's lifetime
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise RunDirLocked(self._busy(self._read(f))) from None
            old = self._read(f)
            if old and fcntl is None:
                if old.get("host") != info["host"] or _pid_alive(int(old.get("pid", -1))):
                    raise RunDirLocked(self._busy(old))
            if old and (old.get("host"), old.get("pid")) != (info["host"], info["pid"]):
                self.warn(
                    f"{self.path}: took over a stale lock of {_holder_text(old)} (that process is gone)"
                )
            f.seek(0)
            f.truncate()
            f.write(json.dumps(info) + "\n")
            f.flush()
        except BaseException:
            f.close()
            raise
        self._f = f

    def _busy(self, holder: dict[str, Any]) -> str:
        who = _holder_text(holder) if holder else "another process"
        return (
            f"{self.path.parent} is in use by {who}; wait for it to finish, stop it, or use another --run-dir "
            f"(if that process is gone and this is a shared file system, delete {self.path})"
        )

    def release(self) -> None:
        if self._f is None:
            return
        with contextlib.suppress(OSError):
            # Emptied, not deleted: deleting would let a process that opened the old file lock an
            # orphan inode while a third one locks a new file. An empty lock file means "free".
            self._f.seek(0)
            self._f.truncate()
            self._f.flush()
        with contextlib.suppress(OSError):
            self._f.close()  # closing drops the flock
        self._f = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
