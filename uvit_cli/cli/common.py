"""What every subcommand shares: the console, error rendering, and the `--set` option."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from uvit_cli.errors import UvitError

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a preset value, e.g. --set train.lr=1e-4 (repeatable).", show_default=False
    ),
]


def is_rank0() -> bool:
    """Under torchrun only rank 0 draws bars and prints (read from the environment: no torch import)."""
    return int(os.environ.get("RANK", "0")) == 0


def image_progress(*, note: bool = False, transient: bool = False) -> Any:
    """The rich progress bar of image work (prepare, sample, fid): count, images/s, ETA; rank 0 only.

    Each task shows its description; with `note=True` it also takes a `note` field shown after the ETA.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:7.2f} img/s" if speed else "    -- img/s")

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
    ]
    if note:
        columns.append(TextColumn("{task.fields[note]}"))
    return Progress(*columns, console=console, transient=transient, disable=not is_rank0())


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one red line and return the Exit to raise."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit code: no tracebacks for users."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UvitError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
