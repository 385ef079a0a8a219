"""Presets: every packaged preset validates, builds the spec's model, and bad input is one clear line."""

from pathlib import Path

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
        model = UViT(**p.model)  # the [model] table unpacks straight into the constructor
    assert model.num_params() == PAPER_PRESETS[name]
    assert dict(**p.model) == p.model.model_dump()


@pytest.mark.parametrize("name", config.list_presets())
def test_the_prepare_default_writes_where_the_preset_reads(name):
    # `uvit prepare <kind> --out feats` then `uvit train <preset>` with no --set data.path
    d = load_preset(name).data
    assert config.set_dir(config.DATA_ROOT, config.dataset_name(d.kind, d.resolution)) == Path(d.path)
    assert d.prepare_command().endswith(f"--out {config.DATA_ROOT}")


def test_set_dir_is_the_root_unless_it_already_is_the_set(tmp_path):
    assert config.set_dir(tmp_path, "coco256") == tmp_path / "coco256"
    assert config.set_dir(tmp_path / "coco256", "coco256") == tmp_path / "coco256"  # --out feats/coco256
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.json").write_text("{}")
    assert config.set_dir(tmp_path / "mine", "coco256") == tmp_path / "mine"  # an existing set resumes
    assert config.dataset_name("folder", 64, tmp_path / "my_images") == "my_images64"
    assert config.dataset_name("imagenet64", 64) == "imagenet64"


def test_data_path_may_name_the_set_or_the_root_holding_it(tmp_path):
    def data(kind, path, resolution=256):
        return config.DataConfig(kind=kind, path=str(path), resolution=resolution)

    def prepared(d):
        d.mkdir(parents=True)
        (d / config.MANIFEST).write_text("{}")
        return d

    assert data("coco", tmp_path).set_path() == tmp_path  # nothing prepared: the path as given
    coco = prepared(tmp_path / "coco256")
    prepared(tmp_path / "imagenet64")
    assert data("coco", coco).set_path() == coco
    assert data("coco", tmp_path).set_path() == coco  # `--out ROOT` wrote ROOT/coco256
    assert data("imagenet64", tmp_path, 64).set_path() == tmp_path / "imagenet64"
    assert data("imagenet", tmp_path).set_path() == tmp_path  # no imagenet256 under it
    mine = prepared(tmp_path / "faces" / "my_images64")
    assert data("folder", tmp_path / "faces", 64).set_path() == mine  # a folder set: the only one there
    prepared(tmp_path / "faces" / "more64")
    assert data("folder", tmp_path / "faces", 64).set_path() == tmp_path / "faces"  # two: no guess


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


# The official configs (baofff/U-ViT configs/*.py @ce55170), one row per preset, transcribed value by value:
# n_steps, batch_size, lr, betas, weight_decay, warmup_steps, dataset p_uncond (0 without cfg), sample_steps,
# sample scale (0 without cfg), solver (algorithm; t2i/ldm_discrete scripts: DPM-Solver++), autoencoder
# scale_factor (ImageNet scripts pass only the path: libs/autoencoder's default 0.18215), random flip (cifar10:
# config; celeba: always; imagenet64: ImageDataset default True), then nnet: patch, embed_dim, depth, heads,
# conv, use_checkpoint. No config sets ema_rate (scripts: 0.9999), grad_clip or mlp_time_embed=True.
OFFICIAL_CONFIGS = {
    "cifar10_uvit_s2": (500_000, 128, 2e-4, (0.99, 0.999), 0.03, 2500, 0.0, 1000, 0.0, "euler_maruyama", None, True, 2, 512, 12, 8, True, False),
    "celeba64_uvit_s4": (500_000, 128, 2e-4, (0.99, 0.99), 0.03, 5000, 0.0, 1000, 0.0, "euler_maruyama", None, True, 4, 512, 12, 8, True, False),
    "imagenet64_uvit_m4": (300_000, 1024, 3e-4, (0.99, 0.99), 0.03, 5000, 0.0, 50, 0.0, "dpm_solver", None, True, 4, 768, 16, 12, True, True),
    "imagenet64_uvit_l4": (300_000, 1024, 3e-4, (0.99, 0.99), 0.03, 5000, 0.0, 50, 0.0, "dpm_solver", None, True, 4, 1024, 20, 16, True, True),
    "imagenet256_uvit_l2": (300_000, 1024, 2e-4, (0.99, 0.99), 0.03, 5000, 0.15, 50, 0.4, "dpm_solver", 0.18215, False, 2, 1024, 20, 16, True, True),
    "imagenet256_uvit_h2": (500_000, 1024, 2e-4, (0.99, 0.99), 0.03, 5000, 0.1, 50, 0.4, "dpm_solver_pp", 0.18215, False, 2, 1152, 28, 16, False, True),
    "imagenet512_uvit_l4": (500_000, 1024, 2e-4, (0.99, 0.99), 0.03, 5000, 0.15, 50, 0.7, "dpm_solver", 0.18215, False, 4, 1024, 20, 16, True, True),
    "imagenet512_uvit_h4": (500_000, 1024, 2e-4, (0.99, 0.99), 0.03, 5000, 0.1, 50, 0.7, "dpm_solver_pp", 0.18215, False, 4, 1152, 28, 16, False, True),
    "coco_uvit_s2": (1_000_000, 256, 2e-4, (0.9, 0.9), 0.03, 5000, 0.1, 50, 1.0, "dpm_solver_pp", 0.23010, False, 2, 512, 12, 8, True, False),
    "coco_uvit_s2_deep": (1_000_000, 256, 2e-4, (0.9, 0.9), 0.03, 5000, 0.1, 50, 1.0, "dpm_solver_pp", 0.23010, False, 2, 512, 16, 8, True, False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OFFICIAL_CONFIGS))
