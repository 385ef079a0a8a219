"""`uvit presets list|show|weights`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from uvit_cli import config
from uvit_cli.cli.common import SetOption, handle_errors, out

app = typer.Typer(help="List and inspect the packaged presets.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_() -> None:
    """List the packaged presets with their model and data."""
    table = Table("name", "model", "data", "schedule", "solver")
    table.columns[0].no_wrap = True
    for name in config.list_presets():
        p = config.load_preset(name)
        m = p.model
        table.add_row(
            name,
            f"D{m.embed_dim} depth {m.depth} patch {m.patch_size}, {m.conditioning}",
            f"{p.data.kind} {p.data.resolution}px {p.data.space}",
            _schedule(p),
            f"{p.sample.solver} {p.sample.steps}, cfg {p.sample.cfg_scale:g}",
        )
    out.print(table)
    out.print(
        f"[dim]{len(table.rows)} presets in {config.presets_dir()}; `uvit presets show NAME` prints one.[/dim]"
    )


def _schedule(p: config.Preset) -> str:
    """The schedule column: [schedule]'s kind for eps models, with "(v)" for v models; "flow" (and its time
    shift) for flow models, which sample the linear path instead."""
    t = p.train
    if t.objective == "flow":
        return "flow" + (f", shift {t.time_shift:g}" if t.time_shift is not None else "")
    return p.schedule.kind + (" (v)" if t.objective == "v" else "")


@app.command("show")
@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Preset name or path to a .toml file.")],
    set_: SetOption = None,
) -> None:
    """Print a preset, fully resolved (defaults filled in, overrides applied), as TOML."""
    typer.echo(config.load_preset(name, set_ or []).to_toml(), nl=False)


@app.command("weights")
@handle_errors
def weights() -> None:
    """List the paper's released checkpoints: file, preset, reported FID, where to get them, the export line."""
    from uvit_cli.state_dicts import OFFICIAL_FILES

    for f in OFFICIAL_FILES:  # a block per file: the ids and links stay whole on any terminal
        size = f"{f.size_bytes:,} bytes" if f.size_bytes is not None else "size unknown"
        out.print(f"{f.file}  {f.model}, FID {f.fid:g} ({f.iterations} iterations)", markup=False)
        out.print(f"    preset {f.preset}; {size}; sha256 {f.sha256 or 'unknown'}", markup=False)
        out.print(f"    Google Drive {f.drive_url}", markup=False)
        if f.modelscope:
            out.print(
                f"    ModelScope {f.modelscope} (https://modelscope.cn/models/{f.modelscope})", markup=False
            )
    out.print(
        "From the official README (github.com/baofff/U-ViT, Pretrained Models), which gives no sizes or "
        "sha256. Each loads as --ckpt FILE (its preset recognised by its shapes); make one Hub-ready with "
        "`uvit export FILE --out DIR`, then `uvit push DIR ORG/NAME`.",
        markup=False,
    )
