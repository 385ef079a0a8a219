"""`uvit bench train|sample|prepare|fid|data|attention|device`: each row printed (and `--json` rewritten) the
moment it is measured, the table after the last."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from uvit_cli.cli.common import DeviceOpt, SetOption, console, handle_errors, out


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _counts(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        counts = sorted({int(w) for w in text.split(",")})
    except ValueError:
        raise typer.BadParameter(
            f"'{text}' is not a comma-separated list of worker counts, e.g. 0,2,4"
        ) from None
    if counts[0] < 0:
        raise typer.BadParameter("worker counts are 0 or more")
    return counts


@handle_errors
def bench(
    task: Annotated[
        str,
        typer.Argument(
            help="What to time: train, sample, prepare, fid, data (the loader), attention (the SDPA kernels "
            "of the preset's attention) or device (matmul and copy ceilings)."
        ),
    ],
    preset: Annotated[str, typer.Option("--preset", help="Preset name or .toml path.")] = "coco_uvit_s2_deep",
    batch: Annotated[int | None, typer.Option(min=1, help="Batch size (default: the preset's).")] = None,
    repeats: Annotated[
        int | None, typer.Option("--repeats", min=1, help="Timed repetitions (steps, batches) after warm-up.")
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Add each optimisation one at a time, then each speed lever (train, sample)."
        ),
    ] = False,
    levers: Annotated[
        bool,
        typer.Option(
            "--levers",
            help="train, sample: after uvit, one rung per speed lever (bf16 stream, cuDNN attention, "
            "max-autotune, FP8 linears / channels_last VAE), without the ladder.",
        ),
    ] = False,
    official: Annotated[
        bool, typer.Option(help="Also time the official recipe (the ratio's baseline).")
    ] = True,
    decode: Annotated[bool, typer.Option(help="sample: include VAE decoding (latent presets).")] = True,
    workers: Annotated[
        str | None,
        typer.Option(
            "--workers",
            help="data: DataLoader worker counts to time, e.g. 0,2,4 (default: 0, 2 and the preset's).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="data, train: a prepared folder to read (default: random data of the preset's shapes).",
        ),
    ] = None,
    device: DeviceOpt = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Time the real code paths (random weights of the real sizes) against the official recipe."""
    from uvit_cli import config
    from uvit_cli.fileio import check_outputs

    p = config.load_preset(preset, set_ or [])  # validate before importing torch
    counts = _counts(workers)
    check_outputs(
        {"--json": json_path}, {"--preset": preset if Path(preset).is_file() else None, "--data": data}
    )

    from uvit_cli import dist
    from uvit_cli.bench import run_bench, write_json

    dev = dist.device(device) if device else None  # one line for a device this machine lacks
    with console.status("benchmarking…") as status:

        def on_row(report: Any, row: Any) -> None:  # stream: a run cut short keeps what it measured
            if json_path:  # first, so a printed row is always in the file
                write_json(report, json_path)
            status.stop()
            out.print(_row_line(row), markup=False)
            status.start()

        report = run_bench(
            task,
            p,
            batch=batch,
            steps=repeats,
            compare=compare,
            levers=levers,
            official=official,
            decode=decode,
            data_dir=data,
            workers=counts,
            device=dev,
            progress=lambda msg: status.update(f"benchmarking {msg}…"),
            on_row=on_row,
        )

    if task == "data":
        _print_data(report, p.name)
    elif task == "device":
        _print_device(report)
    else:
        _print_timing(report, p.name, task)
    for what, why in report.settings.get("skipped", {}).items():
        out.print(f"{what}: skipped: {why}", markup=False)
    if json_path:
        out.print(f"wrote {write_json(report, json_path)}")


def _row_line(m: Any) -> str:
    """One measured row as one line, printed the moment it is measured."""
    parts = [f"{m.images_per_s:,.1f} img/s" if m.task != "device" else "", f"{m.ms_per_step:,.2f} ms/step"]
    if m.tflops is not None:
        parts.append(f"{m.tflops:,.1f} TFLOP/s" + (f" (MFU {100 * m.mfu:.1f}%)" if m.mfu else ""))
    if m.gb_per_s is not None:
        parts.append(f"{m.gb_per_s:,.1f} GB/s")
    if m.peak_mem_gb is not None:
        parts.append(f"peak {m.peak_mem_gb:.1f} GB")
    if m.warmup_s is not None:
        parts.append(f"warm-up {m.warmup_s:.1f} s")
    return f"{m.task} · {m.recipe}: {', '.join(p for p in parts if p)} · {m.note}"


def _print_data(report: Any, name: str) -> None:
    """The loader table: samples/s of each reader and worker count, and the speed-up."""
    table = Table("reader", "samples/s", "ms/batch", "warm-up s", "what", title=f"uvit bench data · {name} · "
                  f"batch {report.settings['batch']}", caption=f"{report.device} · torch {report.torch_version} · "
                  f"{report.date}")  # fmt: skip
    for m in report.measurements:
        table.add_row(
            m.recipe, f"{m.images_per_s:,.0f}", f"{m.ms_per_step:,.2f}", _fmt(m.warmup_s, ".1f"), m.note
        )
    out.print(table)
    if report.speedup is not None:
        out.print(f"speed-up over the official reader: [bold]{report.speedup:.2f}x[/bold] (workers 0, warm)")


def _print_device(report: Any) -> None:
    """The ceilings: matmul TFLOP/s (and the share of the data-sheet peak), copy GB/s."""
    table = Table("probe", "ms", "TFLOP/s", "of bf16 peak", "GB/s", "what", title="uvit bench device",
                  caption=f"{report.device} · torch {report.torch_version} · {report.date}")  # fmt: skip
    for m in report.measurements:
        table.add_row(
            m.recipe,
            f"{m.ms_per_step:,.3f}",
            _fmt(m.tflops, ",.1f"),
            _fmt(m.mfu and 100 * m.mfu, ".1f") + ("%" if m.mfu else ""),
            _fmt(m.gb_per_s, ",.1f"),
            m.note,
        )
    out.print(table)


def _print_timing(report: Any, name: str, task: str) -> None:
    """The recipe table of train / sample / prepare / fid / attention: img/s, ms/step, TFLOP/s, MFU, peak
    memory, warm-up seconds (compilation, autotuning: the wait before the first step)."""
    table = Table(
        "recipe",
        "img/s",
        "ms/step",
        "TFLOP/s",
        "MFU",
        "peak mem GB",
        "warm-up s",
        "what",
        title=f"uvit bench {task} · {name} · batch {report.settings['batch']}",
        caption=f"{report.device} · torch {report.torch_version} · {report.date}",
    )
    for m in report.measurements:
        table.add_row(
            m.recipe,
            f"{m.images_per_s:,.1f}",
            f"{m.ms_per_step:,.1f}",
            _fmt(m.tflops, ".1f"),
            _fmt(m.mfu and 100 * m.mfu, ".1f") + ("%" if m.mfu else ""),
            _fmt(m.peak_mem_gb, ".1f"),
            _fmt(m.warmup_s, ".1f"),
            m.note,
        )
    out.print(table)
    if report.speedup is not None:
        out.print(f"speed-up over the official recipe: [bold]{report.speedup:.2f}x[/bold]")
    if report.peak_bf16_tflops is None and report.device.startswith("CPU"):
        out.print(
            "[dim]CPU: fp32 and eager for every recipe, no MFU; GPU numbers are the ones that count.[/dim]"
        )


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
