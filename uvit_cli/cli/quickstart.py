"""`uvit quickstart`: the embedded captioned-shapes set, prepared, trained, sampled and scored on a CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from uvit_cli.cli.common import SetOption, console, handle_errors, option, out


def quickstart_command(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Working directory: data, run, samples.")
    ] = Path("quickstart"),
    minutes: Annotated[
        float, typer.Option("--minutes", min=0.1, help="Time budget for the whole run.")
    ] = 5.0,
    steps: Annotated[
        int | None,
        option("--train-steps", min=1, help="Train exactly this many steps instead (ignores --minutes)."),
    ] = None,
    images: Annotated[
        int | None, option("--images", min=64, help="Training images (default: 10000).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, training and sampling.")] = 0,
    threads: Annotated[
        int | None,
        option(
            "--threads",
            min=1,
            help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else 1 for the tiny model).",
        ),
    ] = None,
    preset: Annotated[
        str,
        option(
            "--preset", help="A shapes preset: name or .toml (default: shapes_uvit_tiny, the eps objective)."
        ),
    ] = "shapes_uvit_tiny",
    overrides: SetOption = None,
) -> None:
    """Prepare the shapes set, train a tiny text-to-image U-ViT, sample a grid and score it: all on a CPU."""
    from uvit_cli.quickstart import MAX_CHUNK_S, quickstart

    try:
        result = quickstart(
            out_dir,
            minutes=minutes,
            steps=steps,
            images=images,
            seed=seed,
            threads=threads,
            overrides=overrides,
            preset_name=preset,
            on_event=_event_printer(show_time_left=steps is None),
        )
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/yellow]: training checkpoints every ~{MAX_CHUNK_S:.0f} s in {out_dir / 'run'}; "
            "rerun the same command to continue from the last one",
            soft_wrap=True,
            markup=True,
        )
        raise SystemExit(130) from None
    _print_result(result, out_dir, minutes if steps is None else None)


def _event_printer(*, show_time_left: bool) -> Callable[[Any], None]:
    """The stage lines of a quickstart: every event, but training's at most every ~10 s."""
    last_train = [0.0]

    def show(e: Any) -> None:
        if e.stage == "train" and "step" in e.metrics:
            now = time.perf_counter()
            if now - last_train[0] < 10:
                return
            last_train[0] = now
        if e.stage != "done":
            left = e.metrics.get("left_s") if show_time_left else None
            eta = f"  ({max(left, 0) // 60:.0f}:{max(left, 0) % 60:02.0f} left)" if left is not None else ""
            console.print(f"[bold]{e.stage}[/bold] {escape(e.message)}{eta}", highlight=False, soft_wrap=True)

    return show


def _print_result(result: Any, out_dir: Path, minutes: float | None) -> None:
    """Steps and stage times, the scores beside the held-out reference, where the files are, what next; for a
    time budget of `minutes`, a note when too few steps fitted."""
    from uvit_cli.quickstart import short_run_note

    s = result.seconds
    out.print(
        f"trained {result.steps} steps; prepare {s['prepare']:.0f} s, train {s['train']:.0f} s, "
        f"sample {s['sample']:.0f} s, total {s['total']:.0f} s",
        soft_wrap=True,
    )
    out.print(f"samples:   {result.fidelity}", soft_wrap=True)
    out.print(
        f"reference: {result.reference} (held-out real images through the same analysis)", soft_wrap=True
    )
    out.print(f"grid: {result.grid}   scores: {result.out / 'fidelity.json'}", soft_wrap=True)
    if result.report is not None:
        out.print(f"run report (open in a browser): {result.report}", soft_wrap=True)
    note = short_run_note(result.steps, minutes) if minutes is not None else None
    if note is not None:  # a busy or slow machine: say so, and how to go on
        rerun = "uvit quickstart" + ("" if out_dir == Path("quickstart") else f" --out {out_dir}")
        console.print(
            f"[yellow]note:[/yellow] {escape(note)} Rerun `{escape(rerun)}` to continue training the same run.",
            soft_wrap=True,
        )
    prompt = "a blue square at the top right"
    out.print(
        f'next: uvit sample --ckpt {out_dir / "run"} --prompt "{prompt}" --out {out_dir / "more"} --grid',
        soft_wrap=True,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("quickstart")(handle_errors(quickstart_command))
