"""`uvit bench`: time the real code paths against the official recipe, side by side in one process.

Every task builds the preset's real network (random weights of the real size), feeds it data of the
real shapes, and times whole steps after warm-up (and compilation). FLOPs are counted once with
`torch.utils.flop_counter` on the meta device (training = 3x the forward: the backward is twice the
forward; recomputation by gradient checkpointing is not counted, as MFU conventionally does not).

    report = run_bench("train", load_preset("coco_uvit_s2_deep"), batch=256, steps=20)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uvit_cli.bench.measure import Measurement, device_name, peak_tflops
from uvit_cli.bench.recipes import OFFICIAL, OURS, SAMPLE_LADDER, TRAIN_LADDER
from uvit_cli.bench.tasks import bench_fid, bench_prepare, bench_sample, bench_train, default_device
from uvit_cli.config import Preset
from uvit_cli.errors import ConfigError
from uvit_cli.fileio import write_text_atomic

TASKS = ("train", "sample", "prepare", "fid", "data")
Progress = Callable[[str], None]


@dataclasses.dataclass
class BenchReport:
    task: str
    preset: str
    device: str
    torch_version: str
    peak_bf16_tflops: float | None
    date: str
    measurements: list[Measurement]
    settings: dict[str, Any]

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
    official: bool = True,
    decode: bool = True,
    data_dir: str | Path | None = None,
    workers: list[int] | None = None,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Run one benchmark task and return its report (our recipe and, by default, the official one)."""
    if task not in TASKS:
        raise ConfigError(f"unknown bench task '{task}' (choose from {', '.join(TASKS)})")
    device = device or default_device()
    kw: dict[str, Any] = {"device": device, "progress": progress}
    if steps is not None:
        kw["steps"] = steps
    if task == "train":
        recipes = TRAIN_LADDER if compare else ([OFFICIAL, OURS] if official else [OURS])
        ms = bench_train(preset, batch=batch, recipes=recipes, data_dir=data_dir, **kw)
    elif task == "sample":
        recipes = SAMPLE_LADDER if compare else ([OFFICIAL, OURS] if official else [OURS])
        if device.type != "cuda":
            recipes = [r for r in recipes if not r.cuda_graphs]
        ms = bench_sample(preset, batch=batch, recipes=recipes, decode=decode, **kw)
    elif task == "data":
        from uvit_cli.bench.data import bench_data

        ms = bench_data(preset, batch=batch, data_dir=data_dir, workers=workers, **kw)
    elif task == "prepare":
        ms = bench_prepare(preset, batch=batch or 64, **kw)
    else:
        ms = bench_fid(batch=batch or 200, **kw)
    name = device_name(device)
    return BenchReport(
        task=task,
        preset=preset.name,
        device=name,
        torch_version=torch.__version__,
        peak_bf16_tflops=peak_tflops(name) if device.type == "cuda" else None,
        date=datetime.date.today().isoformat(),
        measurements=ms,
        settings={
            "batch": ms[0].batch if ms else batch,
            "steps": steps,
            "compare": compare,
            "decode": decode,
            "data": str(data_dir) if data_dir is not None else None,
        },
    )


def write_json(report: BenchReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, report.to_json() + "\n")
    return path
