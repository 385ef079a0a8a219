"""What is due after a training step (`Due`, computed once per step by `Intervals.due`) and the work that
watches the run without changing it: sample grids, FID while training, the run report. Each is an
`Observer`, called with one shape, `after_step(step, due)`, in that order, after the step's log record and
checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from uvit_cli import checkpoint as ck
from uvit_cli.config import Preset, TrainConfig
from uvit_cli.train.report import ReportWriter

if TYPE_CHECKING:
    from uvit_cli.data import FeatureDataset
    from uvit_cli.train.evaluate import FidEvaluator
    from uvit_cli.train.grid import GridSampler
    from uvit_cli.train.rundir import MetricsLog
    from uvit_cli.train.stop import StopRequest
    from uvit_cli.train.tracking import Trackers


@dataclass(frozen=True)
class Due:
    """What the loop does after one step."""

    log: bool  # the log record (the loop's one host sync): every train.log_interval steps and at each save
    save: bool  # a checkpoint: every train.save_interval steps, at the call's last step and at a stop
    grid: bool  # a sample grid: every train.sample_interval steps
    eval: bool  # FID ([eval]): every eval.interval steps and at the last; not at a stop, which saves and ends
    report: bool  # RUN/report.html, at most every 30 s: at log and FID steps
    report_now: bool  # ... now, however recent the last: after a grid or FID, at the last step, at a stop
    stop: bool  # Ctrl-C / SIGTERM, agreed by every rank: save at this step and return

    @property
    def pause(self) -> bool:
        """Work besides training (checkpoint, grid, FID): the ranks meet after it, and its time is not in img/s."""
        return self.save or self.grid or self.eval


@dataclass(frozen=True)
class Intervals:
    """Every how many steps each piece of work comes, and the last step of this call."""

    log: int
    save: int
    grid: int
    eval: int | None  # None: no FID while training ([eval] ref unset)
    end_step: int

    @classmethod
    def of(cls, tc: TrainConfig, eval_interval: int | None, end_step: int) -> Intervals:
        return cls(tc.log_interval, tc.save_interval, tc.sample_interval, eval_interval, end_step)

    def due(self, step: int, stop: StopRequest) -> Due:
        """What is due after `step`. A stop request is agreed here (at log steps only over several ranks)."""
        log = step % self.log == 0
        stopping = stop.agreed(at_log_step=log)
        last = step == self.end_step
        save = step % self.save == 0 or last or stopping
        grid = step % self.grid == 0
        fid = self.eval is not None and (step % self.eval == 0 or last) and not stopping
        return Due(
            log=log or save,
            save=save,
            grid=grid,
            eval=fid,
            report=log or save or fid,
            report_now=fid or grid or last or stopping,
            stop=stopping,
        )


class Emit(Protocol):
    """The loop's event callback: `emit(kind, step, message, **metrics)` (a TrainEvent on rank 0)."""

    def __call__(self, kind: str, at_step: int, message: str = "", **metrics: Any) -> None: ...


class Observer(Protocol):
    def after_step(self, step: int, due: Due) -> None: ...


class GridObserver:
    """The sample grid of the EMA weights (rank 0): RUN/samples/<step>.png, then handed to `on_grid` (the
    trackers); the grid sampler's note, and why grids stopped if they cannot be drawn, each one warning."""

    def __init__(
        self,
        grid: GridSampler,
        ema: torch.nn.Module,
        run_dir: Path,
        amp_dtype: torch.dtype | None,
        emit: Emit,
        on_grid: Callable[[int, Path], None] | None = None,
    ) -> None:
        self.grid, self.ema, self.run_dir, self.amp_dtype, self.emit = grid, ema, run_dir, amp_dtype, emit
        self.on_grid = on_grid

    def after_step(self, step: int, due: Due) -> None:
        if not due.grid or self.grid.disabled:
            return
        if (note := self.grid.pop_note()) is not None:  # e.g. a preset whose guidance the grids cannot use
            self.emit("warning", step, note)
        path = self.grid(
            self.ema, self.run_dir / ck.SAMPLES / f"{ck.step_dir_name(step)}.png", self.amp_dtype
        )
        if path is not None:
            self.emit("samples", step, f"sample grid {path}")
            if self.on_grid is not None:
                self.on_grid(step, path)
        elif self.grid.disabled:
            self.emit("warning", step, self.grid.disabled)


