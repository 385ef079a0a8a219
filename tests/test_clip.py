"""CLIP text encoder: parity with transformers CLIPTextModel on tiny seeded weights, every key layout."""

from __future__ import annotations

import json

import pytest
import torch
from encoder_fixtures import randomize_, save_text_encoder, tiny_text_encoder, write_tokenizer_files
from safetensors.torch import load_file, save_file

from uvit_cli.encoders import CLIPTextEncoder, load_text_encoder
from uvit_cli.errors import CheckpointError

TOL = 1e-5  # issue 3: CLIP parity tolerance (measured 0 against transformers 5.24)
CAPTIONS = [
    "A green train is coming down the tracks.",
    "A group of skiers are preparing to ski down a mountain.",
    "A small kitchen with low a ceiling",
    "",
    "Tom &amp; Jerry café — “quoted” 東京 🙂",
    "a man " * 60,  # > 77 tokens
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("UVIT_OFFLINE", "1")
    monkeypatch.delenv("UVIT_CLIP", raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny transformers CLIPTextModel saved by transformers itself (the v5 unprefixed layout)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    ref = randomize_(transformers.CLIPTextModel(cfg), 11).eval()
    folder = tmp_path_factory.mktemp("clip_t5")
    ref.save_pretrained(folder)
    write_tokenizer_files(folder)
    return ref, folder


def _max_diff(ours: CLIPTextEncoder, ref) -> float:
    batch = ours.tokenizer(CAPTIONS)
    assert batch.truncated == [False] * 5 + [True]
    with torch.no_grad():
        want = ref(input_ids=batch.input_ids).last_hidden_state  # no attention_mask, as U-ViT
        got = ours.encode(CAPTIONS)
    assert got.dtype == torch.float32 and got.shape == (len(CAPTIONS), 77, 32)
    return (got - want).abs().max().item()


def test_real_config_size():
    with torch.device("meta"):
        sd = CLIPTextEncoder().state_dict()
    assert len(sd) == 196 and sum(v.numel() for v in sd.values()) == 123_060_480
    assert sd["embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)


def test_transformers5_unprefixed_layout(reference):
    ref, folder = reference
    assert not any(k.startswith("text_model.") for k in load_file(str(folder / "model.safetensors")))
    ours = load_text_encoder(str(folder))
    assert ours.config.num_attention_heads == 2  # from config.json
    assert _max_diff(ours, ref) <= TOL


def test_prefixed_clipmodel_layout_ignores_vision_and_position_ids(reference, tmp_path):
    ref, folder = reference
    sd = {f"text_model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    sd["text_model.embeddings.position_ids"] = torch.full(
        (1, 77), 3.7
    )  # float-corrupted, as in merged SD files
    sd["vision_model.embeddings.class_embedding"] = torch.zeros(16)
    sd["visual_projection.weight"] = torch.zeros(8, 16)
    sd["text_projection.weight"] = torch.zeros(8, 32)
    sd["logit_scale"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "model.safetensors"))
    text_cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "text_config_dict": text_cfg}))
    assert _max_diff(load_text_encoder(str(tmp_path)), ref) <= TOL


def test_bin_and_sd_checkpoint_prefixes(reference, tmp_path):
    ref, folder = reference
    sd = load_file(str(folder / "model.safetensors"))
    torch.save({f"text_model.{k}": v for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert _max_diff(load_text_encoder(str(tmp_path)), ref) <= TOL
    ckpt = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in sd.items()}
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    ckpt["model.diffusion_model.out.2.bias"] = torch.zeros(1)
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    torch.save({"state_dict": ckpt}, sd_dir / "v1-5.ckpt")
    (sd_dir / "config.json").write_text((folder / "config.json").read_text())
    assert _max_diff(load_text_encoder(str(sd_dir / "v1-5.ckpt")), ref) <= TOL


def test_fixture_writer_round_trip(tmp_path):
    clip = tiny_text_encoder(seed=2)
    ids = clip.tokenizer(CAPTIONS).input_ids
    with torch.no_grad():
        want = clip(ids)
        for layout, fmt in [
            ("text_model", "safetensors"),
            ("unprefixed", "bin"),
            ("clipmodel", "safetensors"),
        ]:
            d = save_text_encoder(clip, tmp_path / f"{layout}_{fmt}", layout=layout, fmt=fmt)
            loaded = load_text_encoder(str(d))
            assert torch.equal(loaded(ids), want), layout
            assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64


def test_pad_rows_depend_on_pad_id_but_not_earlier_rows():
    clip = tiny_text_encoder(seed=1)
    ids = clip.tokenizer(["a cat"]).input_ids  # [BOS, a, cat, EOS, pad...]
    other = ids.clone()
    other[0, 4:] = 0
    with torch.no_grad():
        a, b = clip(ids), clip(other)
    assert torch.equal(a[0, :4], b[0, :4])  # causal: up to EOS unaffected by padding
    assert (a[0, 4:] - b[0, 4:]).abs().max() > 1e-3  # so padding with 49407 matters


def test_heads_default_without_config_and_mismatch_error(tmp_path):
    clip = tiny_text_encoder(hidden_size=128, num_attention_heads=2)
    d = save_text_encoder(clip, tmp_path / "noconf", config=False, tokenizer=False)
    assert load_text_encoder(str(d)).config.num_attention_heads == 2  # hidden/64, as ViT-L/14
    sd = load_file(str(d / "model.safetensors"))
    del sd["text_model.final_layer_norm.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        load_text_encoder(str(d))
