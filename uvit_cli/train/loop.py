"""`uvit train`: the training loop, one function in comment-headed phases (EDM2 style), resume by default."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uvit_cli import checkpoint as ck
from uvit_cli import dist
from uvit_cli.config import Preset
from uvit_cli.errors import ConfigError, TrainingDiverged
from uvit_cli.train.lock import RunDirLock, RunDirLocked
from uvit_cli.train.objective import step_seed
from uvit_cli.train.report import ReportWriter
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
from uvit_cli.train.stop import StopRequest


@dataclass
class TrainEvent:
    """What the loop reports (rank 0 only): start | log | checkpoint | samples | fid | warning | done.

    A stop request (Ctrl-C, SIGTERM) raises KeyboardInterrupt after the checkpoint event of its save."""

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


def _recipe(
    preset: Preset, device: torch.device, compile: bool | None
) -> tuple[torch.dtype | None, bool, bool]:
    """(autocast dtype, torch.compile, fused AdamW): the preset's fast recipe on CUDA, fp32 eager elsewhere.

    The one place the device decides; tests patch it to run the CUDA recipe on the CPU
    (tests/test_cuda_paths_on_cpu.py), since CPU autocast and compile are not what a CPU run wants.
    """
    if device.type != "cuda":
        return None, False, False
    tc = preset.train
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


def _waiting(share: float, ms: float, steps: int, workers: int) -> str:
    return (
        f"training waited for data {share:.0%} of the time of the last {steps} steps ({ms:.1f} ms per step): "
        f"raise the loader's workers (--set train.num_workers=N, now {workers}) or keep the shards on a local disk"
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


def _observers(
    preset: Preset,
    ds: Any,
    run_dir: Path,
    device: torch.device,
    main: bool,
    fid_features: dict[str, Any] | None,
) -> tuple[Any, Any]:
    """(sample grids on rank 0, FID while training on every rank when [eval] ref is set); None where off."""
    grid = evaluator = None
    if main:
        from uvit_cli.train.grid import GridSampler

        grid = GridSampler(preset, ds, device, seed=preset.train.seed)
    if preset.eval.ref is not None:
        from uvit_cli.train.evaluate import FidEvaluator

        evaluator = FidEvaluator(preset, run_dir, device, **(fid_features or {}))
    return grid, evaluator


def _interval(
    state: Any, batches: Any, steps: int, seconds: float, global_batch: int, at: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """The log record of the last `steps` steps (`at`'s step, epoch and lr, the mean loss over all ranks,
    img/s, data wait in ms per step, wall time) and the share of the time spent waiting for data.
    Reading the loss is the loop's one host sync."""
    if dist.world_size() > 1:
        torch.distributed.all_reduce(state.loss_sum)
    seconds = max(seconds, 1e-9)
    record = {
        "step": at["step"],
        "epoch": at["epoch"],
        "loss": state.loss_sum.item() / (steps * global_batch),
        "lr": at["lr"],
        "img_per_s": steps * global_batch / seconds,
        "data_wait_ms": batches.waited * 1e3 / steps,
        "time": time.time(),
    }
    return record, batches.waited / seconds


