"""Plain state dicts: an official `nnet.pth` / `nnet_ema.pth` read, a state dict checked key by key against a
model, and the packaged preset an official file belongs to, recognised by its shapes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uvit_cli.errors import CheckpointError, CheckpointMismatch
from uvit_cli.safe_pickle import torch_load_tensors

if TYPE_CHECKING:
    import torch

    from uvit_cli.config import Preset


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters of it), for a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def read_official(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an official .pth (a plain state dict), loaded without running code."""
    import torch

    try:
        obj = torch_load_tensors(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as a state dict ({first_line(e)}); expected our .safetensors or an "
            "official nnet.pth / nnet_ema.pth"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a plain state dict of tensors (official nnet.pth layout)")
    return dict(obj)


def _short(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state_dict(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise one CheckpointError line naming missing / unexpected / mis-shaped keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_short(shapes, 3)}")
        raise CheckpointMismatch(f"{what} does not fit the model: " + "; ".join(parts))


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def recognise_preset(sd: Mapping[str, torch.Tensor], source: str) -> Preset:
    """The packaged preset whose model has exactly these keys and shapes (an official .pth has no preset).

    The ten paper architectures differ in at least one shape, so at most one fits; the number of heads
    changes no shape, but no two packaged presets differ in heads alone.
    """
    import torch

    from uvit_cli.config import list_presets, load_preset
    from uvit_cli.model import UViT

    want = _shapes(sd)
    fits = []
    for name in list_presets():
        preset = load_preset(name)
        if preset.train.objective != "eps":  # the paper's files are eps; flow/v presets share their shapes
            continue
        with torch.device("meta"):  # shapes only: no memory, no init cost
            shapes = _shapes(UViT(**preset.model).state_dict())
        if shapes == want:
            fits.append(preset)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        width = want.get("pos_embed", ("?", "?", "?"))[-1]
        depth = 2 * sum(1 for k in want if k.startswith("in_blocks.") and k.endswith(".norm1.weight"))
        raise CheckpointError(
            f"{source}: carries no preset and fits none of the packaged ones (width {width}, depth {depth}); "
            "pass the preset it belongs to with --preset NAME or a .toml"
        )
    names = ", ".join(p.name for p in fits)
    raise CheckpointError(f"{source}: carries no preset and fits several ({names}); pass one with --preset")
