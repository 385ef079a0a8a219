"""The objective travels with the checkpoint: a flow model trained here is sampled by `uvit sample --ckpt` and
`uvit fid --ckpt` with no solver flag, and its images equal the flow solver called directly on the network (an
independent recomputation); a v model on a VP solver equals its eps-equivalent network; a solver that does not
fit the objective is one line; the records name the objective (and only for v and flow models)."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_fixtures import randomize_
from PIL import Image
from test_fid import _images, _standin
from test_metrics import spy_on_streamed_images
from train_fixtures import tiny_preset
from typer.testing import CliRunner

from uvit_cli import solvers
from uvit_cli.checkpoint import find_checkpoint, load_model
from uvit_cli.cli import app
from uvit_cli.cli import presets as presets_cli
from uvit_cli.config import Preset, load_preset, preset_from_dict
from uvit_cli.errors import ConfigError
from uvit_cli.fid import generated as gen
from uvit_cli.fid import make_ref_stats
from uvit_cli.model import UViT
from uvit_cli.sample import (
    SampleOptions,
    SampleSettings,
    class_conditions,
    null_condition,
    random_class_conditions,
    sample_latents,
)
from uvit_cli.schedule import FlowSchedule, stable_diffusion_betas
from uvit_cli.train import train

runner = CliRunner()
FEATS = {"features": _standin(), "feature_dim": 16, "device": "cpu"}
SHIFT = 2.0  # the flow run's train.time_shift: the sampler's grid must be shifted the same way
NULL = 4  # tiny_preset: 4 real classes and the null class 4 (p_uncond 0.2)


def _variant(shards: Path, name: str, train: dict, sample: dict, schedule: dict | None = None) -> Preset:
    """`tiny_preset` (class-conditional 8x8 pixels) under another name, objective and sampler."""
    d = tiny_preset(shards, steps=4, save_interval=4).model_dump(mode="json")
    d["name"] = name
    d["train"].update(train)
    d["sample"].update(sample)
    if schedule is not None:
        d["schedule"].update(schedule)
    return preset_from_dict(d)


@pytest.fixture(scope="module")
def env(shards, tmp_path_factory):
    """A flow model trained 4 steps (logit-normal time, time shift 2; the run's preset samples with flow_heun
    in 5 evaluations at guidance 1.0), its EMA weights, and 16-d reference statistics of random images."""
    d = tmp_path_factory.mktemp("flow_sampling")
    preset = _variant(
        shards,
        "tiny_flow",
        {"objective": "flow", "t_sampling": "logit_normal", "time_shift": SHIFT},
        {"solver": "flow_heun", "steps": 5, "cfg_scale": 1.0, "batch_size": 3, "n_samples": 6},
    )
    run = d / "run"
    train(preset, run)
    model, embedded, _ = load_model(find_checkpoint(run, ema=True), ema=True)
    _images(d / "real", 12, seed=1, size=8)
    ref = make_ref_stats(d / "real", d / "ref16.npz", **FEATS).path
    return dict(dir=d, run=run, preset=embedded, model=model, ref=ref)


def _pngs(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _one_line_error(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


@torch.no_grad()
def _recomputed_flow(
    model, labels: list[int], seed: int, cfg_scale: float, solver: str, steps: int
) -> np.ndarray:
    """The images without `uvit_cli.sample`: image i's noise from SeedSequence([seed, i]) on its own CPU
    generator, the flow solver called directly with the shifted linear path on v_c + s (v_c - v_u) of one
    network call of batch 2B, then clamp(0.5 (v + 1)) and save_image's x * 255 + 0.5 truncated."""
    states = [
        int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) for i in range(len(labels))
    ]
    gens = [torch.Generator().manual_seed(s) for s in states]
    x_T = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    both = {"y": torch.cat([torch.tensor(labels), torch.full((len(labels),), NULL)])}

    def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        v_c, v_u = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), **both).chunk(2)
        return v_c + cfg_scale * (v_c - v_u)

    fn = {"flow_heun": solvers.sample_flow_heun, "flow_euler_maruyama": solvers.sample_flow_euler_maruyama}
    kw = {"generator": gens} if solver == "flow_euler_maruyama" else {}
    x = fn[solver](velocity, x_T, steps, schedule=FlowSchedule(SHIFT), **kw)
    x = ((0.5 * (x + 1.0)).clamp(0.0, 1.0) * 255.0 + 0.5).clamp(0.0, 255.0).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------------
