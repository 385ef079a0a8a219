"""`uvit export RUN|CKPT --out DIR` (a folder ready for the Hugging Face Hub) and `uvit push DIR ORG/NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uvit_cli.cli.common import handle_errors, option, out, warn


def export_command(
    source: Annotated[
        str,
        typer.Argument(
            help="A run dir (its newest checkpoint), a step dir, our .safetensors, or the paper's .pth."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (must be empty).")],
    best: Annotated[
        bool, typer.Option("--best", help="Export RUN/best (the EMA weights of the best FID while training).")
    ] = False,
    preset: Annotated[
        str | None,
        option("--preset", help="Preset name or .toml of a .pth (default: recognised by its shapes)."),
    ] = None,
    samples: Annotated[
        Path | None,
        option("--samples", help="A PNG to show as samples.png (default: the run's grid of that step)."),
    ] = None,
    repo_id: Annotated[
        str | None, option("--repo-id", help="ORG/NAME for the card's usage lines (`uvit push` fills it).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty --out, replacing exported files.")
    ] = False,
) -> None:
    """Write a Hub-ready folder: model.safetensors (EMA weights, official key names), preset.toml, README.md
    (model card), samples.png. Upload it with `uvit push DIR ORG/NAME`; load it with --ckpt DIR."""
    from uvit_cli.export import export

    result = export(source, out_dir, preset=preset, best=best, samples=samples, repo_id=repo_id, force=force)
    for note in result.notes:
        warn(note)
    step = f", step {result.step:,}" if result.step is not None else ""
    out.print(f"exported {result.source} ({result.preset.name}{step}) to {result.out}", markup=False)
    for f in result.files:
        out.print(f"wrote {f}", markup=False)


def push_command(
    folder: Annotated[Path, typer.Argument(help="A folder made by `uvit export`.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub model repo, ORG/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
) -> None:
    """Upload an exported folder to the Hugging Face Hub (needs huggingface_hub, the hub extra, and a token)."""
    from uvit_cli.hub import push

    url = push(folder, repo_id, private=private)
    out.print(f"uploaded {folder} to {url}; load it with --ckpt {repo_id}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(handle_errors(export_command))
    app.command("push")(handle_errors(push_command))
