"""One image conversion for the package (`uvit_cli.imageio`): 8-bit files exactly as `convert("RGB")`
(what clean-fid and the official preprocessing do), 16-bit and float files scaled rather than clipped,
values without a meaning refused; and `uvit prepare` / `uvit fid` both read through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uvit_cli.imageio import read_rgb

GRADIENT = np.linspace(12, 243, 16 * 16).round().astype(np.uint8).reshape(16, 16)  # the 12..243


def _rgb8(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize(
    ("mode", "ext"),
    [("RGB", "png"), ("RGBA", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("1", "png"),
     ("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGB", "tif"), ("CMYK", "tif"), ("P", "gif"),
     ("RGB", "webp"), ("RGB", "bmp")],
)  # fmt: skip
def test_8_bit_files_read_exactly_as_pil_convert_rgb(tmp_path, mode, ext):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"a.{ext}"
    im.save(path)
    with Image.open(path) as ref:
        want = np.asarray(ref.convert("RGB"))
    got = read_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (12, 10, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, ext):
    path = tmp_path / f"g16.{ext}"
    Image.fromarray(GRADIENT.astype(np.uint16) * 257).save(path)  # the same pixels in 16 bit
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        assert (
            np.asarray(im.convert("RGB")).max() == 255 and np.asarray(im.convert("RGB")).min() == 255
        )  # clipped
    np.testing.assert_array_equal(read_rgb(path), _rgb8(GRADIENT))


def test_16_bit_values_round_to_the_nearest_level(tmp_path):
    v = np.array([[0, 128, 129, 385, 386, 65406, 65535, 30000]], np.uint16)
    Image.fromarray(v).save(tmp_path / "v.png")
    want = np.rint(v.astype(np.float64) / 257).astype(np.uint8)  # 0, 0, 1, 1, 2, 254, 255, 117
    np.testing.assert_array_equal(read_rgb(tmp_path / "v.png")[..., 0], want)


def test_float_tiff_in_0_1_is_scaled(tmp_path):
    Image.fromarray(GRADIENT.astype(np.float32) / 255).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F"
    np.testing.assert_array_equal(read_rgb(tmp_path / "f.tif"), _rgb8(GRADIENT))


@pytest.mark.parametrize(
    ("values", "words"),
    [(np.array([[0.0, 2.0]], np.float32), "outside 0..1"), (np.array([[0.5, np.nan]], np.float32), "NaN"),
     (np.array([[-5, 3]], np.int32), "outside 0..65535"), (np.array([[0, 70000]], np.int32), "outside 0..65535")],
)  # fmt: skip
def test_values_without_an_8_bit_meaning_are_refused(tmp_path, values, words):
    path = tmp_path / "x.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=words):
        read_rgb(path)


def _grey_folders(tmp_path: Path) -> tuple[Path, Path]:
    """The same 5 gradient images as 8-bit PNGs and as 16-bit PNGs."""
    a, b = tmp_path / "8bit", tmp_path / "16bit"
    a.mkdir()
    b.mkdir()
    for k in range(5):
        g = np.roll(GRADIENT, 3 * k, axis=1)
        Image.fromarray(g).save(a / f"{k}.png")
        Image.fromarray(g.astype(np.uint16) * 257).save(b / f"{k}.png")
    return a, b


def test_fid_of_16_bit_images_against_their_8_bit_stats_is_zero(tmp_path):
    from test_fid import _standin

    from uvit_cli.fid.features import folder_stats
    from uvit_cli.fid.images import list_images

    a, b = _grey_folders(tmp_path)
    fn, dev = _standin(), torch.device("cpu")
    sa, _ = folder_stats(list_images(a), fn, "clean", dev, batch_size=5, dim=16)
    sb, _ = folder_stats(list_images(b), fn, "clean", dev, batch_size=5, dim=16)
    for x, y in zip(sa.mu_sigma(), sb.mu_sigma(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_prepare_stores_16_bit_images_as_their_8_bit_pixels(tmp_path):
    from uvit_cli.data import FeatureDataset
    from uvit_cli.prepare import prepare_folder

    a, b = _grey_folders(tmp_path)
    kw = dict(space="pixel", resolution=16, crop="lanczos", labels="none", num_workers=0)
    prepare_folder(a, tmp_path, name="pa", **kw)
    r = prepare_folder(b, tmp_path, name="pb", **kw)
    assert r.manifest["splits"]["train"]["skipped"] == []
    da, db = FeatureDataset(tmp_path / "pa"), FeatureDataset(tmp_path / "pb")
    assert len(da) == len(db) == 5
    for i in range(5):
        assert torch.equal(da[i]["x"], db[i]["x"])
    assert db[0]["x"].min() < -0.8 and db[0]["x"].max() > 0.8  # the gradient, not a white frame
