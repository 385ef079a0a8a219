"""What every subcommand shares: the console, error rendering, and the `--set` option."""

from __future__ import annotations

import functools
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
