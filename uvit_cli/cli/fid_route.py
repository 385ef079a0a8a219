"""Which subcommand `uvit fid ARGS...` means when its arguments name none (`route`), and the group that asks."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from typer.core import TyperGroup

# Options that only generating from a checkpoint takes: `uvit fid` without a subcommand name and with one of
# these (also as --n=5 or -n5) means `uvit fid generate`.
_GENERATE_OPTS = ("--ckpt", "--preset", "--n", "-n")


def route(args: list[str], own: Collection[str]) -> list[str]:
    """The arguments of `uvit fid ARGS...` with the subcommand they mean in front; `own` are the words the group
    reads itself (its subcommands' names, --help):

        uvit fid compare|ref|pack|generate ...           that subcommand; `uvit fid --help` the group's help
        uvit fid --ckpt CKPT REF ... (or --preset, --n)  generate: FID straight from a checkpoint
        uvit fid SAMPLES REF ...                         compare: FID of a folder or .npz of images

    After a `--`, arguments are file names, not options."""
    if not args or args[0] in own:
        return args
    for a in args:
        if a == "--":
            break
        if a.split("=", 1)[0] in _GENERATE_OPTS or (a.startswith("-n") and a[2:].isdigit()):
            return ["generate", *args]
    return ["compare", *args]


class FidGroup(TyperGroup):
    """`uvit fid`, whose arguments name their subcommand or imply it (`route`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, route(args, {*self.commands, *ctx.help_option_names}))
