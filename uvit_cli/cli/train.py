"""`uvit train PRESET`: train (or continue training) a preset's model; progress drawn here, work in uvit_cli.train."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from uvit_cli.cli.common import SetOption, console, fail, handle_errors, option, warn

if TYPE_CHECKING:
    from rich.progress import TaskID

    from uvit_cli.config import Preset
    from uvit_cli.train import TrainEvent


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@handle_errors
def train(
    preset: Annotated[str, typer.Argument(help="Preset name or path to a .toml file.", show_default=False)],
    set_: SetOption = None,
    run_dir: Annotated[
        Path | None,
        option("--run-dir", help="Run directory (default runs/<preset name>); rerun to resume."),
    ] = None,
    batch_per_gpu: Annotated[
        int | None,
        option(
            "--batch-per-gpu",
            min=1,
            help="Micro-batch per GPU; gradient accumulation fills the rest of its share of train.batch_size.",
        ),
    ] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Do not torch.compile the model.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Continue a run dir that was created by a different preset.")
    ] = False,
    max_steps: Annotated[
        int | None,
        option("--max-steps", min=1, help="Stop after this many steps of this invocation."),
    ] = None,
    init: Annotated[
        Path | None,
        option(
            "--init",
            help="Start a new run from these weights (our checkpoint or run dir, a Hub model ORG/NAME or "
            "hf://ORG/NAME/FILE, or the paper's nnet_ema.pth): model and EMA loaded, fresh optimiser and schedule.",
        ),
    ] = None,
    data_changed: Annotated[
        bool,
        typer.Option(
            "--data-changed",
            help="Resume although data.path now gives another prepared set than the one the run trained on.",
        ),
    ] = False,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help='Log to TensorBoard in RUN/tensorboard/ (= --set log.tensorboard=true; pip install "uvit\\[tensorboard]").',
        ),
    ] = False,
    wandb: Annotated[
        bool,
        typer.Option(
            "--wandb",
            help='Log to Weights & Biases, offline without an API key (= --set log.wandb=true; pip install "uvit\\[wandb]").',
        ),
    ] = False,
) -> None:
    """Train a preset's U-ViT on its prepared shards; rerunning the same command resumes exactly.

    Multi-GPU: torchrun --nproc_per_node N -m uvit_cli train PRESET (train.batch_size is the global batch).
    """
    from uvit_cli.config import MANIFEST, load_preset

    sets = [
        *(set_ or []),
        *(["log.tensorboard=true"] if tensorboard else []),
        *(["log.wandb=true"] if wandb else []),
    ]
    p = load_preset(preset, sets)  # a wrong name or --set key fails in a second, before torch loads
    manifest = p.data.set_path() / MANIFEST  # data/ would load torch
    if not manifest.is_file():  # likewise data that was never prepared
        raise fail(
            f"{manifest} not found: prepare the data first (`{p.data.prepare_command()}`, or --set data.path=DIR)",
            code=2,
        )

    from uvit_cli import dist
    from uvit_cli.train import train as run_training

    display = _TrainDisplay() if dist.is_main() else None
    try:
        result = run_training(
            p,
            run_dir,
            batch_per_gpu=batch_per_gpu,
            compile=False if no_compile else None,
            force=force,
            max_steps=max_steps,
            init=init,
            data_changed=data_changed,
            on_event=display,
        )
        stopped = result.stopped is not None  # Ctrl-C or SIGTERM: saved at the step in flight
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: stopped at once
        stopped = True
    finally:
        if display is not None:
            display.stop()
    if stopped:
        if display is not None:
            _interrupted(p, run_dir, display.completed)
        sys.exit(130)


class _TrainDisplay:
    """The progress bar and lines of `uvit train` (rank 0): called with each TrainEvent."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]train[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  {task.fields[ips]} img/s  data {task.fields[wait]} ms/step  "
                "lr {task.fields[lr]}  ETA {task.fields[eta]}"
            ),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None

    @property
    def completed(self) -> float | None:
        """The last step the bar showed (None before the start event)."""
        return None if self.task is None else self.progress.tasks[0].completed

    def stop(self) -> None:
        self.progress.stop()

    def __call__(self, e: TrainEvent) -> None:
        progress = self.progress
        if e.kind == "start":
            console.print(f"[dim]{escape(e.message)}[/dim]")
            self.task = progress.add_task(
                "train",
                total=e.metrics.get("end_step", e.total_steps),
                completed=e.step,
                loss="-",
                ips="-",
                wait="-",
                lr="-",
                eta="-",
            )
            progress.start()
        elif e.kind == "log" and self.task is not None:
            m = e.metrics
            progress.update(
                self.task,
                completed=e.step,
                loss=f"{m['loss']:.4f}",
                ips=f"{m['img_per_s']:.1f}",
                wait=f"{m['data_wait_ms']:.1f}",
                lr=f"{m['lr']:.2e}",
                eta=_duration(m["eta_s"]),
            )
        elif e.kind == "warning":
            warn(e.message)
        elif e.kind in ("checkpoint", "samples", "fid"):
            progress.console.print(f"[dim]step {e.step}: {escape(e.message)}[/dim]", soft_wrap=True)
        elif e.kind == "done":
            progress.stop()
            console.print(escape(e.message), soft_wrap=True)


def _interrupted(preset: Preset, run_dir: Path | None, step: float | None) -> None:
    """Say honestly what a Ctrl-C kept: the newest checkpoint (what a rerun resumes from), or nothing."""
    from uvit_cli.checkpoint import default_run_dir, list_checkpoints

    run = run_dir if run_dir is not None else default_run_dir(preset)
    saved = list_checkpoints(run)
    at = f" (last logged step {int(step)})" if step else ""
    if saved:
        kept = f"rerun the same command to resume from step {saved[-1][0]} ({saved[-1][1]})"
        if step and int(step) > saved[-1][0]:
            kept += f"; the {int(step) - saved[-1][0]}+ steps since are lost"
    else:
        kept = (
            f"no checkpoint was saved yet (train.save_interval = {preset.train.save_interval}), "
            "so a rerun starts over; --max-steps N ends a run with a checkpoint"
        )
    console.print(f"[yellow]interrupted[/yellow]{at}: {escape(kept)}", soft_wrap=True)


def _duration(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
