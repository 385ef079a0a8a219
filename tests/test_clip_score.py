"""CLIP score's network and preprocessing: parity with transformers' CLIPModel + CLIPImageProcessor (PIL) on a
tiny seeded model in the real file format, the score's definition, batching, and loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from encoder_fixtures import (
    TINY_TEXT_HF,
    randomize_,
    save_clip_model,
    save_text_encoder,
    tiny_clip_model,
    tiny_text_encoder,
    write_tokenizer_files,
)
from PIL import Image

from uvit_cli.encoders import CLIPModel, load_clip_model, load_text_encoder
from uvit_cli.encoders.clip_score import (
    ClipScoreSum,
    clip_preprocess,
    clip_preprocess_image,
    clip_score,
    scores_from_embeddings,
)
from uvit_cli.errors import CheckpointError, DataError, WeightsNotFoundError

TOL = 1e-5
PROMPTS = [
    "A green train is coming down the tracks.",
    "A group of skiers are preparing to ski down a mountain.",
    "a small kitchen with a low ceiling",
    "two dogs playing in the snow",
    "a plate of food on a wooden table",
    "a red bus parked next to a building",
    "a man " * 60,  # > 77 tokens: truncated, the end token kept
    "a cat",
]
SIZES = [
    (300, 200),
    (97, 250),
    (224, 224),
    (256, 256),
    (225, 500),
    (640, 479),
    (500, 225),
    (250, 97),
]  # (W, H)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("UVIT_OFFLINE", "1")
    monkeypatch.delenv("UVIT_CLIP", raising=False)


def _images(sizes=SIZES, seed=0) -> list[Image.Image]:
    """Smooth seeded colour fields (so bicubic resizing matters) with noise, as uint8 RGB PIL images."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(7 * xx + c) * np.cos(5 * yy - c) for c in rng.uniform(0, 3, 3)], axis=-1)
        px = 127.5 + 100 * base + rng.normal(0, 20, (h, w, 3))
        out.append(Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)))
    return out