def test_preset_matches_the_official_config(name):
    p = load_preset(name)
    t, sm, m = p.train, p.sample, p.model
    got = (
        t.steps, t.batch_size, t.lr, t.betas, t.weight_decay, t.warmup_steps, t.p_uncond, sm.steps, sm.cfg_scale,
        sm.solver, p.autoencoder.scale_factor if p.autoencoder else None, p.data.random_flip,
        m.patch_size, m.embed_dim, m.depth, m.num_heads, m.conv, m.use_checkpoint,
    )  # fmt: skip
    assert got == OFFICIAL_CONFIGS[name]
    assert (t.ema_rate, t.grad_clip, t.seed, m.mlp_ratio, m.qkv_bias, m.mlp_time_embed) == (
        0.9999,
        0.0,
        1234,
        4.0,
        False,
        False,
    )
    assert (t.log_interval, t.sample_interval, t.save_interval) == (10, 5000, 50_000)
    assert p.schedule.kind == ("discrete" if sm.solver == "dpm_solver_pp" else "continuous")
    assert m.num_classes == {"imagenet64": 1000, "imagenet": 1001}.get(p.data.kind, -1)


# Presets beyond the paper: a paper preset's model, data, encoders and [eval], trained and sampled as SiT (willisma/SiT
# train.py: AdamW lr 1e-4 constant, weight decay 0, default betas, batch 256, class dropout 0.1, Linear path,
# velocity, t ~ U(0, 1); sample_ddp.py SDE: Euler-Maruyama, 250 steps; cfg 1.5 = our 0.5 for ImageNet).
FLOW_PRESETS = {
    "coco_uvit_s2_deep_flow": ("coco_uvit_s2_deep", 1.0),
    "imagenet256_uvit_l2_flow": ("imagenet256_uvit_l2", 0.5),
    "imagenet256_uvit_h2_flow": ("imagenet256_uvit_h2", 0.5),
}


@pytest.mark.parametrize("name", list(FLOW_PRESETS))
def test_flow_presets_are_their_paper_preset_with_sits_recipe(name):
    paper_name, cfg_scale = FLOW_PRESETS[name]
    flow, paper = load_preset(name), load_preset(paper_name)
    assert "beyond the paper" in flow.description and name not in PAPER_PRESETS
    assert (flow.model, flow.data, flow.autoencoder, flow.text_encoder, flow.eval) == (
        paper.model,
        paper.data,
        paper.autoencoder,
        paper.text_encoder,
        paper.eval,
    )
    t = flow.train
    assert (t.objective, t.t_sampling, t.t_mean, t.t_std, t.time_shift, t.min_snr_gamma) == (
        "flow", "uniform", None, None, None, None,
    )  # fmt: skip
    assert (t.lr, t.weight_decay, t.betas, t.warmup_steps, t.batch_size, t.p_uncond) == (
        1e-4, 0.0, (0.9, 0.999), 0, 256, 0.1,
    )  # fmt: skip
    assert (t.steps, t.ema_rate, t.grad_clip, t.seed) == (paper.train.steps, 0.9999, 0.0, 1234)
    s = flow.sample
    assert (s.solver, s.steps, s.cfg_scale, s.n_samples) == (
        "flow_euler_maruyama",
        250,
        cfg_scale,
        paper.sample.n_samples,
    )


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


