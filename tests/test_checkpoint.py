"""Checkpoints: safetensors round trip with the embedded preset, official .pth import, mismatch messages,
run-directory lookup, atomic whole-checkpoint writes and pruning."""

from __future__ import annotations

import pytest
import torch

from uvit_cli import checkpoint as ck
from uvit_cli.config import load_preset, preset_from_dict
from uvit_cli.errors import CheckpointError
from uvit_cli.model import UViT


def tiny_preset(**model):
    m = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    m.update(model)
    return preset_from_dict(
        {
            "name": "tiny",
            "model": m,
            "data": {"kind": "shapes", "path": "nowhere", "space": "pixel", "resolution": 8},
            "train": {"steps": 10, "batch_size": 4, "lr": 1e-3},
        }
    )


def test_weights_round_trip_with_metadata(tmp_path):
    preset = tiny_preset()
    model = UViT(**preset.model.model_dump())
    path = ck.save_weights(tmp_path / "ema.safetensors", model.state_dict(), preset, 123, "ema")
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    sd, embedded, meta = ck.load_weights(path)
    assert embedded == preset
    assert meta["format"] == "uvit" and meta["step"] == "123" and meta["weights"] == "ema"
    assert "uvit_version" in meta
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)

    loaded, p2, info = ck.load_model(path)
    assert p2 == preset and info.step == 123 and info.weights == "ema" and len(info.sha256) == 64
    assert info.step == 123
    assert not loaded.training
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 4])
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))


def test_official_pth_loads_with_a_preset(tmp_path):
    preset = tiny_preset()
    model = UViT(**preset.model.model_dump())
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    sd, embedded, meta = ck.load_weights(tmp_path / "nnet_ema.pth")
    assert embedded is None and meta["weights"] == "ema"
    with pytest.raises(CheckpointError, match="carries no preset and fits none"):
        ck.load_model(tmp_path / "nnet_ema.pth")  # no packaged preset has this architecture
    loaded, _, info = ck.load_model(tmp_path / "nnet_ema.pth", preset=preset)
    assert info.format == "official" and info.step is None
    assert torch.equal(loaded.pos_embed, model.pos_embed)


def test_official_pth_without_a_preset_is_recognised_by_its_shapes(tmp_path):
    shapes = load_preset("shapes_uvit_tiny")
    model = UViT(**shapes.model.model_dump())
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    loaded, resolved, info = ck.load_model(tmp_path / "nnet_ema.pth")
    assert resolved == shapes and info.format == "official"
    assert torch.equal(loaded.pos_embed, model.pos_embed)


@pytest.mark.parametrize(
    "name", ["coco_uvit_s2", "coco_uvit_s2_deep", "imagenet256_uvit_l2", "imagenet512_uvit_l4"]
)
def test_each_paper_architecture_is_recognised_as_its_own_preset(name):
    # Neighbours differ by one number (depth 12 vs 16; patch 2 at 32 vs patch 4 at 64): shapes only, on meta.
    with torch.device("meta"):
        sd = UViT(**load_preset(name).model.model_dump()).state_dict()
    assert ck.recognise_preset(sd, name).name == name
    del sd["norm.bias"]
    with pytest.raises(CheckpointError, match="fits none"):
        ck.recognise_preset(sd, name)


def test_mismatch_names_the_keys_on_one_line(tmp_path):
    preset = tiny_preset()
    model = UViT(**tiny_preset(embed_dim=64, conv=False).model.model_dump())
    torch.save(model.state_dict(), tmp_path / "nnet.pth")
    with pytest.raises(CheckpointError) as e:
        ck.load_model(tmp_path / "nnet.pth", preset=preset)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing final_layer.weight" in msg and "shape mismatch pos_embed" in msg


def test_unreadable_files_are_checkpoint_errors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.load_weights(bad)
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="cannot read"):
        ck.load_weights(pth)
    with pytest.raises(CheckpointError, match="no such"):
        ck.find_checkpoint(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ck.find_checkpoint(tmp_path / "empty_run")


def _save(run, step, preset, keep=2):
    sd = UViT(**preset.model.model_dump()).state_dict()
    return ck.save_checkpoint(
        run,
        step,
        model=sd,
        ema=sd,
        state={"step": step, "rng": [torch.get_rng_state()]},
        preset=preset,
        keep_last=keep,
    )


def test_run_dir_lookup_latest_and_pruning(tmp_path):
    preset = tiny_preset()
    run = tmp_path / "run"
    for s in (5, 10, 15):
        _save(run, s, preset)
    assert [s for s, _ in ck.list_checkpoints(run)] == [10, 15]
    assert (run / "ckpts" / "latest").read_text().strip() == "00000015"
    assert ck.find_checkpoint(run) == run / "ckpts" / "00000015" / "ema.safetensors"
    assert ck.find_checkpoint(run, ema=False) == run / "ckpts" / "00000015" / "model.safetensors"
    assert ck.find_checkpoint(run / "ckpts" / "00000010").name == "ema.safetensors"
    _, _, info = ck.load_model(run)
    assert info.step == 15
    model, ema, state = ck.read_checkpoint(run / "ckpts" / "00000015")
    assert state["step"] == 15 and set(model) == set(ema)
    # A stale pointer (its directory gone) falls back to the highest complete step.
    (run / "ckpts" / "latest").write_text("00000099\n")
    assert ck.latest_checkpoint(run) == run / "ckpts" / "00000015"
    # Temporaries of a killed writer are never taken for checkpoints.
    (run / "ckpts" / ".tmp-00000020-1").mkdir()
    assert [s for s, _ in ck.list_checkpoints(run)] == [10, 15]


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    preset = tiny_preset()
    run = tmp_path / "run"
    _save(run, 5, preset)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_state", boom)
    with pytest.raises(OSError):
        _save(run, 10, preset)
    assert [s for s, _ in ck.list_checkpoints(run)] == [5]
    assert ck.latest_checkpoint(run).name == "00000005"
    assert not list((run / "ckpts").glob(".tmp-*"))