class EvalObserver:
    """FID of the EMA weights (every rank; rank 0 writes metrics.jsonl and RUN/best)."""

    def __init__(
        self,
        evaluator: FidEvaluator,
        ema: torch.nn.Module,
        main: bool,
        metrics: MetricsLog | None,
        kept_in: Path | None,
        emit: Emit,
    ) -> None:
        self.evaluator, self.ema, self.main, self.metrics = evaluator, ema, main, metrics
        self.kept_in, self.emit = kept_in, emit

    def after_step(self, step: int, due: Due) -> None:
        if not due.eval:
            return
        fid = self.evaluator(self.ema, step, write=self.main)
        if self.metrics is not None:
            self.metrics.write(fid)
        self.emit("fid", step, fid_line(fid, self.kept_in), **fid)


class ReportObserver:
    """RUN/report.html (rank 0); a page that cannot be written is one warning."""

    def __init__(self, writer: ReportWriter, emit: Emit) -> None:
        self.writer, self.emit = writer, emit

    def after_step(self, step: int, due: Due) -> None:
        if due.report and (note := self.writer(force=due.report_now)):
            self.emit("warning", step, note)


def make_observers(
    preset: Preset,
    ds: FeatureDataset,
    run_dir: Path,
    device: torch.device,
    main: bool,
    ema: torch.nn.Module,
    amp_dtype: torch.dtype | None,
    metrics: MetricsLog | None,
    emit: Emit,
    fid_features: dict[str, Any] | None,
    trackers: Trackers | None = None,
) -> list[Observer]:
    """The run's observers in the order they act: sample grids and the report on rank 0, FID on every rank
    when [eval] ref is set, then the trackers ([log]; rank 0), which flush at checkpoints. The trackers get
    the metrics records through `metrics.listeners` and the grids from the grid observer."""
    found: list[Observer] = []
    if main:
        from uvit_cli.train.grid import GridSampler

        grid = GridSampler(preset, ds, device, seed=preset.train.seed)
        on_grid = trackers.grid if trackers is not None else None
        found.append(GridObserver(grid, ema, run_dir, amp_dtype, emit, on_grid))
    if preset.eval.ref is not None:
        from uvit_cli.train.evaluate import BEST_DIR, FidEvaluator

        evaluator = FidEvaluator(preset, run_dir, device, **(fid_features or {}))
        kept_in = run_dir / BEST_DIR if preset.eval.keep_best else None
        found.append(EvalObserver(evaluator, ema, main, metrics, kept_in, emit))
    if main:
        found.append(ReportObserver(ReportWriter(run_dir), emit))  # RUN/report.html
    if trackers is not None:
        found.append(trackers)
    return found


def fid_line(fid: dict[str, Any], kept_in: Path | None) -> str:
    """The line of one evaluation: FID, the other metrics measured, and whether it is the best so far
    (`kept_in`: where the best EMA weights are kept, None when they are not)."""
    line = f"FID {fid['fid']:.4f} of {fid['fid_n']} EMA samples in {fid['fid_seconds']:.0f} s"
    others = [
        f"{k} {fid[k]:.4f}"
        for k in ("sfid", "inception_score", "precision", "recall", "clip_score")
        if k in fid
    ]
    line += f" ({', '.join(others)})" if others else ""
    if not fid["fid_is_best"]:
        return f"{line} (best {fid['fid_best']:.4f})"
    return f"{line}, the best so far" + (f" (kept in {kept_in})" if kept_in is not None else "")
