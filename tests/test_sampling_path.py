"""The one sampling path: `uvit sample`'s PNGs equal an independent recomputation (per-image seeds, the solver
on a hand-written guided network call, the decoder, save_image's rounding), training's sample grids are
`generate`'s images, the settings are one typed object checked once, and guidance follows one rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_fixtures import randomize_
from PIL import Image
from sample_fixtures import class_toml, save_tiny_encoders, save_tiny_uvit, t2i_toml
from train_fixtures import tiny_preset, write_pixel_set
from typer.testing import CliRunner

from uvit_cli import solvers
from uvit_cli.cli import app
from uvit_cli.config import Preset, preset_from_dict
from uvit_cli.data import FeatureDataset, write_arrays
from uvit_cli.errors import ConfigError
from uvit_cli.model import UViT
from uvit_cli.sample import (
    SampleOptions,
    SamplerSpec,
    SampleSettings,
    class_conditions,
    context_conditions,
    generate,
    guidance_refusal,
    null_condition,
)
from uvit_cli.sample.outputs import grid_image
from uvit_cli.schedule import make_schedule
from uvit_cli.train.grid import GridSampler

PKG = Path(__file__).resolve().parent.parent / "uvit_cli"
runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampling_path")
    t2i, t2i_model = save_tiny_uvit(t2i_toml(), d / "tiny_t2i.toml", d / "t2i" / "nnet_ema.pth", seed=1)
    cls, cls_model = save_tiny_uvit(
        class_toml(steps=4), d / "tiny_class.toml", d / "cls" / "nnet_ema.pth", seed=2
    )
    vae, clip = save_tiny_encoders(d / "autoencoder_kl.pth", d / "clip", vae_seed=3, clip_seed=4)
    return dict(dir=d, t2i=t2i, t2i_model=t2i_model, cls=cls, cls_model=cls_model, vae=vae, clip=clip)


def _pngs(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))])


@torch.no_grad()
def _recomputed(model, preset: Preset, cond, null, seed: int, cfg_scale: float, decode=None) -> np.ndarray:
    """The images written without `uvit_cli.sample`: image i's noise from SeedSequence([seed, i]) on a CPU
    generator, the preset's solver on eps_c + s (eps_c - eps_u) of one network call of batch 2B, the
    decoder, then clamp(0.5 (v + 1)) and save_image's x * 255 + 0.5 truncated."""
    m, sc = preset.model, preset.schedule
    n = len(next(iter(cond.values())))
    states = [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) for i in range(n)]
    gens = [torch.Generator().manual_seed(s) for s in states]
    x_T = torch.stack([torch.randn(m.in_chans, m.img_size, m.img_size, generator=g) for g in gens])
    both = {k: torch.cat([cond[k], null[k].expand_as(cond[k])]) for k in cond}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return eps_c + cfg_scale * (eps_c - eps_u)

    schedule = make_schedule(sc.kind, sc.num_steps, sc.beta_min, sc.beta_max)
    x = solvers.sample(
        preset.sample.solver, eps_fn, x_T, preset.sample.steps, schedule=schedule, generator=gens
    )
    if decode is not None:
        x = decode(x)
    x = ((0.5 * (x + 1.0)).clamp(0.0, 1.0) * 255.0 + 0.5).clamp(0.0, 255.0).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("seed", [0, 5])
def test_uvit_sample_class_pngs_equal_an_independent_recomputation(env, tmp_path, seed):
    """Guided (scale 0.5) Euler–Maruyama of a class model: every PNG bit, both seeds."""
    d, p, model = env["dir"], env["cls"], env["cls_model"]
    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "tiny_class.toml"),
            "--class", "3", "--class", "7", "--n", "2", "--seed", str(seed), "--no-compile", "--out", str(out)]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert p.sample.cfg_scale == 0.5 and p.sample.solver == "euler_maruyama"
    cond = {"y": torch.tensor([3, 3, 7, 7])}
    want = _recomputed(model, p, cond, {"y": torch.tensor(10)}, seed, 0.5)
    np.testing.assert_array_equal(_pngs(out), want)
    assert len(np.unique(want.reshape(4, -1), axis=0)) == 4  # four different images


