"""Ctrl-C and SIGTERM during training: finish the step in flight, save there, then stop."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """SIGINT / SIGTERM during training: finish the step, save a checkpoint, then stop (a second one stops now,
    as KeyboardInterrupt). Made by `stop_requests`, which installs and restores the handlers."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device
        self.signal: int | None = None  # the signal this process received
        self.agreed_signal: int | None = None  # the one all ranks stop for, once they agreed

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # asked twice: give up on the clean stop
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, at_log_step: bool) -> bool:
        """Whether to stop at this step: at once in one process; over several ranks, when any was asked,
        decided at log steps only (one all-reduce, at a step that already syncs), so all save together."""
        if self.world == 1:
            self.agreed_signal = self.signal
        elif at_log_step:
            import torch

            # The largest signal number asked of any rank: every rank learns that one was, and which.
            flag = torch.tensor(float(self.signal or 0), device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.agreed_signal = int(flag.item()) or None
        return self.agreed_signal is not None

    @property
    def reason(self) -> str | None:
        """The name of the signal the run stopped for ("SIGINT", "SIGTERM"), None if it did not."""
        return None if self.agreed_signal is None else signal.Signals(self.agreed_signal).name


@contextmanager
def stop_requests(world: int, device: torch.device) -> Iterator[StopRequest]:
    """A StopRequest whose handlers of SIGINT and SIGTERM are installed for the block and restored after it,
    however it ends. Only the main thread can install signal handlers; elsewhere (a library call from a
    worker thread) the signals keep their usual behaviour."""
    stop = StopRequest(world, device)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop._handle) for sig in _SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
