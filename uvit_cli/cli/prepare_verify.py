"""`uvit prepare verify DIR`: the full hash check of a prepared folder (see docs/data.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from uvit_cli.cli.common import handle_errors, option
from uvit_cli.cli.common import out as stdout


@handle_errors
def verify(
    directory: Annotated[
        Path, typer.Argument(help="A folder written by uvit prepare (holds manifest.json).")
    ],
    split: Annotated[str | None, option("--split", help="Check only this split (default: all).")] = None,
) -> None:
    """Recompute the sha256 of every shard file against the manifest (finds flipped bytes; slow on big sets)."""
    from rich.progress import Progress

    from uvit_cli.data import verify as verify_set

    t0 = time.perf_counter()
    with Progress(console=stdout, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"{name} shards", total=total)
            bar.update(tasks[name], completed=done)

        checked = verify_set(directory, split, progress)
    for name, files in checked.items():
        stdout.print(f"{name}: {files} files match the manifest")
    stdout.print(f"{directory}: intact ({time.perf_counter() - t0:.1f} s)")