# uvit sample --ckpt on a flow run


@pytest.mark.parametrize(
    ("flags", "solver", "steps"),
    [([], "flow_heun", 5), (["--solver", "flow_euler_maruyama", "--steps", "6"], "flow_euler_maruyama", 6)],
)
def test_uvit_sample_of_a_flow_run_equals_the_flow_solver_on_the_network(env, tmp_path, flags, solver, steps):
    """No flag: the run's flow_heun on its shifted path; --solver picks another flow solver (its noise from
    each image's generator). Every PNG bit equals the direct computation."""
    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(env["run"]), "--class", "1", "--class", "3", "--n", "2", "--seed", "5",
            "--no-compile", "--out", str(out), *flags]  # fmt: skip
    r = runner.invoke(app, args, terminal_width=300)
    assert r.exit_code == 0, r.output
    assert f"{solver} {steps} steps of a flow model" in r.output
    want = _recomputed_flow(env["model"], [1, 1, 3, 3], 5, 1.0, solver, steps)
    np.testing.assert_array_equal(_pngs(out), want)
    assert len(np.unique(want.reshape(4, -1), axis=0)) == 4  # four different images
    record = _records(out)[0]
    settings = record["settings"]
    assert (settings["objective"], settings["time_shift"]) == ("flow", SHIFT)
    assert record["schedule"] == {"kind": "flow"}  # not the [schedule] table a flow model never reads
    assert (settings["solver"], settings["steps"]) == (solver, steps)


def test_the_shift_and_the_objective_matter(env):
    """The comparison above can fail: the unshifted path, or the network read as eps, give other images."""
    model, p = env["model"], env["preset"]
    cond, unc = class_conditions([1, 3]), null_condition(p.model)
    got = sample_latents(model, p, [0, 1], cond, unc, seed=5)
    unshifted = p.model_copy(update={"train": p.train.model_copy(update={"time_shift": None})})
    other = sample_latents(model, unshifted, [0, 1], cond, unc, seed=5)
    assert (got - other).abs().max() > 1e-3
    # the same network read as an eps model (the preset's [schedule], DPM-Solver++)
    d = p.model_dump(mode="json")
    d["train"].update(objective="eps", time_shift=None, t_sampling="uniform", t_mean=None, t_std=None)
    d["sample"]["solver"] = "dpm_solver_pp"
    as_eps = preset_from_dict(d)
    assert (got - sample_latents(model, as_eps, [0, 1], cond, unc, seed=5)).abs().max() > 1e-3


def test_a_flow_folder_records_its_objective_resumes_and_refuses_another_shift(env, tmp_path):
    out = tmp_path / "s"
    base = [
        "sample",
        "--ckpt",
        str(env["run"]),
        "--class",
        "2",
        "--n",
        "2",
        "--no-compile",
        "--out",
        str(out),
    ]
    assert runner.invoke(app, base).exit_code == 0
    again = runner.invoke(app, base, terminal_width=300)
    assert again.exit_code == 0 and "(0 new, 2 already there)" in again.output, again.output
    line = _one_line_error(runner.invoke(app, [*base, "--set", "train.time_shift=3.0"], terminal_width=400))
    assert "made with different settings" in line


def test_a_noise_solver_on_a_flow_checkpoint_is_one_line(env, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "fid_from_checkpoint", functools.partial(gen.fid_from_checkpoint, **FEATS))
    out = tmp_path / "s"
    for command in (["sample", "--class", "1", "--out", str(out)], ["fid", "-n", "4", str(env["ref"])]):
        r = runner.invoke(
            app, [command[0], "--ckpt", str(env["run"]), "--solver", "dpm_solver_pp", *command[1:]],
            terminal_width=400,
        )  # fmt: skip
        line = _one_line_error(r)
        assert "solver 'dpm_solver_pp'" in line and "train.objective = 'flow'" in line
        assert "flow_euler, flow_heun, flow_euler_maruyama" in line
    assert not out.exists()  # refused before anything is written