def test_presets_are_found_after_a_regular_install(tmp_path, monkeypatch):
    """Non-editable installs carry the presets as data files in <prefix>/share/uvit/presets (pyproject)."""
    import sys

    import uvit_cli.config as config
    import uvit_cli.preset_files as preset_files

    assert config.presets_dir().name == "presets" and "coco_uvit_s2_deep" in config.list_presets()  # checkout
    site = tmp_path / "site-packages" / "uvit_cli"
    site.mkdir(parents=True)
    shared = tmp_path / "prefix" / "share" / "uvit" / "presets"
    shared.mkdir(parents=True)
    (shared / "only_here.toml").write_text((config.presets_dir() / "coco_uvit_s2.toml").read_text())
    monkeypatch.delenv(config.PRESETS_ENV, raising=False)
    monkeypatch.setattr(preset_files, "__file__", str(site / "preset_files.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert config.presets_dir() == shared and config.list_presets() == ["only_here"]
    assert config.load_preset("only_here").model.embed_dim == 512


def test_errors_suggest_the_close_name_and_blame_the_set_that_caused_them():
    with pytest.raises(
        ConfigError, match=r"unknown preset 'coco_uvit_s2_dep' \(did you mean 'coco_uvit_s2_deep'\?\)"
    ):
        load_preset("coco_uvit_s2_dep")
    with pytest.raises(ConfigError) as e:
        load_preset("coco_uvit_s2", ["train.lrr=1"])
    assert str(e.value) == "--set train.lrr=1: train.lrr: unknown key (did you mean 'lr'?)"
    with pytest.raises(
        ConfigError, match=r"^--set trian.lr=1: trian: unknown key \(did you mean 'train'\?\)$"
    ):
        load_preset("coco_uvit_s2", ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"^--set model.depth=x: model.depth: "):
        load_preset("coco_uvit_s2", ["model.depth=x"])
    with pytest.raises(ConfigError, match=r"unknown key$"):  # nothing close: no suggestion
        load_preset("coco_uvit_s2", ["sample.zzzzzz=1"])


def test_eval_metrics_and_classes():
    """[eval] metrics: the names of `uvit fid --metrics` (one list), fid always among them, canonical order;
    classes: the label protocol of a class model's FID set. The paper presets keep FID alone, random labels."""
    from typing import get_args

    from uvit_cli.fid.metrics import METRICS

    assert METRICS == get_args(config.FidMetric) == ("fid", "sfid", "is", "pr", "clip")
    for name in PAPER_PRESETS:
        ev = load_preset(name).eval
        assert (ev.metrics, ev.classes, ev.n, ev.steps) == (["fid"], "random", 10000, 50)
    p = load_preset("imagenet64_uvit_m4", ['eval.metrics=["pr", "fid", "is", "pr"]', "eval.classes=balanced"])
    assert p.eval.metrics == ["fid", "is", "pr"] and p.eval.classes == "balanced"
    assert config.preset_from_toml(p.to_toml()) == p  # checkpoints carry them
    assert load_preset("imagenet64_uvit_m4", ["eval.metrics=sfid, fid"]).eval.metrics == ["fid", "sfid"]
    assert load_preset("coco_uvit_s2", ["eval.metrics=fid,clip"]).eval.metrics == ["fid", "clip"]

    def error(*overrides: str, preset: str = "imagenet64_uvit_m4") -> str:
        with pytest.raises(ConfigError) as e:
            load_preset(preset, list(overrides))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "must include 'fid'" in error("eval.metrics=is,pr") and "RUN/best" in error("eval.metrics=is")
    assert "eval.metrics.1" in error("eval.metrics=fid,kid") and "'clip'" in error("eval.metrics=fid,kid")
    assert "eval.classes" in error("eval.classes=sorted")
    assert "class-conditional" in error("eval.classes=balanced", preset="coco_uvit_s2")
    assert "text-conditional" in error("eval.classes=balanced", preset="coco_uvit_s2")
    assert "clip" in error("eval.metrics=fid,clip") and "class-conditional" in error("eval.metrics=fid,clip")
