"""The one way uvit starts worker processes: a DataLoader whose workers die with their parent.

A DataLoader worker blocked in a read (a slow disk, a named pipe) never reaches the check by which torch
notices that its parent is gone, so after `kill -9` or SIGTERM of the command it lives on, orphaned,
holding its memory. On Linux each worker asks the kernel to kill it when its parent dies
(prctl PR_SET_PDEATHSIG); elsewhere it relies on torch's own check. The kernel sends that signal when the
thread that started the worker ends, so a loader is iterated by a thread that outlives its use
(tests/test_reliability_prepare.py kills the parent of blocked workers and waits for them to go).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed when the process `parent_pid` exits (Linux), and exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass
    if os.getppid() != parent_pid:  # the parent died between fork and prctl
        os._exit(1)


def _init_worker(parent_pid: int, then: Callable[[int], None] | None, worker_id: int) -> None:
    die_with_parent(parent_pid)
    if then is not None:
        then(worker_id)


def worker_loader(
    dataset: Dataset, *, num_workers: int, worker_init_fn: Callable[[int], None] | None = None, **kwargs: Any
) -> DataLoader:
    """`DataLoader(dataset, num_workers=..., **kwargs)` whose worker processes die with this process."""
    init = functools.partial(_init_worker, os.getpid(), worker_init_fn) if num_workers > 0 else worker_init_fn
    return DataLoader(dataset, num_workers=num_workers, worker_init_fn=init, **kwargs)
