"""CLIP text encoder: parity with transformers CLIPTextModel on tiny seeded weights, every key layout."""

from __future__ import annotations

import json

import pytest
import torch
from encoder_fixtures import (
    TINY_TEXT_HF,
    randomize_,
    save_text_encoder,
    tiny_text_encoder,
    write_tokenizer_files,
)
from safetensors.torch import load_file, save_file

from uvit_cli.encoders import CLIPTextEncoder, load_text_encoder
from uvit_cli.errors import CheckpointError

TOL = 1e-5  # CLIP parity tolerance (measured ~2e-6 against transformers 5.24's SDPA; 0 against 4.23.1)
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
    ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT_HF)), 11).eval()
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


def test_attention_is_the_transformers_4_23_formula_bit_for_bit():
    clip = tiny_text_encoder(seed=4, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    attn = clip.encoder.layers[0].self_attn
    x = torch.randn(3, 77, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # transformers 4.23.1 CLIPAttention (U-ViT's pin): (q * scale) k^T + a finfo.min upper mask, per head.
        def heads(t):
            return t.view(3, 77, 4, 16).transpose(1, 2).reshape(12, 77, 16)

        q, k, v = heads(attn.q_proj(x) * 16**-0.5), heads(attn.k_proj(x)), heads(attn.v_proj(x))
        mask = torch.full((77, 77), torch.finfo(torch.float32).min).triu_(1)
        w = (torch.bmm(q, k.transpose(1, 2)).view(3, 4, 77, 77) + mask).view(12, 77, 77).softmax(-1)
        ref = attn.out_proj(torch.bmm(w, v).view(3, 4, 77, 16).transpose(1, 2).reshape(3, 77, 64))
        assert torch.equal(attn(x), ref)  # SDPA differs from this math by ~2e-6


# Numbers produced by U-ViT's `libs/clip.py` FrozenCLIPEmbedder(device="cpu") under transformers 4.23.1 (the
# repo's pin; slow CLIPTokenizer + ftfy 6.3.1) loading `tiny_text_encoder(seed=11, hidden_size=64,
# num_attention_heads=4, intermediate_size=128)` saved by save_text_encoder(layout="text_model", fmt="bin"),
# torch 2.14 CPU fp32. Our encoder gave bit-identical outputs in that run. Across CPU kernels
# `.ci/cpu-variation` measured at most 8.7e-7 on elements, 4.9e-5 on the sums, 7.4e-9 relative on the |sums|.
OFFICIAL_TEXTS = ["a photo of a cat", "", "a man " * 60]
OFFICIAL_E_0_3 = [-0.442225, -1.25486, -0.630736, -1.796611]
OFFICIAL_E_1_76 = [0.236025, -0.26558, -1.310269, -0.238806]  # a pad row of the empty context
OFFICIAL_E_2_76 = [0.890386, -0.782258, 0.248837, 0.422818]  # the EOS kept at 76 after truncation
OFFICIAL_SUMS = [-66.43143975765997, -81.22454655839829, -28.573914852910093]
OFFICIAL_ABS_SUMS = [3853.5420705828947, 3878.111439148488, 3984.6317059964786]


def test_matches_numbers_from_the_official_clip_embedder():
    clip = tiny_text_encoder(seed=11, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    e = clip.encode(OFFICIAL_TEXTS)
    assert e.shape == (3, 77, 64)
    assert e[0, 3, :4].tolist() == pytest.approx(OFFICIAL_E_0_3, abs=2e-5)
    assert e[1, 76, :4].tolist() == pytest.approx(OFFICIAL_E_1_76, abs=2e-5)
    assert e[2, 76, :4].tolist() == pytest.approx(OFFICIAL_E_2_76, abs=2e-5)
    for i in range(3):
        assert e[i].double().sum().item() == pytest.approx(OFFICIAL_SUMS[i], abs=1e-3)
        assert e[i].double().abs().sum().item() == pytest.approx(OFFICIAL_ABS_SUMS[i], rel=1e-6)
    # one caption at a time gives the same rows as the batch (no cross-row padding or masking);
    # not bit-exact: under AVX2 kernels the GEMM blocking depends on the batch size (1.2e-6 measured)
    torch.testing.assert_close(torch.cat([clip.encode([t]) for t in OFFICIAL_TEXTS]), e, rtol=0, atol=2e-5)
