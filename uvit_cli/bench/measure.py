"""Measuring: device facts, a synchronising timer, FLOP counts, and the result record."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from uvit_cli import dist

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets. The first
# substring of the device name that matches wins, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
]


OnRow = Callable[["Measurement"], None]  # called with each row the moment it is measured
Progress = Callable[[str], None]  # called with what is about to be timed
Skip = Callable[[str, str], None]  # (probe, why): a probe that did not run

# Timed calls and warm-up calls per row of each task (`uvit bench --repeats` sets the first): ten of the
# short steps (training, data, the device probes), fewer of the long ones (sampling, the encoders).
REPEATS: dict[str, tuple[int, int]] = {
    "train": (10, 3), "data": (10, 2), "attention": (10, 3), "device": (10, 3),
    "sample": (2, 1), "prepare": (3, 1), "fid": (3, 1),
}  # fmt: skip


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, else None (then no MFU is reported)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call of `fn`, seconds of the `warmup` calls before: compilation, autotuning, allocator
    warm-up, the wait before a run's first step)."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t1) / steps, t1 - t0


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention), as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


@dataclasses.dataclass
class Measurement:
    """One recipe's numbers for one task."""

    task: str
    recipe: str
    batch: int
    images_per_s: float
    ms_per_step: float
    flops_per_step: int | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_gb: float | None = None
    note: str = ""
    warmup_s: float | None = None  # the warm-up calls before timing (compilation, autotuning)
    gb_per_s: float | None = None  # bytes moved per second (`uvit bench device` copies)

    @classmethod
    def from_timing(
        cls,
        task: str,
        recipe: str,
        batch: int,
        seconds_per_step: float,
        flops_per_step: int | None,
        peak: float | None,
        device: torch.device,
        note: str = "",
        warmup_s: float | None = None,
    ) -> Measurement:
        tflops = flops_per_step / seconds_per_step / 1e12 if flops_per_step else None
        return cls(
            task=task,
            recipe=recipe,
            batch=batch,
            images_per_s=batch / seconds_per_step,
            ms_per_step=seconds_per_step * 1e3,
            flops_per_step=flops_per_step,
            tflops=tflops,
            mfu=tflops / peak if tflops is not None and peak else None,
            peak_mem_gb=peak_memory_gb(device),
            note=note,
            warmup_s=warmup_s,
        )


@dataclasses.dataclass(frozen=True)
class Timing:
    """How a bench task times its rows and tells its caller: `steps` timed calls after `warmup` calls per
    row, on `device`; `progress` hears what is about to be timed, `on_row` each row the moment it is
    measured, `skip` each probe that cannot run here and why."""

    steps: int
    warmup: int
    device: torch.device
    progress: Progress | None = None
    on_row: OnRow | None = None
    skip: Skip | None = None

    @classmethod
    def of(
        cls,
        task: str,
        *,
        steps: int | None = None,
        device: torch.device | None = None,
        progress: Progress | None = None,
        on_row: OnRow | None = None,
        skip: Skip | None = None,
    ) -> Timing:
        """The task's own repeats (REPEATS; `steps` overrides the timed ones) on `device` (default: this
        rank's GPU when CUDA is available, else the CPU)."""
        default_steps, warmup = REPEATS[task]
        return cls(
            default_steps if steps is None else steps, warmup, dist.device(device), progress, on_row, skip
        )

    def say(self, what: str) -> None:
        if self.progress:
            self.progress(what)

    def skipped(self, what: str, why: str) -> None:
        if self.skip:
            self.skip(what, why)

    def measure(
        self, task: str, recipe: str, fn: Callable[[], Any], *, batch: int, flops: int | None, note: str = ""
    ) -> Measurement:
        """One row: `fn` timed by `time_steps` from a reset peak-memory counter; MFU against the device's
        dense bf16 peak (known GPUs only). Not yet told: `add` it when its note is final."""
        device = self.device
        reset_peak_memory(device)
        sec, warmup_s = time_steps(fn, self.steps, self.warmup, device)
        peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
        return Measurement.from_timing(task, recipe, batch, sec, flops, peak, device, note, warmup_s)

    def add(self, rows: list[Measurement], row: Measurement) -> None:
        """Append `row` to the task's `rows` and tell `on_row`."""
        rows.append(row)
        if self.on_row:
            self.on_row(row)