def _fid_line(fid: dict[str, Any], preset: Preset, run_dir: Path) -> str:
    line = f"FID {fid['fid']:.4f} of {fid['fid_n']} EMA samples in {fid['fid_seconds']:.0f} s"
    others = [
        f"{k} {fid[k]:.4f}"
        for k in ("sfid", "inception_score", "precision", "recall", "clip_score")
        if k in fid
    ]
    line += f" ({', '.join(others)})" if others else ""
    if not fid["fid_is_best"]:
        return f"{line} (best {fid['fid_best']:.4f})"
    return f"{line}, the best so far" + (f" (kept in {run_dir / 'best'})" if preset.eval.keep_best else "")


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
    stop = StopRequest()
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    device = dist.device()
    cuda = device.type == "cuda"

    def emit(kind: str, at_step: int, message: str = "", **metrics: Any) -> None:
        if main and on_event is not None:
            on_event(TrainEvent(kind, at_step, tc.steps, message, metrics))

    dist.cuda_defaults(device)  # TF32 for any fp32 matmul left outside autocast, cuDNN autotuning
    amp_dtype, use_compile, fused = _recipe(preset, device, compile)
    lock: RunDirLock | None = None

    try:
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
        null_class = ds.null_class if preset.model.conditioning == "class" else None
        empty_context = ds.empty_context.to(device) if preset.model.conditioning == "text" else None

        # ---- Run directory: rank 0 locks it (one process per run dir); every rank checks; written once
        # the start has succeeded (record_run_dir below), so a failed start blocks no rerun ----------------
        lock = _lock(run_dir, main, world, warn=lambda m: emit("warning", 0, m))
        claim = check_run_dir(run_dir, preset, force)
        data = data_identity(ds)
        has_checkpoints = bool(ck.list_checkpoints(run_dir))
        claim.notes += check_data(run_dir, data, resuming=has_checkpoints, data_changed=data_changed)
        dist.barrier()

        # ---- Model, EMA, the step's state (DDP over ranks, then torch.compile), resume ---------------
        from uvit_cli.model import UViT

        torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = UViT(**preset.model).to(device)
        state, ema = setup_step(preset, model, device, amp_dtype=amp_dtype, compile=use_compile, fused=fused,
                                ddp=world > 1, null_class=null_class, empty_context=empty_context)  # fmt: skip
        resuming = init is None or check_init(run_dir, init)
        at = resume(run_dir, preset, model, ema, state, global_batch, warn=lambda m: emit("warning", 0, m))
        origin = ""
        if not resuming:
            start = initialise(run_dir, init, model, ema, write=main)
            origin = f", initialised from {start['path']} (sha256 {start['sha256'][:12]})"
        step, epoch, batch_in_epoch, resumed_from = at.step, at.epoch, at.batch_in_epoch, at.step_dir
        if batch_in_epoch >= sampler.batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        end_step = tc.steps if max_steps is None else min(tc.steps, step + max_steps)
        if main:
            record_run_dir(run_dir, preset, claim, data)
        for note in claim.notes:
            emit("warning", 0, note)
        metrics = MetricsLog(run_dir, step) if main else None
        if metrics is not None and metrics.note:
            emit("warning", step, metrics.note)
        grid, evaluator = _observers(preset, ds, run_dir, device, main, fid_features)
        report = ReportWriter(run_dir) if main else None  # RUN/report.html

        n_params = sum(p.numel() for p in state.params)
        emit(
            "start",
            step,
            f"{n_params / 1e6:.2f}M params on {device} x{world}; global batch {global_batch} = {world} x "
            f"{accum} x {micro}; {tc.mixed_precision if amp_dtype else 'fp32'}"
            f"{', compiled' if use_compile else ''}; "
            + (f"resuming from {resumed_from.name}" if resumed_from else f"new run in {run_dir}{origin}"),
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

        # ---- Training loop --------------------------------------------------------------------------
        model.train()
        batches = TimedBatches(loader, sampler, epoch, batch_in_epoch)
        logs, warned_wait = 0, False
        gen = torch.Generator(device)
        steps_since, t_last, last_loss, last_ckpt = 0, time.perf_counter(), None, resumed_from
        lr_used = state.sched.get_last_lr()[0]
        stop.install()  # restored in `finally`, however the loop ends
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
            steps_since += 1
            batch_in_epoch += 1
            if batch_in_epoch == sampler.batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0

            # ---- Log (the only host sync), checkpoint, samples -----------------------------------
            # A stop request (Ctrl-C, SIGTERM) saves at this step boundary. One process stops at once; ranks
            # agree at the next log step (one all-reduce that is already a sync point), so they save together.
            stopping = stop.agreed(world, check=step % tc.log_interval == 0, device=device)
            saving = step % tc.save_interval == 0 or step == end_step or stopping
            if step % tc.log_interval == 0 or saving:
                now = time.perf_counter()
                at_step = {"step": step, "epoch": epoch, "lr": lr_used}
                record, wait_share = _interval(
                    state, batches, steps_since, now - t_last, global_batch, at_step
                )
                loss = record["loss"]
                if not math.isfinite(loss):
                    raise _diverged(loss, step, last_ckpt, tc.lr)
                if metrics is not None:
                    metrics.write(record)
                emit("log", step, eta_s=(end_step - step) * global_batch / record["img_per_s"], **record)
                wait_ms = record["data_wait_ms"]
                # Judged on full log intervals after the first (the workers' start-up); 2 ms: not noise.
                full = logs > 0 and steps_since >= tc.log_interval
                if wait_share > 0.05 and wait_ms > 2 and full and not warned_wait:
                    warned_wait = True
                    emit("warning", step, _waiting(wait_share, wait_ms, steps_since, tc.num_workers))
                state.loss_sum.zero_()
                steps_since, t_last, last_loss, batches.waited, logs = 0, now, loss, 0.0, logs + 1
            if saving:
                last_ckpt = save() or last_ckpt
            if step % tc.sample_interval == 0 and grid is not None and not grid.disabled:
                path = grid(ema, run_dir / ck.SAMPLES / f"{ck.step_dir_name(step)}.png", amp_dtype)
                if path is not None:
                    emit("samples", step, f"sample grid {path}")
                elif grid.disabled:
                    emit("warning", step, grid.disabled)
            evaluating = evaluator is not None and evaluator.due(step, end_step) and not stopping
            if evaluating:
                assert evaluator is not None
                fid = evaluator(ema, step, write=main)
                if metrics is not None:
                    metrics.write(fid)
                emit("fid", step, _fid_line(fid, preset, run_dir), **fid)
            if report is not None and (step % tc.log_interval == 0 or saving or evaluating):
                forced = evaluating or step % tc.sample_interval == 0 or step == end_step or stopping
                if note := report(force=forced):
                    emit("warning", step, note)
            if stopping:
                stop.restore()
                raise KeyboardInterrupt
            if saving or evaluating or step % tc.sample_interval == 0:
                dist.barrier()
                t_last, batches.waited = time.perf_counter(), 0.0  # checkpoints, grids, FID: not in img/s

        stop.restore()
        emit("done", step, f"finished at step {step}; checkpoint {last_ckpt}", loss=last_loss)
        return TrainResult(run_dir, step, last_ckpt if isinstance(last_ckpt, Path) else None, last_loss)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        if created_group:
            dist.destroy()
