"""Presets: every packaged preset validates, builds the spec's model, and bad input is one clear line."""

import pytest
import torch

from uvit_cli import config
from uvit_cli.config import load_preset, parse_override
from uvit_cli.errors import ConfigError
from uvit_cli.model import UViT

# spec §2: parameter counts [verified against the official code]
PAPER_PRESETS = {
    "cifar10_uvit_s2": 44_255_328,
    "celeba64_uvit_s4": 44_292_228,
    "imagenet64_uvit_m4": 130_940_292,
    "imagenet64_uvit_l4": 286_827_652,
    "imagenet256_uvit_l2": 286_763_172,
    "imagenet256_uvit_h2": 500_832_016,
    "imagenet512_uvit_l4": 286_861_524,
    "imagenet512_uvit_h4": 500_942_656,
    "coco_uvit_s2": 44_692_644,
    "coco_uvit_s2_deep": 58_345_636,
}


def test_all_paper_presets_are_packaged():
    assert set(PAPER_PRESETS) <= set(config.list_presets())


@pytest.mark.parametrize("name", config.list_presets())
def test_every_packaged_preset_validates(name):
    p = load_preset(name)
    assert p.name == name
    assert p.data.resolution % p.model.img_size == 0 or p.data.space == "pixel"


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_preset_builds_model_of_spec_size(name):
    p = load_preset(name)
    with torch.device("meta"):
        model = UViT(**p.model.model_dump())
    assert model.num_params() == PAPER_PRESETS[name]


def test_spec_hyperparameters():
    coco = load_preset("coco_uvit_s2_deep")
    assert coco.train.betas == (0.9, 0.9) and coco.train.batch_size == 256 and coco.train.steps == 1_000_000
    assert coco.autoencoder.scale_factor == pytest.approx(0.23010)
    assert coco.sample.cfg_scale == 1.0 and coco.sample.n_samples == 30000 and coco.train.p_uncond == 0.1
    h2 = load_preset("imagenet256_uvit_h2")
    assert h2.model.conv is False and h2.model.num_classes == 1001 and h2.schedule.kind == "discrete"
    assert h2.autoencoder.pretrained == "autoencoder_kl_ema.pth" and h2.autoencoder.scale_factor == 0.18215
    assert h2.sample.cfg_scale == 0.4 and h2.train.p_uncond == 0.1
    l2 = load_preset("imagenet256_uvit_l2")
    assert l2.schedule.kind == "continuous" and l2.model.conv is True and l2.train.p_uncond == 0.15
    assert load_preset("imagenet512_uvit_h4").sample.cfg_scale == 0.7
    c10 = load_preset("cifar10_uvit_s2")
    assert c10.train.betas == (0.99, 0.999) and c10.train.warmup_steps == 2500 and c10.sample.steps == 1000


def test_overrides_take_precedence_and_are_typed():
    p = load_preset(
        "coco_uvit_s2", ["train.lr=1e-4", "model.depth=16", "sample.solver=ddim", "train.betas=[0.9, 0.99]"]
    )
    assert p.train.lr == 1e-4 and p.model.depth == 16 and p.sample.solver == "ddim"
    assert p.train.betas == (0.9, 0.99)


def test_parse_override_falls_back_to_string():
    assert parse_override("data.path=feats/x") == (["data", "path"], "feats/x")
    assert parse_override("train.compile=false") == (["train", "compile"], False)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.foo=1", "model.foo: unknown key"),
        ("model.depth=abc", "model.depth"),
        ("train.lr=-1", "train.lr"),
        ("model.patch_size=3", "not a multiple"),
        ("nonsense", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_are_one_line(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_preset("coco_uvit_s2", [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nimg_size = 32\n")
    with pytest.raises(ConfigError, match=r"bad.toml: .*Field required"):
        load_preset(f)
    f.write_text("[model\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_preset(f)
    with pytest.raises(ConfigError, match="not found"):
        load_preset(tmp_path / "missing.toml")


def test_toml_round_trip():
    p = load_preset("imagenet256_uvit_h2")
    assert config.preset_from_toml(p.to_toml()) == p
