"""Plain state dicts: an official `nnet.pth` / `nnet_ema.pth` read, a state dict checked key by key against a
model, the packaged preset an official file belongs to, recognised by its shapes, and the paper's released
files (`OFFICIAL_FILES`: where to get each, the preset it loads with)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


# Wrappers whose prefix a saved state dict can carry: DDP (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def official_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` under the official key names: a prefix that every key carries from a DDP or torch.compile
    wrapper is removed (our checkpoints and the paper's files carry none, so they come back unchanged)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


# --------------------------------------------------------------------------------------------------
# The paper's released files


@dataclass(frozen=True)
class OfficialFile:
    """One of the paper's released U-ViT files, as the official README lists it (baofff/U-ViT, *Pretrained
    Models* and the FID commands' `--nnet_path`): its file name, the model, the packaged preset it loads
    with, the FID and training iterations the README reports, its Google Drive file id, and a ModelScope
    mirror where one is known. Sizes and sha256 are not published there: None, never guessed."""

    file: str
    model: str
    preset: str
    fid: float
    iterations: str
    drive_id: str
    modelscope: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None

    @property
    def drive_url(self) -> str:
        return f"https://drive.google.com/file/d/{self.drive_id}/view"


# ModelScope mirrors: modelscope/modelscope examples/pytorch/UViT_ImageNet_demo.ipynb downloads
# imagenet256_uvit_huge.pth from thu-ml/imagenet256_uvit_huge and imagenet512_uvit_huge.pth from
# thu-ml/imagenet512_uvit_huge; no mirror of the others is documented.
OFFICIAL_FILES = (
    OfficialFile("cifar10_uvit_small.pth", "CIFAR10 (U-ViT-S/2)", "cifar10_uvit_s2", 3.11, "500K",
                 "1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-"),
    OfficialFile("celeba64_uvit_small.pth", "CelebA 64x64 (U-ViT-S/4)", "celeba64_uvit_s4", 2.87, "500K",
                 "13YpbRtlqF1HDBNLNRlKxLTbKbKeLE06C"),
    OfficialFile("imagenet64_uvit_mid.pth", "ImageNet 64x64 (U-ViT-M/4)", "imagenet64_uvit_m4", 5.85, "300K",
                 "1igVgRY7-A0ZV3XqdNcMGOnIGOxKr9azv"),
    OfficialFile("imagenet64_uvit_large.pth", "ImageNet 64x64 (U-ViT-L/4)", "imagenet64_uvit_l4", 4.26,
                 "300K", "19rmun-T7RwkNC1feEPWinIo-1JynpW7J"),
    OfficialFile("imagenet256_uvit_large.pth", "ImageNet 256x256 (U-ViT-L/2)", "imagenet256_uvit_l2", 3.40,
                 "300K", "1w7T1hiwKODgkYyMH9Nc9JNUThbxFZgs3"),
    OfficialFile("imagenet256_uvit_huge.pth", "ImageNet 256x256 (U-ViT-H/2)", "imagenet256_uvit_h2", 2.29,
                 "500K", "13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u", modelscope="thu-ml/imagenet256_uvit_huge"),
    OfficialFile("imagenet512_uvit_large.pth", "ImageNet 512x512 (U-ViT-L/4)", "imagenet512_uvit_l4", 4.67,
                 "500K", "1mkj4aN2utHMBTWQX9l1nYue9vleL7ZSB"),
    OfficialFile("imagenet512_uvit_huge.pth", "ImageNet 512x512 (U-ViT-H/4)", "imagenet512_uvit_h4", 4.05,
                 "500K", "1uegr2o7cuKXtf2akWGAN2Vnlrtw5YKQq", modelscope="thu-ml/imagenet512_uvit_huge"),
    OfficialFile("mscoco_uvit_small.pth", "MS-COCO (U-ViT-S/2)", "coco_uvit_s2", 5.95, "1M",
                 "15JsZWRz2byYNU6K093et5e5Xqd4uwA8S"),
    OfficialFile("mscoco_uvit_small_deep.pth", "MS-COCO (U-ViT-S/2, Deep)", "coco_uvit_s2_deep", 5.48, "1M",
                 "1gHRy8sn039Wy-iFL21wH8TiheHK8Ky71"),
)  # fmt: skip


def official_file(name: str) -> OfficialFile | None:
    """The released file of this name (`imagenet256_uvit_huge.pth`), or None."""
    return next((f for f in OFFICIAL_FILES if f.file == name), None)
