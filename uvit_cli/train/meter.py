"""What the training loop logs between two records: steps, wall time and data wait since the last record,
the mean loss over all ranks, and the one warning that training waits for its data."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from uvit_cli import dist
from uvit_cli.config import TrainConfig
from uvit_cli.train.step import StepState

if TYPE_CHECKING:
    from uvit_cli.data import TimedBatches


JUDGE_STEPS = 10  # the fewest steps the data-wait warning is judged on


class Meter:
    """Steps, seconds and data wait since the last log record: the record, and one warning if training waits
    for data. Reading the loss is the loop's one host sync."""

    def __init__(self, state: StepState, batches: TimedBatches, global_batch: int, tc: TrainConfig) -> None:
        self.state, self.batches, self.global_batch = state, batches, global_batch
        self.log_interval, self.num_workers = tc.log_interval, tc.num_workers
        self.steps, self.t_last, self.logs, self.warned = 0, time.perf_counter(), 0, False
        # Steps, seconds and data wait of the full log intervals not yet judged.
        self.pooled: tuple[int, float, float] = (0, 0.0, 0.0)

    def restart(self) -> None:
        """Leave the time since the last step out of img/s and the data wait (checkpoints, grids, FID)."""
        self.t_last, self.batches.waited = time.perf_counter(), 0.0

    def record(self, step: int, epoch: int, lr: float) -> tuple[dict[str, Any], str | None]:
        """The log record of the steps since the last one (the mean loss over all ranks, img/s, data wait in
        ms per step, wall time) and the warning that training waits for data (once per run), then restart."""
        now = time.perf_counter()
        if dist.world_size() > 1:
            torch.distributed.all_reduce(self.state.loss_sum)
        steps, seconds, waited = self.steps, max(now - self.t_last, 1e-9), self.batches.waited
        record = {
            "step": step,
            "epoch": epoch,
            "loss": self.state.loss_sum.item() / (steps * self.global_batch),
            "lr": lr,
            "img_per_s": steps * self.global_batch / seconds,
            "data_wait_ms": waited * 1e3 / steps,
            "time": time.time(),
        }
        note = None if self.warned else self._judge(steps, seconds, waited)
        self.state.loss_sum.zero_()
        self.steps, self.logs = 0, self.logs + 1
        self.t_last, self.batches.waited = now, 0.0
        return record, note

    def _judge(self, steps: int, seconds: float, waited: float) -> str | None:
        """The warning that training waits for data, judged on full log intervals after the first (the
        workers' start-up), pooled until they hold JUDGE_STEPS steps: one slow step is noise, not a loader
        that cannot keep up. Warns above 5% of the time and 2 ms per step."""
        if self.logs == 0 or steps < self.log_interval:
            return None
        pooled_steps, pooled_s, pooled_wait = self.pooled
        steps, seconds, waited = pooled_steps + steps, pooled_s + seconds, pooled_wait + waited
        self.pooled = (steps, seconds, waited) if steps < JUDGE_STEPS else (0, 0.0, 0.0)
        if steps < JUDGE_STEPS:
            return None
        share, wait_ms = waited / seconds, waited * 1e3 / steps
        if share <= 0.05 or wait_ms <= 2:
            return None
        self.warned = True
        return (
            f"training waited for data {share:.0%} of the time of the last {steps} steps ({wait_ms:.1f} ms "
            f"per step): raise the loader's workers (--set train.num_workers=N, now {self.num_workers}) "
            "or keep the shards on a local disk"
        )
