"""The `uvit` command. Thin: parse, resolve config, one call into a workflow, render.

Importing this module must not import torch (`uvit --help` stays fast); each command imports its
workflow inside the function body.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

from uvit_cli import __version__
from uvit_cli.cli import presets

# Each workflow's command lives in uvit_cli/cli/<name>.py and exposes `register(app)`.
_COMMANDS = ("prepare", "train", "sample", "fid", "bench", "quickstart", "report", "export")


class _PipelineOrder(TyperGroup):
    """`uvit --help` lists the commands in pipeline order, not commands-then-groups."""

    def list_commands(self, ctx: Any) -> list[str]:
        order = [*_COMMANDS, "push", "presets"]  # export.py registers export and push
        return sorted(super().list_commands(ctx), key=lambda n: order.index(n) if n in order else len(order))


app = typer.Typer(
    name="uvit",
    cls=_PipelineOrder,
    help="U-ViT diffusion toolkit: prepare data, train, sample, measure FID, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(presets.app, name="presets")

for _name in _COMMANDS:
    importlib.import_module(f"uvit_cli.cli.{_name}").register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uvit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


def main() -> None:
    app()