def test_settings_check_the_solver_against_the_objective(env):
    p = env["preset"]
    s = SampleSettings.from_preset(p)
    assert (s.solver, s.objective, s.time_shift) == ("flow_heun", "flow", SHIFT)
    with pytest.raises(
        ConfigError, match=r"solver 'ddim' integrates a noise prediction.*flow_euler, flow_heun"
    ):
        SampleSettings.from_preset(p, SampleOptions(solver="ddim"))
    with pytest.raises(
        ConfigError, match=r"solver 'flow_euler' integrates a flow model's velocity.*predicts eps"
    ):
        SampleSettings(solver="flow_euler")
    with pytest.raises(ConfigError, match="time shift"):
        SampleSettings(time_shift=2.0)  # an eps model has no time shift
    # settings made for another objective are a programming error, not a silent wrong sampler
    with pytest.raises(ValueError, match="SampleSettings.from_preset"):
        sample_latents(env["model"], p, [0], class_conditions([1]), settings=SampleSettings(cfg_scale=0.0))


# --------------------------------------------------------------------------------------------------
# uvit fid --ckpt on a flow run


def test_uvit_fid_of_a_flow_run_streams_the_flow_solvers_images(env, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "fid_from_checkpoint", functools.partial(gen.fid_from_checkpoint, **FEATS))
    images = spy_on_streamed_images(monkeypatch)
    stamp = tmp_path / "s.json"
    args = ["fid", "--ckpt", str(env["run"]), "-n", "6", "--seed", "3", "--no-compile", str(env["ref"]),
            "--json", str(stamp)]  # fmt: skip
    r = runner.invoke(app, args, terminal_width=300)
    assert r.exit_code == 0, r.output
    labels = random_class_conditions(3, 4)(range(6))["y"].tolist()  # the paper's labels: uniform, per index
    np.testing.assert_array_equal(images[0], _recomputed_flow(env["model"], labels, 3, 1.0, "flow_heun", 5))
    g = json.loads(stamp.read_text())["samples"]["generator"]
    assert (g["solver"], g["steps"], g["objective"], g["time_shift"]) == ("flow_heun", 5, "flow", SHIFT)


# --------------------------------------------------------------------------------------------------
# v models on the VP solvers


