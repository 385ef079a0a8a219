"""The captioned-shapes set: determinism, the fidelity analysis on the renderer's own images, the toy
text encoder, and the shards that `uvit prepare shapes` writes."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from uvit_cli.config import load_preset
from uvit_cli.data import FeatureDataset, read_manifest
from uvit_cli.errors import DataError
from uvit_cli.shapes import analyze, render, text
from uvit_cli.shapes.prepare import prepare_shapes


def test_scenes_are_deterministic_and_splits_independent():
    a = render.sample_scenes(50, seed=3)
    assert a == render.sample_scenes(50, seed=3)
    assert a != render.sample_scenes(50, seed=4)
    assert a != render.sample_scenes(50, seed=3, split="val")
    assert render.sample_scenes(20, seed=3) == a[:20]  # a prefix: n does not change earlier scenes
    np.testing.assert_array_equal(render.render_many(a[:5], 16), render.render_many(a[:5], 16))


def test_every_attribute_value_appears():
    scenes = render.sample_scenes(400)
    assert {s.colour for s in scenes} == set(render.COLOURS)
    assert {s.shape for s in scenes} == set(render.SHAPES)
    assert {s.position for s in scenes} == set(render.POSITIONS)
    assert {s.size for s in scenes} == set(render.SIZES)


def test_render_layout_and_background():
    s = render.Scene("red", "square", "top left", "big")
    img = render.render(s, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[-1, -1]) == render.BACKGROUND  # bottom right corner is background
    assert tuple(img[9, 9]) == render.COLOURS["red"]  # inside the top-left square
    assert render.render_many([s], 16).shape == (1, 3, 16, 16)


def test_captions_name_the_attributes():
    s = render.Scene("blue", "triangle", "middle", "small")
    assert s.captions() == ["a small blue triangle in the middle", "the small blue triangle in the middle"]
    assert render.parse_prompt("a big Yellow circle at the top right") == render.Request(
        "yellow", "circle", "top right", "big"
    )
    assert render.parse_prompt("a red square in the middle").position == "middle"
    assert render.parse_prompt("something else") == render.Request(None, None, None, None)


@pytest.mark.parametrize("resolution", [16, 24, 32])
def test_analysis_reads_the_renderers_held_out_images(resolution):
    scenes = render.sample_scenes(600, seed=1, split="val")
    images = render.render_many(scenes, resolution)
    f = analyze.fidelity(images, [s.caption() for s in scenes])
    assert (f.colour, f.shape, f.position, f.size, f.all) == (1.0, 1.0, 1.0, 1.0, 1.0), f


@pytest.mark.parametrize("shape", render.SHAPES)
def test_position_and_size_are_read_at_the_extremes_of_the_jitter(shape):
    j = render.JITTER
    for position in render.POSITIONS:
        for size in render.SIZES:
            for dx, dy in ((-j, -j), (j, j), (-j, j), (j, -j)):
                scene = render.Scene("green", shape, position, size, dx, dy)
                r = analyze.read_image(render.render(scene, 16))
                assert (r.shape, r.position, r.size) == (shape, position, size), (scene, r)
    # a wrong request scores zero on that attribute only
    img = render.render(render.Scene("red", shape, "top left", "small"), 16)
    f = analyze.fidelity([img], [f"a big red {shape} at the bottom right"])
    assert (f.colour, f.shape, f.position, f.size, f.all) == (1.0, 1.0, 0.0, 0.0, 0.0)


def test_analysis_rejects_blank_and_wrong_background():
    blank = np.broadcast_to(np.array(render.BACKGROUND, np.uint8), (16, 16, 3)).copy()
    r = analyze.read_image(blank)
    assert r.background_ok and r.colour is None and r.shape is None
    img = render.render(render.Scene("green", "circle", "middle", "small"), 16)
    grey = img.copy()
    grey[(img == render.BACKGROUND).all(-1)] = 128
    assert analyze.read_image(img).background_ok
    assert not analyze.read_image(grey).background_ok
    assert analyze.read_image(img).shape == "circle"
    f = analyze.fidelity([img, grey], ["a green circle"] * 2)
    assert f.colour == 0.5  # the right colour on a wrong background does not count
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert analyze.fidelity([noise], ["a red square"]).all == 0.0


def test_word_tokenizer_is_clip_shaped():
    tok = text.WordTokenizer()
    ids = tok.encode("A red circle, at the top left")
    assert len(ids) == text.CONTEXT_LENGTH
    assert ids[0] == tok.ids[text.BOS] and ids[8] == tok.ids[text.EOS] and ids[-1] == tok.ids[text.EOS]
    assert tok([""]).input_ids.tolist() == [[0] + [1] * (text.CONTEXT_LENGTH - 1)]
    with pytest.raises(DataError, match="does not know purple"):
        tok.encode("a purple circle")
    # every caption the set can produce fits
    for s in render.sample_scenes(200):
        for c in s.captions():
            tok.encode(c)


def test_toy_encoder_is_seeded_frozen_and_separates_words():
    state = torch.get_rng_state()
    a, b = text.toy_text_encoder(), text.toy_text_encoder()
    assert torch.equal(state, torch.get_rng_state())  # building it leaves the caller's RNG alone
    assert a.weights_sha256 == b.weights_sha256 != text.toy_text_encoder(seed=1).weights_sha256
    assert not any(p.requires_grad for p in a.parameters())
    caps = ["a red circle at the top left", "a blue circle at the top left", "a red square at the top left"]
    fa = a.encode(caps)
    assert fa.shape == (3, text.CONTEXT_LENGTH, text.WIDTH) and fa.dtype == torch.float32
    torch.testing.assert_close(fa, b.encode(caps))
    # causal: tokens before the word that differs are equal, the ones from it on differ
    assert torch.allclose(fa[0, :2], fa[1, :2]) and not torch.allclose(fa[0, 2], fa[1, 2], atol=1e-3)
    assert not torch.allclose(fa[0, 3], fa[2, 3], atol=1e-3)


def test_prepare_writes_shards_that_the_trainer_reads(tmp_path):
    out = tmp_path / "shapes"
    r = prepare_shapes(out, n=130, n_val=20, resolution=16, items_per_shard=64)
    assert r.written == {"train": 3, "val": 1}
    m = read_manifest(out)
    assert m["kind"] == "shapes" and m["space"] == "pixel" and m["conditioning"] == "text"
    assert m["context_shape"] == [text.CONTEXT_LENGTH, text.WIDTH]
    assert m["encoders"]["text"]["kind"] == "toy"
    ds = FeatureDataset(out)
    assert len(ds) == 130 and len(FeatureDataset(out, "val")) == 20
    item = ds[5]
    assert item["x"].shape == (3, 16, 16) and item["x"].min() >= -1 and item["x"].max() <= 1
    assert item["context"].shape == (text.CONTEXT_LENGTH, text.WIDTH)
    scene = render.sample_scenes(130)[5]
    assert ds.captions(5) == scene.captions()
    expect = torch.from_numpy(render.render(scene, 16).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(item["x"], expect)
    enc = text.toy_text_encoder()
    k = ds.caption_index(5)
    torch.testing.assert_close(item["context"], enc.encode([scene.captions()[k]])[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ds.empty_context, enc.encode([""])[0])

    # the packaged preset fits this data
    from uvit_cli.train.rundir import check_data_fits

    check_data_fits(load_preset("shapes_uvit_tiny", [f"data.path={out}"]), ds)

    # rerun: reused; other settings into the same folder: refused
    again = prepare_shapes(out, n=130, n_val=20, resolution=16, items_per_shard=64)
    assert again.written == {"train": 0, "val": 0} and again.reused == {"train": 3, "val": 1}
    with pytest.raises(DataError, match="other settings"):
        prepare_shapes(out, n=130, n_val=20, resolution=32, items_per_shard=64)


def test_prepare_shapes_cli(tmp_path):
    from uvit_cli.cli import app

    out = tmp_path / "shapes"
    res = CliRunner().invoke(app, ["prepare", "shapes", "--out", str(out), "--n", "40", "--resolution", "16"])
    assert res.exit_code == 0, res.output
    assert "train: 40 items in 1 shard, 80 captions" in res.output
    assert len(FeatureDataset(out, "val")) == 4
    res = CliRunner().invoke(app, ["prepare", "shapes", "--out", str(out), "--n", "41"])
    assert res.exit_code == 2 and "other settings" in res.output


def test_prepare_shapes_by_default_writes_what_the_quickstart_preset_trains_on(tmp_path):
    from uvit_cli.cli import app
    from uvit_cli.train.rundir import check_data_fits

    res = CliRunner().invoke(app, ["prepare", "shapes", "--out", str(tmp_path), "--n", "20"])
    assert res.exit_code == 0, res.output
    preset = load_preset("shapes_uvit_tiny")
    assert read_manifest(tmp_path / "shapes")["settings"]["resolution"] == preset.data.resolution
    check_data_fits(preset, FeatureDataset(tmp_path / "shapes", "train"))  # raises when they do not fit