@pytest.mark.parametrize("seed", [0, 5])
def test_uvit_sample_text_pngs_equal_an_independent_recomputation(env, tmp_path, seed):
    """Guided (scale 1.5) DPM-Solver++ of a latent text model, decoded at the preset's scale factor."""
    d, p, model, vae = env["dir"], env["t2i"], env["t2i_model"], env["vae"]
    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(d / "t2i" / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i.toml"),
            "--prompt", "a red cube", "--prompt", "a blue ball", "--n", "2", "--seed", str(seed),
            "--cfg-scale", "1.5", "--no-compile", "--vae", str(d / "autoencoder_kl.pth"), "--clip", str(d / "clip"),
            "--out", str(out)]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        ctx = env["clip"].encode(["a red cube", "a blue ball"])
        empty = env["clip"].encode([""])
    cond = {"context": ctx[[0, 0, 1, 1]]}
    scale = p.autoencoder.scale_factor

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decoder(vae.post_quant_conv(z / scale))

    want = _recomputed(model, p, cond, {"context": empty}, seed, 1.5, decode)
    np.testing.assert_array_equal(_pngs(out), want)
    assert want.shape == (4, 32, 32, 3)


# --------------------------------------------------------------------------------------------------
# Training's sample grids


@pytest.fixture(scope="module")
def pixel_set(tmp_path_factory):
    root = write_pixel_set(tmp_path_factory.mktemp("grid") / "px")  # 4 classes of 8x8 pixels
    return root, FeatureDataset(root, "train", seed=0)


def _model(preset: Preset) -> UViT:
    return randomize_(UViT(**preset.model.model_dump()), seed=5).train()


def test_the_training_grid_is_the_sampling_functions_output(pixel_set, tmp_path):
    root, ds = pixel_set
    preset = tiny_preset(root)  # guided: p_uncond 0.2, DPM-Solver++ 4 steps, cfg 1.0
    model = _model(preset)
    grid = GridSampler(preset, ds, torch.device("cpu"), seed=7)
    assert grid.note is None and grid.settings.cfg_scale == 1.0
    path = grid(model, tmp_path / "samples" / "00000001.png", None)
    assert path is not None and model.training  # the caller's mode is restored

    settings = SampleSettings.from_preset(preset, SampleOptions(batch_size=16, compile=False))
    labels = class_conditions([i % 4 for i in range(16)])  # class i % K, K the set's classes
    model.eval()
    images = np.concatenate(
        [b for _, b in generate(model, preset, range(16), labels, null_condition(preset.model), seed=7,
                                settings=settings)]
    )  # fmt: skip
    got = np.asarray(Image.open(path))
    np.testing.assert_array_equal(got, grid_image(images, 16))
    assert got.shape == (4 * 10 + 2, 4 * 10 + 2, 3)  # 4x4 tiles of 8 px, 2 px padding
    np.testing.assert_array_equal(got[2:10, 12:20], images[1])  # row 0, column 1


def test_a_text_grid_takes_the_first_caption_of_each_item_and_the_sets_empty_context(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 3, 8, 8), dtype=np.uint8)
    contexts = [rng.normal(size=(1 + i % 3, 5, 16)).astype(np.float32) for i in range(6)]
    empty = rng.normal(size=(5, 16)).astype(np.float32)
    root = write_arrays(tmp_path / "txt", pixels, contexts=contexts, empty_context=empty)
    p = tiny_preset(root).model_dump()
    p["model"].update(num_classes=-1, clip_dim=16, num_clip_token=5)
    p["text_encoder"] = {"kind": "toy", "pretrained": "toy"}
    preset = preset_from_dict(p)  # guided: p_uncond 0.2, cfg 1.0
    ds = FeatureDataset(root, "train", seed=0)
    model = _model(preset)
    path = GridSampler(preset, ds, torch.device("cpu"), n=4, seed=2)(model, tmp_path / "g.png", None)
    assert path is not None

    firsts = torch.stack([ds[(i * ds.views, 0)]["context"] for i in range(4)])  # item i, caption of epoch 0
    settings = SampleSettings.from_preset(preset, SampleOptions(batch_size=4))
    uncond = null_condition(preset.model, ds.empty_context)
    assert torch.equal(uncond["context"][0], torch.from_numpy(empty).to(uncond["context"].dtype))
    model.eval()
    images = next(generate(model, preset, range(4), context_conditions(firsts, range(4)), uncond, seed=2,
                           settings=settings))[1]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid_image(images, 4))


