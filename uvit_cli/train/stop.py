"""Ctrl-C and SIGTERM during training: finish the step in flight, save there, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """SIGINT / SIGTERM during training: finish the step, save a checkpoint, then stop (a second one stops now).

    Only the main thread can install signal handlers; elsewhere (a library call from a worker thread) the
    signals keep their usual behaviour.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # asked twice: give up on the clean stop
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def agreed(self, world: int, check: bool, device: Any) -> bool:
        """Whether to stop at this step: at once in one process; over `world` > 1 ranks, when any was asked,
        decided at `check` steps only (one all-reduce, at a step that already syncs), so all save together."""
        if world == 1:
            return self.signal is not None
        if not check:
            return False
        import torch

        flag = torch.tensor(0.0 if self.signal is None else 1.0, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
