"""`uvit train`: the training loop, one function in comment-headed phases (EDM2 style), resume by default."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uvit_cli import checkpoint as ck
from uvit_cli import dist
from uvit_cli.config import Preset, TrainConfig
from uvit_cli.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from uvit_cli.sample.conditions import data_null_condition
from uvit_cli.train.lock import RunDirLock, RunDirLocked
from uvit_cli.train.meter import Meter
from uvit_cli.train.objective import step_seed
from uvit_cli.train.observers import Intervals, make_observers
from uvit_cli.train.resume import capture, check_init, initialise, resume
from uvit_cli.train.rundir import (
    MetricsLog,
    check_data,
    check_data_fits,
    check_run_dir,
    data_identity,
    record_run_dir,
)
from uvit_cli.train.step import require_training_memory, setup_step, train_step
from uvit_cli.train.stop import stop_requests
from uvit_cli.train.tracking import Trackers, check_trackers, open_trackers


@dataclass
class TrainEvent:
    """What the loop reports (rank 0 only): start | log | checkpoint | samples | fid | warning | done.

    A stop request (Ctrl-C, SIGTERM) ends with the checkpoint event of its save, and no done event."""

    kind: str
    step: int
    total_steps: int
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    loss: float | None
    stopped: str | None = None  # the signal that stopped the run at `step` ("SIGINT", "SIGTERM"), else None


def _recipe(
    tc: TrainConfig, device: torch.device, compile: bool | None
) -> tuple[torch.dtype | None, bool, bool]:
    """(autocast dtype, torch.compile, fused AdamW): the preset's fast recipe on CUDA, fp32 eager elsewhere.

    The one place the device decides; tests patch it to run the CUDA recipe on the CPU
    (tests/test_cuda_paths_on_cpu.py), since CPU autocast and compile are not what a CPU run wants.
    """
    if device.type != "cuda":
        return None, False, False
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
    return amp_dtype, tc.compile if compile is None else compile, True


def _batch_geometry(global_batch: int, world: int, batch_per_gpu: int | None) -> tuple[int, int, int]:
    """(this rank's share, micro-batch, accumulation steps) of a global batch over `world` processes."""
    if global_batch % world:
        raise ConfigError(f"train.batch_size {global_batch} is not divisible by {world} processes")
    per_rank = global_batch // world
    micro = min(batch_per_gpu or per_rank, per_rank)
    if per_rank % micro:
        raise ConfigError(
            f"--batch-per-gpu {micro} does not divide this GPU's share {per_rank} of the global batch "
            f"{global_batch}; pick a divisor of {per_rank}"
        )
    return per_rank, micro, per_rank // micro


def _diverged(loss: float, step: int, last_ckpt: Path | None, lr: float) -> TrainingDiverged:
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
    return TrainingDiverged(
        f"loss became {loss} by step {step}; stopped, {where}. Rerun the same command with a lower "
        f"learning rate (e.g. --set train.lr={lr / 2:g}) or gradient clipping (--set train.grad_clip=1.0) "
        "to resume from that checkpoint"
    )


def _lock(run_dir: Path, main: bool, world: int, warn: Callable[[str], None]) -> RunDirLock | None:
    """Rank 0 creates and locks the run dir (one training process per run dir); every rank learns if it is busy."""
    lock, busy = None, None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(run_dir, warn=warn)
        try:
            lock.acquire()
        except RunDirLocked as e:
            busy = e
    if world > 1:
        busy = next((b for b in dist.all_gather_object(busy) if b is not None), None)
    if busy is not None:
        if lock is not None:
            lock.release()
        raise RunDirLocked(str(busy))
    return lock


def _levers_on(tc: TrainConfig) -> str:
    """The speed levers switched on, as the start line names them: ", stream_dtype=autocast, fp8"."""
    on = [f"stream_dtype={tc.stream_dtype}" if tc.stream_dtype != "fp32" else "",
          f"attention={tc.attention}" if tc.attention != "auto" else "",
          f"compile_mode={tc.compile_mode}" if tc.compile_mode != "default" else "", "fp8" if tc.fp8 else ""]  # fmt: skip
    return "".join(f", {x}" for x in on if x)


def _check_ranks_agree(data_id: str, newest_step: int | None, run_dir: Path) -> None:
    """Every rank must see the same prepared set and the same newest checkpoint (on several nodes: one shared
    run dir, the same data on each node, docs/multinode.md); otherwise ranks would train different data or
    resume from different steps, and hang or diverge. One DataError naming the first rank that differs."""
    seen = dist.all_gather_object((data_id, newest_step))
    for r, (ident, newest) in enumerate(seen):
        if ident != seen[0][0]:
            raise DataError(
                f"rank {r} reads another prepared set than rank 0 (data {str(ident)[:12]} vs {seen[0][0][:12]}): "
                "every node needs the same set at data.path (docs/multinode.md)"
            )
        if newest != seen[0][1]:
            raise CheckpointError(
                f"{run_dir}: rank {r} sees newest checkpoint {newest}, rank 0 sees {seen[0][1]}: the run dir must be "
                "one directory shared by every node (docs/multinode.md)"
            )


def train(
    preset: Preset,
    run_dir: str | Path | None = None,
    *,
    batch_per_gpu: int | None = None,
    compile: bool | None = None,
    force: bool = False,
    max_steps: int | None = None,
    init: str | Path | None = None,
    data_changed: bool = False,
    on_event: Callable[[TrainEvent], None] | None = None,
    fid_features: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `preset` in `run_dir` (default runs/<name>), continuing from its latest checkpoint if any.

    `batch_per_gpu` splits each rank's share of the global batch into micro-batches (gradient accumulation);
    `compile` overrides `train.compile` (CUDA only); `max_steps` stops after that many steps of this call;
    `init` starts a new run from those weights (fine-tuning; see `train.resume.initialise`);
    `data_changed` lets a run resume on another prepared set than the one it trained on (`rundir.check_data`).
    Nothing in `run_dir` is written before the start has succeeded (model built, checkpoint loaded).
    `fid_features` ({"features": fn, "feature_dim": d}) replaces the Inception of [eval] (tests).
    """
    tc = preset.train
    run_dir = Path(run_dir) if run_dir is not None else ck.default_run_dir(preset)

    # ---- Processes, device, precision ------------------------------------------------------------
    created_group = not dist.is_initialized() and dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    device = dist.device()
    cuda = device.type == "cuda"

    def emit(kind: str, at_step: int, message: str = "", **metrics: Any) -> None:
        if main and on_event is not None:
            on_event(TrainEvent(kind, at_step, tc.steps, message, metrics))

    def warn(message: str) -> None:
        emit("warning", 0, message)

    dist.cuda_defaults(device)  # TF32 for any fp32 matmul left outside autocast, cuDNN autotuning
    amp_dtype, use_compile, fused = _recipe(tc, device, compile)
    lock: RunDirLock | None = None
    trackers: Trackers | None = None

    try:
        if main:
            check_trackers(preset.log)  # a [log] tracker whose package is missing: one line, before any work
        # ---- Batch geometry ----------------------------------------------------------------------
        global_batch = tc.batch_size
        per_rank, micro, accum = _batch_geometry(global_batch, world, batch_per_gpu)
        require_training_memory(preset, device)  # a model that cannot fit is refused before it is built

        # ---- Data -----------------------------------------------------------------------------------
        from uvit_cli.data import FeatureDataset, ResumableSampler, TimedBatches, make_loader, to_model

        ds = FeatureDataset(preset.data.set_path(), "train", seed=tc.seed)
        check_data_fits(preset, ds)
        sampler = ResumableSampler(
            len(ds), global_batch, seed=tc.seed, rank=rank, world_size=world, with_epoch=True
        )
        loader = make_loader(ds, sampler, micro, tc.num_workers, pin_memory=cuda)
        uncond = data_null_condition(preset.model, ds)  # CFG's null condition: dropped conditions become it

        # ---- Run directory: rank 0 locks it (one process per run dir); every rank checks; written once
        # the start has succeeded (record_run_dir below), so a failed start blocks no rerun ----------------
        lock = _lock(run_dir, main, world, warn=warn)
        claim = check_run_dir(run_dir, preset, force)
        data = data_identity(ds)
        checkpoints = ck.list_checkpoints(run_dir)
        has_checkpoints = bool(checkpoints)
        _check_ranks_agree(data["identity"], checkpoints[-1][0] if checkpoints else None, run_dir)
        claim.notes += check_data(run_dir, data, resuming=has_checkpoints, data_changed=data_changed)
        dist.barrier()

        # ---- Model, EMA, the step's state (DDP over ranks, then torch.compile), resume ---------------
        from uvit_cli.model import UViT

        torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = UViT(**preset.model).to(device)
        state, ema = setup_step(preset, model, device, amp_dtype=amp_dtype, compile=use_compile, fused=fused,
                                ddp=world > 1, uncond=uncond)  # fmt: skip
        # --init starts the run from its weights, unless the run dir holds checkpoints of that start (resumed)
        init_from = init if init is not None and not check_init(run_dir, init) else None
        at = resume(run_dir, tc, model, ema, state, global_batch, warn=warn)
        origin = ""
        if init_from is not None:
            start = initialise(run_dir, init_from, model, ema, write=main)
            origin = f", initialised from {start['path']} (sha256 {start['sha256'][:12]})"
        step, epoch, batch_in_epoch, last_ckpt = at.step, at.epoch, at.batch_in_epoch, at.step_dir
        if batch_in_epoch >= sampler.batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        end_step = tc.steps if max_steps is None else min(tc.steps, step + max_steps)
        if main:
            record_run_dir(run_dir, preset, claim, data)
        for note in claim.notes:
            warn(note)
        metrics = MetricsLog(run_dir, step) if main else None
        if metrics is not None and metrics.note:
            emit("warning", step, metrics.note)
        # ---- Trackers ([log]: TensorBoard, W&B; rank 0): fed every metrics record, the grids, flushed at
        # checkpoints, closed on every way out ------------------------------------------------------------
        if metrics is not None and step < end_step:
            trackers = open_trackers(preset, run_dir, step, metrics.logged_through, warn)
            if trackers is not None:
                metrics.listeners.append(trackers.record)
        watchers = make_observers(
            preset, ds, run_dir, device, main, ema, amp_dtype, metrics, emit, fid_features, trackers
        )
        every = Intervals.of(tc, preset.eval.interval if preset.eval.ref is not None else None, end_step)

        n_params = sum(p.numel() for p in state.params)
        emit(
            "start",
            step,
            f"{n_params / 1e6:.2f}M params on {device} x{world}; global batch {global_batch} = {world} x "
            f"{accum} x {micro}; {tc.mixed_precision if amp_dtype else 'fp32'}"
            f"{', compiled' if use_compile else ''}{_levers_on(tc)}; "
            + (f"resuming from {last_ckpt.name}" if last_ckpt else f"new run in {run_dir}{origin}"),
            start_step=step,
            end_step=end_step,
        )
        if step >= end_step:
            emit("done", step, f"already at step {step} of {tc.steps}; nothing to do")
            return TrainResult(run_dir, step, ck.latest_checkpoint(run_dir), None)

        # ---- State saving ---------------------------------------------------------------------------
        def save() -> Path | None:
            saved = capture(state, step, epoch, batch_in_epoch, global_batch)
            path = None
            if main:
                path = ck.save_checkpoint(
                    run_dir,
                    step,
                    model=model.state_dict(),
                    ema=ema.state_dict(),
                    state=saved,
                    preset=preset,
                    keep_last=tc.keep_last,
                )
                emit("checkpoint", step, f"saved {path}")
            dist.barrier()
            return path

        # ---- Training loop: Ctrl-C / SIGTERM finish the step in flight, which then saves and returns ----
        model.train()
        batches = TimedBatches(loader, sampler, epoch, batch_in_epoch)
        meter = Meter(state, batches, global_batch, tc)
        gen = torch.Generator(device)
        last_loss: float | None = None
        lr_used = state.sched.get_last_lr()[0]
        with stop_requests(world, device) as stop:
            while step < end_step:
                # One global batch: the step's random numbers for all of it; each micro-batch of this rank
                # takes the rows of its samples (lo = rank * per_rank + m * micro), loaded only when it runs.
                gen.manual_seed(step_seed(tc.seed, step))
                draws = state.objective.draw(gen, global_batch)
                micro_batches = (
                    (to_model(next(batches), device), draws.rows(lo, lo + micro))
                    for lo in range(rank * per_rank, (rank + 1) * per_rank, micro)
                )
                lr_used = train_step(state, micro_batches, n_micro=accum, share=per_rank)
                step += 1
                meter.steps += 1
                batch_in_epoch += 1
                if batch_in_epoch == sampler.batches_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0

                # ---- What is due now; the log record (the one host sync), checkpoint, observers ----
                # One process stops at once; ranks agree at the next log step, so they save together.
                due = every.due(step, stop)
                if due.log:
                    record, waiting = meter.record(step, epoch, lr_used)
                    if not math.isfinite(record["loss"]):
                        raise _diverged(record["loss"], step, last_ckpt, tc.lr)
                    if metrics is not None:
                        metrics.write(record)
                    emit("log", step, eta_s=(end_step - step) * global_batch / record["img_per_s"], **record)
                    if waiting is not None:
                        emit("warning", step, waiting)
                    last_loss = record["loss"]
                if due.save:
                    last_ckpt = save() or last_ckpt
                for watcher in watchers:
                    watcher.after_step(step, due)
                if due.stop:
                    break
                if due.pause:
                    dist.barrier()
                    meter.restart()

        if stop.reason is None:
            emit("done", step, f"finished at step {step}; checkpoint {last_ckpt}", loss=last_loss)
        return TrainResult(run_dir, step, last_ckpt, last_loss, stopped=stop.reason)
    finally:
        if trackers is not None:
            trackers.close(failed=sys.exc_info()[0] is not None)
        if lock is not None:
            lock.release()
        if created_group:
            dist.destroy()