def _alpha_sigma(kind: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t of the sampler's VP schedule, in float64 from the definitions: the continuous VP-SDE's
    closed form (beta 0.1..20), or the discrete SD schedule's log alpha interpolated linearly between the
    knots t = n / 1000, where it is 0.5 log alpha_bar_n (DPM-Solver's NoiseScheduleVP('discrete'))."""
    t64 = t.double()
    if kind == "continuous":
        log_alpha = -0.25 * t64**2 * (20.0 - 0.1) - 0.5 * t64 * 0.1
    else:
        betas = stable_diffusion_betas(1000).float().double()  # the official scripts' float32 betas
        knots = 0.5 * torch.log(1.0 - betas).cumsum(0)  # (1000,) at t = 1/1000 .. 1
        ts = np.linspace(1e-3, 1.0, 1000)
        log_alpha = torch.from_numpy(np.interp(t64.numpy(), ts, knots.numpy()))
    alpha = log_alpha.exp()
    return alpha, (1.0 - alpha**2).sqrt()


@pytest.mark.parametrize(
    ("kind", "solver"),
    [("discrete", "dpm_solver_pp"), ("continuous", "dpm_solver_pp"), ("continuous", "euler_maruyama")],
)
def test_a_v_model_samples_as_its_eps_equivalent(shards, kind, solver):
    """The same network read as v (through the adapter) and, by hand, as the eps model sigma x + alpha v give
    the same samples, guided (the guidance rule and the v -> eps map are both linear)."""
    sample = {"solver": solver, "steps": 6, "cfg_scale": 1.5}
    v_preset = _variant(shards, "tiny_v", {"objective": "v"}, sample, {"kind": kind})
    eps_preset = _variant(shards, "tiny_eps", {}, sample, {"kind": kind})
    net = randomize_(UViT(**v_preset.model.model_dump()), seed=7).eval()
    time_scale = 1000.0 if kind == "discrete" else 999.0  # the network input t * N, or t * 999

    def eps_equivalent(x: torch.Tensor, timesteps: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        alpha, sigma = _alpha_sigma(kind, timesteps / time_scale)  # (2B,)
        v = net(x, timesteps, **cond).double()
        return (sigma[:, None, None, None] * x.double() + alpha[:, None, None, None] * v).float()

    cond, unc = class_conditions([0, 2, 3]), null_condition(v_preset.model)
    got = sample_latents(net, v_preset, [0, 1, 2], cond, unc, seed=11)
    want = sample_latents(net, eps_preset, [0, 1, 2], cond, unc, seed=11, network=eps_equivalent)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert SampleSettings.from_preset(v_preset).to_dict()["objective"] == "v"
    assert "objective" not in SampleSettings.from_preset(eps_preset).to_dict()


# --------------------------------------------------------------------------------------------------
# Presets


def test_presets_list_shows_flow_in_the_schedule_column():
    r = runner.invoke(app, ["presets", "list"], terminal_width=400)
    assert r.exit_code == 0, r.output
    flows = [
        "coco_uvit_s2_deep_flow",
        "imagenet256_uvit_l2_flow",
        "imagenet256_uvit_h2_flow",
        "shapes_uvit_tiny_flow",
    ]
    for name in flows:
        row = next(line for line in r.output.splitlines() if f" {name} " in line)
        cells = [c.strip() for c in re.split(r"[│┃|]", row) if c.strip()]
        assert cells[3].startswith("flow"), row
    # the column's text, whatever the terminal's width
    assert [presets_cli._schedule(load_preset(n)) for n in ("shapes_uvit_tiny", "shapes_uvit_tiny_v")] == [
        "continuous",
        "continuous (v)",
    ]
    shifted = load_preset("shapes_uvit_tiny_flow", ["train.time_shift=3"])
    assert presets_cli._schedule(shifted) == "flow, shift 3"


@pytest.mark.parametrize("name", ["shapes_uvit_tiny_flow", "shapes_uvit_tiny_v"])
def test_the_quickstarts_variants_differ_from_it_only_in_the_objective(name):
    """Everything but the objective, its time density, its weighting and its sampler is the quickstart's;
    the sampler spends the same network evaluations (DPM-Solver++'s steps and flow_heun's are both NFE)."""
    base, var = load_preset("shapes_uvit_tiny"), load_preset(name)
    assert "beyond the paper" in var.description
    assert (var.model, var.data, var.text_encoder, var.eval) == (
        base.model,
        base.data,
        base.text_encoder,
        base.eval,
    )
    b, v = base.train.model_dump(), var.train.model_dump()
    changed = {k for k in b if b[k] != v[k]}
    if name.endswith("_flow"):
        assert changed == {"objective", "t_sampling", "t_mean", "t_std", "min_snr_gamma"}
        assert (var.train.objective, var.train.t_sampling, var.train.t_mean, var.train.t_std) == (
            "flow", "logit_normal", 0.0, 1.0,
        )  # fmt: skip
        assert var.train.min_snr_gamma is None and var.train.time_shift is None
        assert var.sample.solver == "flow_heun"
    else:
        assert changed == {"objective"} and var.schedule == base.schedule
        assert var.sample.solver == base.sample.solver
    s, bs = var.sample.model_dump(), base.sample.model_dump()
    assert {k for k in s if s[k] != bs[k]} <= {"solver"} and var.sample.steps == base.sample.steps == 30
    assert math.isclose(var.sample.cfg_scale, 2.0)