def test_a_grid_whose_guidance_cannot_apply_is_drawn_unguided_and_says_so(pixel_set, tmp_path):
    """The one guidance rule: refused where settings are made for a command, but a grid must not stop a run."""
    root, ds = pixel_set
    preset = tiny_preset(root, p_uncond=0.0)  # cfg_scale 1.0 in [sample], no condition dropout
    why = guidance_refusal(preset)
    assert why is not None and "train.p_uncond = 0" in why
    with pytest.raises(
        ConfigError, match=r"--cfg-scale 1: preset 'tiny' was trained without condition dropout"
    ):
        SampleSettings.from_preset(preset)
    grid = GridSampler(preset, ds, torch.device("cpu"), seed=7)
    assert grid.settings.cfg_scale == 0.0
    note = grid.pop_note()
    assert note is not None and why in note and grid.pop_note() is None
    model = _model(preset)
    path = grid(model, tmp_path / "g.png", None)
    assert path is not None and grid.disabled is None
    settings = SampleSettings.from_preset(preset, SampleOptions(cfg_scale=0.0, batch_size=16))
    model.eval()
    images = next(generate(model, preset, range(16), class_conditions([i % 4 for i in range(16)]), None,
                           seed=7, settings=settings))[1]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid_image(images, 16))


def test_a_grid_that_cannot_fit_in_memory_turns_grids_off(pixel_set, tmp_path, monkeypatch):
    from uvit_cli import resources

    root, ds = pixel_set
    preset = tiny_preset(root)
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1 << 10)
    grid = GridSampler(preset, ds, torch.device("cpu"))
    assert grid(_model(preset), tmp_path / "g.png", None) is None
    assert grid.disabled is not None and grid.disabled.startswith("no sample grids: sampling a batch of 16")
    assert not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------------------------------
# One typed settings object, one rule, one schedule


def test_options_mirror_the_settings_and_resolve_once(env):
    names = [f.name for f in dataclasses.fields(SampleOptions)]
    # a choice is a field of both; the settings add the facts of the model they are for (from its preset)
    model_facts = ["objective", "time_shift"]
    assert names + model_facts == [f.name for f in dataclasses.fields(SampleSettings)]
    with pytest.raises(TypeError, match="step"):
        SampleOptions(step=3)  # type: ignore[call-arg]  # a misspelled option: no silent default
    p = env["cls"]
    s = SampleSettings.from_preset(p, SampleOptions(steps=9, guidance_interval=(0.2, 0.8)))
    assert (s.steps, s.cfg_scale, s.solver, s.batch_size) == (9, 0.5, "euler_maruyama", 4)  # flag > preset
    assert (s.decode_batch_size, s.precision, s.compile, s.cuda_graphs) == (50, None, None, False)  # defaults
    assert (s.objective, s.time_shift) == ("eps", None) and "objective" not in s.to_dict()  # eps: as before
    assert s.guidance_interval == (0.2, 0.8) and s.to_dict()["guidance_interval"] == [0.2, 0.8]
    assert SampleSettings.from_preset(p) == SampleSettings.from_preset(p, SampleOptions())
    assert SamplerSpec().settings == SampleOptions()
    with pytest.raises(ConfigError, match="cfg scale must be a finite number"):
        dataclasses.replace(s, cfg_scale=float("nan"))  # checked on construction, however it is made
    with pytest.raises(ConfigError, match="unknown solver 'heun'"):
        SampleSettings.from_preset(p, SampleOptions(solver="heun"))


def test_guidance_on_an_unconditional_model_is_one_line(tmp_path):
    unc = tiny_preset(tmp_path, p_uncond=0.0).model_dump()
    unc["model"]["num_classes"] = -1
    preset = preset_from_dict(unc)
    assert SampleSettings.from_preset(preset, SampleOptions(cfg_scale=0.0)).cfg_scale == 0.0
    with pytest.raises(ConfigError, match=r"preset 'tiny' is unconditional.*use --cfg-scale 0"):
        SampleSettings.from_preset(preset)


def test_the_schedule_and_the_guidance_rule_have_one_home():
    """Outside the math core, only sample/generate.py builds a schedule from a preset's table
    (`sampling_schedule`); the guidance rule is sample/settings.py's, applied by `from_preset` and asked
    directly only by the training grid (which samples unguided instead of refusing)."""
    core = {PKG / "schedule.py", *(PKG / "solvers").glob("*.py")}
    for path in sorted(set(PKG.rglob("*.py")) - core):
        text = path.read_text()
        where = path.relative_to(PKG).as_posix()
        if where != "sample/generate.py":
            assert "make_schedule(" not in text, where
        if where not in ("sample/settings.py", "sample/__init__.py", "train/grid.py"):
            assert "guidance_refusal" not in text, where
        assert "check_guidance" not in text, where
