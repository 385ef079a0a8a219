"""`uvit bench`: time the real code paths against the official recipe, side by side in one process.

Every task builds the preset's real network (random weights of the real size), feeds it data of the
real shapes, and times whole steps after warm-up (and compilation). FLOPs are counted once with
`torch.utils.flop_counter` on the meta device (training = 3x the forward: the backward is twice the
forward; recomputation by gradient checkpointing is not counted, as MFU conventionally does not).

    report = run_bench("train", load_preset("coco_uvit_s2_deep"), batch=256, steps=20)

A report streams: `on_row(report, row)` is called the moment each row is measured, with the report so far,
so a run cut short (a time limit, Ctrl-C) keeps every row it measured (`uvit bench --json` rewrites its file
each time). Each row carries `warmup_s`, the seconds of its warm-up calls (compilation, autotuning): the wait
before a run's first step.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uvit_cli import dist
from uvit_cli.bench.measure import Measurement, Progress, Timing, device_name, peak_tflops
from uvit_cli.bench.recipes import (
    OFFICIAL,
    OURS,
    SAMPLE_LADDER,
    SAMPLE_LEVERS,
    TRAIN_LADDER,
    TRAIN_LEVERS,
    Recipe,
    lever_refusal,
)
from uvit_cli.bench.tasks import bench_sample, bench_train
from uvit_cli.config import Preset
from uvit_cli.errors import ConfigError, ResourceError
from uvit_cli.fileio import write_text_atomic
from uvit_cli.resources import require_disk, require_memory

TASKS = ("train", "sample", "prepare", "fid", "data", "attention", "device")


@dataclasses.dataclass
class BenchReport:
    task: str
    preset: str
    device: str
    torch_version: str
    peak_bf16_tflops: float | None
    date: str
    measurements: list[Measurement]
    settings: dict[str, Any]  # how it ran; "skipped": {probe: why} for probes that could not run here

    @property
    def speedup(self) -> float | None:
        """Images/s of our recipe over the official one, when both were measured (data: the first row pair,
        workers 0 with a warm cache)."""
        ms = self.measurements
        if self.task == "data" and ms:
            ms = [m for m in ms if m.note.split(", items")[0] == ms[0].note.split(", items")[0]]
        by = {m.recipe: m for m in ms}
        ours = by.get(OURS.name) or by.get("+compile (uvit)")
        if ours and OFFICIAL.name in by:
            return ours.images_per_s / by[OFFICIAL.name].images_per_s
        return None

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        return json.dumps(d, indent=1)


# --------------------------------------------------------------------------------------------------
# Entry point


def run_bench(
    task: str,
    preset: Preset,
    *,
    batch: int | None = None,
    steps: int | None = None,
    compare: bool = False,
    levers: bool = False,
    official: bool = True,
    decode: bool = True,
    data_dir: str | Path | None = None,
    workers: list[int] | None = None,
    device: torch.device | None = None,
    progress: Progress | None = None,
    on_row: Callable[[BenchReport, Measurement], None] | None = None,
) -> BenchReport:
    """Run one benchmark task and return its report (our recipe and, by default, the official one);
    `on_row(report, row)` the moment each row is measured. `compare` adds the ladder from the official
    recipe to ours and then the lever rungs; `levers` the lever rungs alone after ours (train, sample)."""
    if task not in TASKS:
        raise ConfigError(f"unknown bench task '{task}' (choose from {', '.join(TASKS)})")
    for flag, value in (("--batch", batch), ("--repeats", steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be 1 or more")
    if workers is not None and any(w < 0 for w in workers):
        raise ConfigError(f"--workers {','.join(map(str, workers))}: worker counts are 0 or more")
    device = dist.device(device)  # a device this machine lacks: one line, before anything is built
    batch = (
        batch
        or DEFAULT_BATCH.get(task)
        or (preset.sample.batch_size if task == "sample" else preset.train.batch_size)
    )
    _check_resources(task, preset, batch, steps, decode=decode, device=device)
    name = device_name(device)
    report = BenchReport(
        task=task,
        preset=preset.name,
        device=name,
        torch_version=torch.__version__,
        peak_bf16_tflops=peak_tflops(name) if device.type == "cuda" else None,
        date=datetime.date.today().isoformat(),
        measurements=[],
        settings={
            "batch": None if task == "device" else batch,
            "steps": steps,
            "compare": compare,
            "levers": levers,
            "decode": decode,
            "data": str(data_dir) if data_dir is not None else None,
        },
    )

    def add(row: Measurement) -> None:
        report.measurements.append(row)
        if on_row:
            on_row(report, row)

    def skip(what: str, why: str) -> None:
        report.settings.setdefault("skipped", {})[what] = why

    timing = Timing.of(task, steps=steps, device=device, progress=progress, on_row=add, skip=skip)
    try:
        _run_task(task, preset, batch, (compare, levers, official), decode, data_dir, workers, timing)
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"bench {task} at batch {batch} does not fit in the memory of {device}: pass a smaller --batch"
        ) from None
    return report


def _run_task(
    task: str,
    preset: Preset,
    batch: int,
    which: tuple[bool, bool, bool],
    decode: bool,
    data_dir: str | Path | None,
    workers: list[int] | None,
    timing: Timing,
) -> None:
    device, skip = timing.device, timing.skipped
    compare, levers, official = which
    base = [OFFICIAL, OURS] if official else [OURS]
    if task == "train":
        recipes = [
            *(TRAIN_LADDER if compare else base),
            *_levers(TRAIN_LEVERS, compare or levers, device, skip),
        ]
        bench_train(preset, batch=batch, recipes=recipes, data_dir=data_dir, timing=timing)
    elif task == "sample":
        decodes = decode and preset.data.space == "latent"
        rungs = _levers(SAMPLE_LEVERS, compare or levers, device, skip, decodes=decodes)
        recipes = [*(SAMPLE_LADDER if compare else base), *rungs]
        if device.type != "cuda":
            recipes = [r for r in recipes if not r.cuda_graphs]
        bench_sample(preset, batch=batch, recipes=recipes, decode=decode, timing=timing)
    elif task == "data":
        from uvit_cli.bench.data import bench_data

        bench_data(preset, batch=batch, data_dir=data_dir, workers=workers, timing=timing)
    elif task == "prepare":
        from uvit_cli.bench.encoders import bench_prepare

        bench_prepare(preset, batch=batch, timing=timing)
    elif task == "fid":
        from uvit_cli.bench.encoders import bench_fid

        bench_fid(batch=batch, timing=timing)
    elif task == "attention":
        from uvit_cli.bench.device import bench_attention

        bench_attention(preset, batch=batch, timing=timing)
    else:
        from uvit_cli.bench.device import bench_device

        bench_device(timing)


def _levers(
    rungs: list[Recipe],
    wanted: bool,
    device: torch.device,
    skip: Callable[[str, str], None],
    *,
    decodes: bool = True,
) -> list[Recipe]:
    """The lever rungs that can show their lever on `device` (when `wanted`); the others are skipped, each
    with why."""
    if not wanted:
        return []
    kept = []
    for r in rungs:
        why = lever_refusal(r, device, decodes=decodes)
        if why is None:
            kept.append(r)
        else:
            skip(r.name, why)
    return kept


# Batches of the tasks whose preset has none: the encoders' and Inception's (the device probe has none).
DEFAULT_BATCH = {"prepare": 64, "fid": 200, "device": 1}
# Peak memory per image beyond the weights, measured on the CPU: the FID Inception at 299x299 (21 MiB), and
# a training step keeping every block's activations for the backward (9.6x sampling's peak: 3.9 GiB for
# cifar10_uvit_s2 at batch 32).
_INCEPTION_BYTES_PER_IMAGE = 24 << 20
_TRAIN_OVER_SAMPLE = 10


def _check_resources(
    task: str, preset: Preset, batch: int, steps: int | None, *, decode: bool, device: torch.device
) -> None:
    """Refuse, before anything is allocated, a batch that cannot fit in this machine's memory (on the CPU; a
    GPU's out-of-memory error is turned into one line), and `bench data`'s items that cannot fit on disk."""
    from uvit_cli.sample.generate import DECODE_FLOATS_PER_PIXEL, SampleSettings, batch_memory_bytes

    what = f"bench {task} at batch {batch:,}"
    fix = "pass a smaller --batch"
    if task == "data":
        m, d = preset.model, preset.data
        # bytes of one item as stored: uint8 pixels, or float16 moments (mean | logvar) of up to two views
        item = 3 * d.resolution**2 if d.space == "pixel" else 2 * 2 * m.in_chans * m.img_size**2 * 2
        if m.conditioning == "text":
            item += 5 * 77 * (m.clip_dim or 0) * 2  # five captions' float16 contexts
        n = batch * ((steps or 10) + 2)
        require_memory(what, n * item, fix=fix + " or --repeats")
        # float16 shards of ours and float32 files of the official layout
        require_disk(tempfile.gettempdir(), what, 3 * n * item, fix=fix + " or --repeats")
        return
    if device.type != "cpu" or task == "device":  # the device probe's CPU sizes are fixed and small
        return
    if task == "attention":  # q, k, v, out and their gradients; the math path keeps two (T, T) maps per head
        from uvit_cli.bench.device import attention_shape

        B, H, T, Dh = attention_shape(preset.model, batch)
        require_memory(what, 4 * B * H * (8 * T * Dh + 4 * T * T), fix=fix)
        return
    if task == "sample":  # guided as the preset samples, decoding 50 at a time as both recipes do
        settings = SampleSettings(batch_size=batch, decode_batch_size=50, cfg_scale=preset.sample.cfg_scale)
        need = batch_memory_bytes(preset, settings, decode=decode)
    elif task == "train":
        need = _TRAIN_OVER_SAMPLE * batch_memory_bytes(preset, SampleSettings(batch_size=batch), decode=False)
    elif task == "prepare":  # the VAE encoder at full resolution, as its decoder
        need = 4 * DECODE_FLOATS_PER_PIXEL * batch * preset.data.resolution**2
    else:
        need = _INCEPTION_BYTES_PER_IMAGE * batch
    require_memory(what, need, fix=fix)


def write_json(report: BenchReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, report.to_json() + "\n")
    return path
