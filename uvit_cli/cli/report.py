"""`uvit report RUN_DIR`: write (or refresh) RUN_DIR/report.html and print its path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uvit_cli.cli.common import handle_errors, out


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (made by `uvit train`).")],
) -> None:
    """Write RUN_DIR/report.html: loss, lr, throughput and FID curves, sample grids, the preset."""
    from uvit_cli.train.report import write_report

    out.print(str(write_report(run_dir)), markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("report")(handle_errors(report_command))