def _processor():
    """transformers' CLIPImageProcessor through PIL: `CLIPImageProcessorPil` in v5, `CLIPImageProcessor` in v4."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls()  # the defaults are openai/clip-vit-large-patch14's preprocessor_config.json


def _vision_hf(**sizes: int) -> dict:
    """transformers' CLIPVisionConfig arguments: these sizes at CLIP ViT-L/14's input and activation."""
    return dict(sizes, image_size=224, patch_size=14, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny transformers CLIPModel, seeded, saved by transformers itself; and the folder."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        # eos_token_id 2 as the hub's config.json: transformers pools at input_ids.argmax
        text_config=dict(TINY_TEXT_HF, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=_vision_hf(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
        ),
        projection_dim=24,
    )
    ref = randomize_(transformers.CLIPModel(cfg), 23).eval()  # 5 of the 8 pairs score above 0
    folder = tmp_path_factory.mktemp("clipmodel")
    ref.save_pretrained(folder)
    write_tokenizer_files(folder)
    return ref, folder


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5


def test_real_size_keys_and_shapes_equal_transformers_clipmodel():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(  # openai/clip-vit-large-patch14's config.json
        text_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        ),
        vision_config=_vision_hf(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
        ),
        projection_dim=768,
    )
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in CLIPModel().state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in transformers.CLIPModel(cfg).state_dict().items()}
    ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
    assert ours == ref
    assert len(ours) == 590 and sum(int(np.prod(s)) for s in ours.values()) == 427_616_513


def test_preprocessing_equals_the_processors_pixel_values():
    images = _images() + [_images([(120, 333)], seed=3)[0].convert("L")]  # grey: converted to RGB first
    want = torch.as_tensor(np.asarray(_processor()(images=images, return_tensors="np")["pixel_values"]))
    got = clip_preprocess(images)
    assert got.dtype == torch.float32 and got.shape == (len(images), 3, 224, 224)
    assert (got - want).abs().max().item() <= 1e-6
    # the same pixels given as uint8 arrays (H, W, 3) and as a uint8 tensor (B, 3, H, W)
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    assert torch.equal(clip_preprocess(arrays), got)
    same = np.stack([np.asarray(im) for im in _images([(97, 250)] * 2, seed=5)])
    assert torch.equal(clip_preprocess(torch.from_numpy(same).permute(0, 3, 1, 2)), clip_preprocess(same))


def test_preprocessing_resamples_bicubic_from_the_shorter_side():
    im = _images([(97, 250)])[0]
    x = clip_preprocess_image(im)
    # bicubic resize of 97x250 to 224x577 (floor of 224 * 250 / 97), crop rows 176..399
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    for resample, equal in ((Image.Resampling.BICUBIC, True), (Image.Resampling.BILINEAR, False)):
        crop = np.asarray(im.resize((224, 577), resample))[176:400] / 255.0
        assert np.allclose(x, ((crop - mean) / std).transpose(2, 0, 1), atol=1e-5) is equal


def test_embeddings_match_transformers(reference):
    ref, folder = reference
    ours = load_clip_model(str(folder))
    assert ours.vision_model.config.num_attention_heads == 4  # from config.json (48 / 64 would give 1)
    pixels = clip_preprocess(_images())
    ids = ours.tokenizer(PROMPTS).input_ids
    with torch.no_grad():
        want_img = _features(ref.get_image_features(pixel_values=pixels))
        want_txt = _features(ref.get_text_features(input_ids=ids))
        got_img, got_txt = ours.image_embeds(pixels), ours.text_embeds(ids)
    assert got_img.shape == (8, 24) and got_txt.shape == (8, 24)
    assert (got_img - want_img).abs().max().item() <= TOL
    assert (got_txt - want_txt).abs().max().item() <= TOL
    # zeros after the end token change nothing (causal attention, pooled at the end token)
    padded = ids.clone()
    for row, eos in enumerate(ids.argmax(-1).tolist()):
        padded[row, eos + 1 :] = 0
    assert (padded == 0).sum() > 400
    with torch.no_grad():
        torch.testing.assert_close(ours.text_embeds(padded), got_txt, rtol=0, atol=1e-6)


# Our towers' op order: the text tower is transformers' eager attention (as transformers 4.23.1, U-ViT's pin),
# the vision tower SDPA; that pairing gives bit-identical embeddings. transformers 5's default (SDPA in both)
# moves text embeddings by ~3e-7 relative, which is ~1.5e-5 on a score of 25.
OUR_ORDER = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}


@pytest.mark.parametrize(("attention", "batch_size", "tol"), [(OUR_ORDER, 8, TOL), ("sdpa", 3, 5 * TOL)])
def test_clip_score_matches_transformers_pipeline(reference, attention, batch_size, tol):
    """Reference: CLIPImageProcessor (PIL) + transformers' CLIPTokenizer (truncation, padding and attention
    mask as torchmetrics' CLIPScore calls it) + CLIPModel's normalised embeddings, then 100 · max(cos, 0).

    The score is 100 · cos: 1e-5 on it is 1e-7 on the cosine, float32's own rounding, so this holds only for
    the same op order (2e-6 measured, all of it the reference's float32 normalisation and dot product)."""
    transformers = pytest.importorskip("transformers")
    _, folder = reference
    ref = transformers.CLIPModel.from_pretrained(folder, attn_implementation=attention).eval()
    images = _images()
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    batch = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = ref(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=torch.as_tensor(np.asarray(_processor()(images=images)["pixel_values"])),
        )
    want = (100 * (out.image_embeds * out.text_embeds).sum(-1)).clamp(min=0).double()  # embeds normalised
    got = clip_score(images, PROMPTS, load_clip_model(str(folder)), batch_size=batch_size)
    assert got.shape == (8,) and got.dtype == torch.float64
    assert (got - want).abs().max().item() <= tol
    assert (got == 0).sum() == 3 and (got > 5).sum() == 5  # the clamp acts on this set, both ways


def test_score_definition():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[6.0, 8.0], [-1.0, 0.0], [1.0, 1.0]])
    got = scores_from_embeddings(img, txt)
    assert got.tolist() == pytest.approx([100.0, 0.0, 100 / 2**0.5])  # scale-free, clamped at 0, w = 100


