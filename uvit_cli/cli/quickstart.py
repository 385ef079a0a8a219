"""`uvit quickstart`: the embedded captioned-shapes set, prepared, trained, sampled and scored on a CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from uvit_cli.cli.common import SetOption, console, handle_errors, out


def quickstart_command(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Working directory: data, run, samples.")
    ] = Path("quickstart"),
    minutes: Annotated[
        float, typer.Option("--minutes", min=0.1, help="Time budget for the whole run.")
    ] = 5.0,
    steps: Annotated[
        int | None,
        typer.Option(
            "--train-steps",
            min=1,
            help="Train exactly this many steps instead (ignores --minutes).",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        int | None,
        typer.Option("--images", min=64, help="Training images (default: 10000).", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, training and sampling.")] = 0,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for torch (default: all).", show_default=False),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Prepare the shapes set, train a tiny text-to-image U-ViT, sample a grid and score it: all on a CPU."""
    from uvit_cli.quickstart import MAX_CHUNK_S, quickstart

    last_train = [0.0]

    def show(e: Any) -> None:
        if e.stage == "train" and "step" in e.metrics:
            now = time.perf_counter()
            if now - last_train[0] < 10:  # a line every ~10 s is enough
                return
            last_train[0] = now
        if e.stage != "done":
            left = e.metrics.get("left_s") if steps is None else None
            eta = f"  ({max(left, 0) // 60:.0f}:{max(left, 0) % 60:02.0f} left)" if left is not None else ""
            console.print(f"[bold]{e.stage}[/bold] {escape(e.message)}{eta}", highlight=False, soft_wrap=True)

    try:
        result = quickstart(
            out_dir,
            minutes=minutes,
            steps=steps,
            images=images,
            seed=seed,
            threads=threads,
            overrides=overrides,
            on_event=show,
        )
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/yellow]: training checkpoints every ~{MAX_CHUNK_S:.0f} s in {out_dir / 'run'}; "
            "rerun the same command to continue from the last one",
            soft_wrap=True,
            markup=True,
        )
        raise SystemExit(130) from None
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
    if steps is None and result.steps < SHORT_RUN_STEPS:
        # Honest about a busy or slow machine: the documented scores need ~3,000 steps, not 5 minutes.
        console.print(
            f"[yellow]note:[/yellow] only {result.steps} steps fitted in {minutes:g} min here (a quiet 2-core machine "
            f"trains ~3,200 in 5 min); colour passes 95% after ~1,600 steps and shape 80% after ~3,200. "
            f"Rerun `uvit quickstart{_same_out(out_dir)}` to continue training the same run.",
            soft_wrap=True,
        )
    prompt = "a blue square at the top right"
    out.print(
        f'next: uvit sample --ckpt {out_dir / "run"} --prompt "{prompt}" --out {out_dir / "more"} --grid',
        soft_wrap=True,
        markup=False,
    )


SHORT_RUN_STEPS = 1600  # below this a 5-minute run is far from the documented scores (docs/quickstart.md)


def _same_out(out_dir: Path) -> str:
    return "" if out_dir == Path("quickstart") else f" --out {out_dir}"


def register(app: typer.Typer) -> None:
    app.command("quickstart")(handle_errors(quickstart_command))