def test_batches_and_sums_give_the_same_scores():
    model = tiny_clip_model(seed=1)
    images = _images(seed=1)
    whole = clip_score(images, PROMPTS, model, batch_size=8)
    assert (whole > 5).sum() == 5 and (whole == 0).sum() == 3
    for bs in (1, 3, 5):
        # each score depends on its own image and prompt only; GEMM blocking may change the last bits
        torch.testing.assert_close(
            clip_score(images, PROMPTS, model, batch_size=bs), whole, rtol=0, atol=1e-4
        )
    a, b = ClipScoreSum(), ClipScoreSum()
    a.add(whole[:5])
    b.add(whole[5:])
    total = a + b
    assert total.count == 8 and total.mean == pytest.approx(whole.double().mean().item(), rel=1e-12)
    assert a.across_ranks() == a  # one process: itself
    with pytest.raises(DataError, match="no images"):
        _ = ClipScoreSum().mean
    with pytest.raises(DataError, match="8 images but 7 prompts"):
        clip_score(images, PROMPTS[:7], model)
    with pytest.raises(DataError, match="uint8"):
        clip_score(np.zeros((2, 8, 8, 3), np.float32), PROMPTS[:2], model)


def test_fixture_writer_round_trip_and_config_free_sizes(tmp_path):
    model = tiny_clip_model(seed=4, hidden_size=128, num_attention_heads=2, intermediate_size=64)
    pixels = clip_preprocess(_images(SIZES[:3]))
    ids = model.tokenizer(PROMPTS[:3]).input_ids
    with torch.no_grad():
        want = model.image_embeds(pixels), model.text_embeds(ids)
    for fmt in ("safetensors", "bin"):  # with position_ids buffers, as transformers 4 wrote the hub files
        loaded = load_clip_model(str(save_clip_model(model, tmp_path / fmt, fmt=fmt)))
        with torch.no_grad():
            assert torch.equal(loaded.image_embeds(pixels), want[0]) and torch.equal(
                loaded.text_embeds(ids), want[1]
            )
        assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64 and not loaded.training
    bare = load_clip_model(str(save_clip_model(model, tmp_path / "bare", config=False, tokenizer=False)))
    assert bare.vision_model.config.num_attention_heads == 2  # hidden / 64, as ViT-L/14 (1024 / 64 = 16)
    assert bare.vision_model.config.image_size == 224 and bare.visual_projection.out_features == 24


def test_text_encoder_clipmodel_folder_serves_both(tmp_path):
    text = tiny_text_encoder(seed=2)
    d = save_text_encoder(text, tmp_path / "clip", layout="clipmodel")
    ids = text.tokenizer(PROMPTS).input_ids
    with torch.no_grad():
        assert torch.equal(load_text_encoder(str(d))(ids), text(ids))
        assert torch.equal(load_clip_model(str(d)).text_model(ids), text(ids))


def test_text_only_weights_are_one_clear_line(tmp_path, monkeypatch):
    d = save_text_encoder(tiny_text_encoder(seed=1), tmp_path / "text_only", layout="text_model")
    monkeypatch.setenv("UVIT_CLIP", str(d))  # the same variable as the text encoder
    with pytest.raises(CheckpointError) as e:
        load_clip_model(None)
    msg = str(e.value)
    assert "\n" not in msg and str(d / "model.safetensors") in msg
    assert "full CLIPModel" in msg and "openai/clip-vit-large-patch14" in msg
    # an SD pipeline folder has only text_encoder/: not looked into for CLIP score
    save_text_encoder(tiny_text_encoder(seed=1), tmp_path / "sd" / "text_encoder", layout="text_model")
    with pytest.raises(WeightsNotFoundError, match="CLIP model"):
        load_clip_model(str(tmp_path / "sd"))
