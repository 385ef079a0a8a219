"""`uvit train`: objective against a direct computation, CFG dropout, warm-up and EMA arithmetic, data checks,
exact resume after a killed process, a CPU run whose loss falls, and one-line CLI errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_fixtures import losses as _losses
from train_fixtures import tiny_preset
from train_fixtures import weights as _weights
from typer.testing import CliRunner

from uvit_cli import data
from uvit_cli.config import list_presets, load_preset, preset_from_dict
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.model import UViT
from uvit_cli.train import read_metrics, train
from uvit_cli.train.objective import Objective, eps_mse, step_seed
from uvit_cli.train.rundir import check_data_fits
from uvit_cli.train.step import build_optimizer, ema_update, warmup_factor

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Objective, dropout, optimiser arithmetic


def _alpha_bar_direct(n: np.ndarray) -> np.ndarray:
    """SD scaled-linear alpha_bar_n, n in 1..1000, straight from the spec's formula (float64)."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)[n - 1]


def test_discrete_objective_matches_direct_computation():
    net = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    obj = Objective(kind="discrete", z_shape=(3, 8, 8))
    d = obj.draw(torch.Generator().manual_seed(0), 512)
    assert d.timesteps.dtype == torch.int64
    assert d.timesteps.min() >= 1 and d.timesteps.max() <= 1000 and len(d.timesteps.unique()) > 300
    d = d.rows(0, 6)
    x0 = torch.randn(6, 3, 8, 8)
    sqrt_ab, sqrt_1m_ab, ts = obj.coefficients(d.timesteps)
    assert torch.equal(ts, d.timesteps)  # the network gets the integer step n
    loss = eps_mse(net, x0, d.eps, sqrt_ab, sqrt_1m_ab, ts)

    ab = torch.from_numpy(_alpha_bar_direct(d.timesteps.numpy())).float()
    x_n = ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * d.eps
    direct = ((d.eps - net(x_n, d.timesteps)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    assert loss.shape == (6,)


def test_continuous_objective_matches_direct_computation():
    net = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    obj = Objective(kind="continuous", z_shape=(3, 8, 8))
    d = obj.draw(torch.Generator().manual_seed(1), 5)
    t = d.timesteps
    assert t.dtype == torch.float32 and (t >= 0).all() and (t < 1).all()
    x0 = torch.randn(5, 3, 8, 8)
    sqrt_ab, sqrt_1m_ab, ts = obj.coefficients(t)
    torch.testing.assert_close(ts, t * 999)  # sde.ScoreModel feeds t * 999
    ab = torch.exp(-(0.1 * t + 19.9 * t**2 / 2))
    x_n = ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * d.eps
    direct = ((d.eps - net(x_n, t * 999)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(eps_mse(net, x0, d.eps, sqrt_ab, sqrt_1m_ab, ts), direct, rtol=1e-5, atol=1e-6)


def test_min_snr_weighting_is_opt_in_and_weights_the_gradient_not_the_logged_loss(shards, tmp_path):
    t = torch.tensor([0.02, 0.3, 0.9])
    obj = Objective(kind="continuous", z_shape=(3, 8, 8), min_snr_gamma=5.0)
    sqrt_ab, sqrt_1m_ab, _ = obj.coefficients(t)
    ab = torch.exp(-(0.1 * t + 19.9 * t**2 / 2))
    snr = ab / (1 - ab)
    torch.testing.assert_close(
        obj.loss_weight(sqrt_ab, sqrt_1m_ab), torch.minimum(snr, torch.tensor(5.0)) / snr
    )
    assert snr[0] > 5 > snr[2] and obj.loss_weight(sqrt_ab, sqrt_1m_ab)[2] == 1.0  # only high SNR weighs less
    assert Objective(kind="continuous", z_shape=(3, 8, 8)).loss_weight(sqrt_ab, sqrt_1m_ab) is None
    assert all(load_preset(n).train.min_snr_gamma is None for n in list_presets() if "shapes" not in n)

    # same draws and data: the logged losses of the first step agree, the weights after it differ
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    train(tiny_preset(shards, steps=2, save_interval=2), plain)
    train(tiny_preset(shards, steps=2, save_interval=2, min_snr_gamma=1.0), weighted)
    assert _losses(plain)[0] == _losses(weighted)[0]
    a, b = _weights(plain, 2, "model.safetensors"), _weights(weighted, 2, "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_latents_are_sampled_from_moments_and_pixels_flip():
    obj = Objective(kind="discrete", z_shape=(4, 2, 2), latent=True, scale_factor=0.23010)
    d = obj.draw(torch.Generator().manual_seed(2), 3)
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2) * 30  # some beyond the clamp range
    z = obj.clean_data(torch.cat([mean, logvar], 1), d)
    direct = 0.23010 * (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * d.latent_eps)
    torch.testing.assert_close(z, direct)

    obj = Objective(kind="discrete", z_shape=(3, 2, 2), random_flip=True)
    d = obj.draw(torch.Generator().manual_seed(3), 64)
    x = torch.randn(64, 3, 2, 2)
    out = obj.clean_data(x, d)
    assert 10 < int(d.flip.sum()) < 54
    assert torch.equal(out[d.flip], x[d.flip].flip(-1)) and torch.equal(out[~d.flip], x[~d.flip])


def test_cfg_dropout_rate_and_null_conditions():
    obj = Objective(kind="discrete", z_shape=(1, 1, 1), p_uncond=0.1, conditioning="class")
    d = obj.draw(torch.Generator().manual_seed(step_seed(1234, 7)), 200_000)
    assert abs(d.drop.float().mean().item() - 0.1) < 0.004
    y = torch.randint(0, 1000, (200_000,))
    out = obj.condition({"y": y}, d, {"y": torch.tensor(1000)})["y"]
    assert (out[d.drop] == 1000).all() and torch.equal(out[~d.drop], y[~d.drop])

    obj = Objective(kind="discrete", z_shape=(1, 1, 1), p_uncond=0.5, conditioning="text")
    d = obj.draw(torch.Generator().manual_seed(0), 400)
    ctx, empty = torch.randn(400, 3, 4), torch.randn(3, 4)
    out = obj.condition({"context": ctx}, d, {"context": empty[None]})["context"]
    assert 150 < int(d.drop.sum()) < 250
    assert (out[d.drop] == empty).all() and torch.equal(out[~d.drop], ctx[~d.drop])

    # No dropout without a condition or with p = 0; the same (seed, step) gives the same numbers.
    assert Objective(kind="discrete", z_shape=(1,), p_uncond=0.1).draw(torch.Generator(), 4).drop is None
    a = obj.draw(torch.Generator().manual_seed(step_seed(5, 3)), 8)
    b = obj.draw(torch.Generator().manual_seed(step_seed(5, 3)), 8)
    assert torch.equal(a.eps, b.eps) and torch.equal(a.drop, b.drop)
    assert step_seed(5, 3) != step_seed(5, 4) != step_seed(6, 3)


def test_warmup_schedule_and_adamw_settings():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))
    opt, sched = build_optimizer([p, q], lr=0.5, betas=[0.99, 0.999], weight_decay=0.03, warmup_steps=4)
    (g,) = opt.param_groups
    assert (
        g["weight_decay"] == 0.03
        and g["betas"] == (0.99, 0.999)
        and g["eps"] == 1e-8
        and len(g["params"]) == 2
    )
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad, q.grad = torch.ones(3), torch.ones(2)
        opt.step()
        if len(lrs) == 1:
            assert torch.equal(p.detach(), torch.ones(3)), "the first step must run at lr 0 (official)"
        sched.step()
    assert lrs == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert [warmup_factor(s, 0) for s in (0, 5)] == [1.0, 1.0]


def test_ema_arithmetic():
    rate = 0.9
    params = [torch.randn(4), torch.randn(2, 3)]
    ema = [p.clone() for p in params]
    expect = [p.double().clone() for p in params]
    official = [p.clone() for p in params]
    for _ in range(5):
        for p in params:
            p.add_(torch.randn_like(p))
        ema_update(ema, params, rate)
        expect = [rate * e + (1 - rate) * p.double() for e, p in zip(expect, params)]
        for e, p in zip(official, params):  # baofff/U-ViT utils.ema, as written there
            e.mul_(rate).add_((1 - rate) * p)
    for e, x, o in zip(ema, expect, official):
        torch.testing.assert_close(e.double(), x, rtol=1e-6, atol=1e-6)
        assert torch.equal(e, o)  # the official fp32 rounding, bit for bit


# --------------------------------------------------------------------------------------------------
# Whole steps against the official training code


class RecipeNet(torch.nn.Module):
    """A 9-parameter stand-in for the network with fixed initial values, so the reference needs no RNG."""

    def __init__(self, ema: bool = False) -> None:
        super().__init__()
        # The EMA copy starts elsewhere: the official ema_update(0) (our deepcopy) must overwrite it.
        k = 0.0 if ema else 1.0
        self.w = torch.nn.Parameter(k * torch.tensor([0.5, -0.3]))
        self.b = torch.nn.Parameter(k * torch.tensor([0.1, 0.2]))
        self.t_scale = torch.nn.Parameter(k * torch.tensor([0.4]))
        self.emb = torch.nn.Parameter(k * torch.tensor([0.3, -0.2, 0.1, 0.0]))  # 3 classes + null class 3

    def forward(self, x, timesteps, y):
        t = timesteps.float()[:, None, None, None] / 1000
        return (
            x * self.w[None, :, None, None]
            + self.b[None, :, None, None]
            + self.t_scale * t
            + self.emb[y][:, None, None, None]
        )


def recipe_inputs(kind: str, step: int):
    """Step `step`'s x0 (4, 2, 2, 2), labels, CFG drop mask, timesteps and noise, all from closed forms."""
    i = torch.arange(32, dtype=torch.float32).reshape(4, 2, 2, 2)
    x0 = torch.sin(0.7 * i + step)
    eps = torch.cos(1.3 * i - 0.5 * step)
    y = torch.tensor([0, 1, 2, 1])
    drop = torch.tensor([False, step % 2 == 0, False, step % 3 == 0])
    if kind == "discrete":
        timesteps = torch.tensor([1 + step, 250 + 7 * step, 640 - 5 * step, 1000 - step])  # in 1..1000
    else:
        timesteps = torch.tensor([0.001, 0.25, 0.64, 0.93]) + 0.01 * step  # in (0, 1)
    return x0, y, drop, timesteps, eps


GOLDEN = Path(__file__).parent / "golden"  # numbers the official code produced
RECIPE = dict(lr=0.1, betas=(0.9, 0.99), weight_decay=0.03, warmup_steps=3, ema_rate=0.9, steps=6)

# Produced by running the official code (baofff/U-ViT utils.initialize_train_state / get_optimizer / customized
# LambdaLR / TrainState.ema_update, the train_step of train_ldm_discrete.py (discrete: its Schedule and LSimple)
# and of train_ldm.py (continuous: sde.LSimple, ScoreModel, VPSDE), with datasets.CFGDataset's null label 3)
# on RecipeNet and recipe_inputs, with np.random.choice / torch.rand / torch.randn_like returning those draws.
# CPU, fp32, torch 2.14. Order of each list: w, b, t_scale, emb.
OFFICIAL_AFTER_6_STEPS = json.loads((GOLDEN / "official_train_after_6_steps.json").read_text())


def run_official_recipe(kind: str, check_first_step: bool = False):
    """Six train steps of RECIPE on RecipeNet; returns (model, ema, losses, lrs)."""
    import copy

    from uvit_cli.train.objective import DiffusionLoss, StepDraws
    from uvit_cli.train.step import StepState, train_step

    r = RECIPE
    model, ema = RecipeNet(), RecipeNet(ema=True)
    ema.load_state_dict(model.state_dict())  # the official ema_update(0)
    params = list(model.parameters())
    opt, sched = build_optimizer(
        params, lr=r["lr"], betas=r["betas"], weight_decay=r["weight_decay"], warmup_steps=r["warmup_steps"]
    )
    state = StepState(
        objective=Objective(kind=kind, z_shape=(2, 2, 2), p_uncond=0.5, conditioning="class"),
        loss_fn=DiffusionLoss(model),
        opt=opt,
        sched=sched,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        params=params,
        ema_params=list(ema.parameters()),
        ema_rate=r["ema_rate"],
        uncond={"y": torch.tensor(3)},
    )
    first = copy.deepcopy(model.state_dict())
    lrs, losses = [], []
    for step in range(r["steps"]):
        x0, y, drop, timesteps, eps = recipe_inputs(kind, step)
        d = StepDraws(timesteps=timesteps, eps=eps, latent_eps=None, drop=drop, flip=None)
        state.loss_sum.zero_()
        lrs.append(train_step(state, [({"x": x0, "y": y}, d)], n_micro=1, share=4))
        losses.append(state.loss_sum.item() / 4)
        # lr 0 on step 1: AdamW's decoupled decay is lr * wd, nothing moves
        if check_first_step and step == 0:
            assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    return model, ema, losses, lrs


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_train_step_matches_the_official_code(kind):
    model, ema, losses, lrs = run_official_recipe(kind, check_first_step=True)
    assert lrs == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1])
    want = OFFICIAL_AFTER_6_STEPS[kind]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    flat_ema = torch.cat([p.detach().flatten() for p in ema.parameters()])
    # `.ci/cpu-variation` measured at most 1.8e-7 (weights) and 6e-8 (losses) across CPU kernels
    torch.testing.assert_close(flat, torch.tensor(want["model"]), rtol=0, atol=5e-6)
    torch.testing.assert_close(flat_ema, torch.tensor(want["ema"]), rtol=0, atol=5e-6)
    np.testing.assert_allclose(losses, want["loss"], rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------------
# Data that does not fit the model


def _fake_ds(**kw):
    base = dict(
        root="feats/x",
        space="pixel",
        z_shape=(3, 8, 8),
        conditioning="class",
        num_classes=4,
        manifest={"context_shape": None},
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "ds, match",
    [
        (_fake_ds(space="latent", z_shape=(4, 1, 1)), "latent shards but the preset trains on pixel"),
        (_fake_ds(z_shape=(3, 16, 16)), r"shape \(3, 16, 16\) but the model takes \(3, 8, 8\)"),
        (
            _fake_ds(num_classes=10),
            "10 classes plus the CFG null class, so model.num_classes must be 11, not 5",
        ),
        (_fake_ds(conditioning="none"), "no class labels"),
    ],
)
def test_data_that_does_not_fit_is_refused_in_one_line(ds, match):
    with pytest.raises(DataError, match=match) as e:
        check_data_fits(tiny_preset("x"), ds)
    assert "\n" not in str(e.value)


def test_text_context_width_is_checked():
    p = tiny_preset("x").model_dump()
    p["model"].update(num_classes=-1, clip_dim=16, num_clip_token=5)
    p["text_encoder"] = {"kind": "toy", "pretrained": "toy"}
    p = preset_from_dict(p)
    ds = _fake_ds(conditioning="text", manifest={"context_shape": [5, 32]})
    with pytest.raises(DataError, match=r"contexts of shape \(5, 32\) but the model takes \(5, 16\)"):
        check_data_fits(p, ds)
    check_data_fits(p, _fake_ds(conditioning="text", manifest={"context_shape": [5, 16]}))
    uncond = tiny_preset("x").model_dump()
    uncond["model"]["num_classes"] = -1
    with pytest.raises(ConfigError, match="p_uncond"):
        check_data_fits(preset_from_dict(uncond), _fake_ds())


# --------------------------------------------------------------------------------------------------
# Training runs


def test_short_cpu_run_loss_falls_and_writes_the_run_dir(shards, tmp_path):
    preset = tiny_preset(
        shards, steps=40, batch_size=16, lr=3e-3, warmup_steps=0, save_interval=20, sample_interval=40
    )
    events = []
    res = train(preset, tmp_path / "run", on_event=events.append)
    run = tmp_path / "run"
    assert res.step == 40 and res.checkpoint == run / "ckpts" / "00000040"
    losses = [loss for _, loss in _losses(run)]
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)
    assert (run / "preset.toml").read_text() == preset.to_toml()
    assert (run / "ckpts" / "latest").read_text().strip() == "00000040"
    assert (run / "samples" / "00000040.png").is_file()
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("checkpoint") == 2
    # Rerunning the finished command is a no-op that says so.
    again = train(preset, run, on_event=events.append)
    assert again.step == 40 and "nothing to do" in events[-1].message


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from uvit_cli.config import load_preset
    from uvit_cli.train import train

    kill_at = int(sys.argv[3])

    def on_event(e):
        if e.kind == "log" and e.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final checkpoint

    train(load_preset(sys.argv[1]), sys.argv[2], on_event=on_event)
    """
)


def test_exact_resume_after_a_killed_process(shards, tmp_path):
    k = 3
    preset = tiny_preset(shards, steps=2 * k, save_interval=k)
    straight = tmp_path / "straight"
    train(preset, straight)

    killed = tmp_path / "killed"
    toml = tmp_path / "tiny.toml"
    toml.write_text(preset.to_toml())
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(toml), str(killed), str(k + 2)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "ckpts").iterdir() if not p.name.startswith(".")) == [
        "00000003",
        "latest",
    ]
    assert [s for s, _ in _losses(killed)] == [1, 2, 3, 4, 5]  # logged past the checkpoint, then killed

    events = []
    train(preset, killed, on_event=events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("took over a stale lock" in m and "that process is gone" in m for m in warnings), warnings
    assert "resuming from 00000003" in next(e.message for e in events if e.kind == "start")
    assert _losses(killed) == _losses(straight)  # identical floats, steps 1..6 once each
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _weights(straight, 2 * k, name), _weights(killed, 2 * k, name)
        assert all(torch.equal(a[key], b[key]) for key in a), name
    sa = torch.load(straight / "ckpts" / "00000006" / "state.pt", weights_only=True)
    sb = torch.load(killed / "ckpts" / "00000006" / "state.pt", weights_only=True)
    assert sa["data"] == sb["data"] and sa["lr_scheduler"] == sb["lr_scheduler"]
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], sb["optimizer"]["state"][pid]["exp_avg_sq"])


INTERRUPTER = textwrap.dedent(
    """
    import os, signal, sys
    from uvit_cli.config import load_preset
    from uvit_cli.train import train

    at, sig = int(sys.argv[3]), getattr(signal, sys.argv[4])

    def on_event(e):
        if e.kind in ("log", "checkpoint"):  # not warnings: whether the loader's is due depends on timing
            print(e.kind, e.step, flush=True)
        if e.kind == "log" and e.step == at:
            # Sent from the loop itself, at a known step: delivered to this (main) thread before os.kill
            # returns, so the handler has run before the next step begins, however loaded the machine.
            os.kill(os.getpid(), sig)  # as Ctrl-C or a scheduler's SIGTERM would

    result = train(load_preset(sys.argv[1]), sys.argv[2], on_event=on_event)
    print("stopped", result.stopped, result.step, result.checkpoint.name, flush=True)
    """
)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_at_the_step_boundary_and_resumes_exactly(shards, tmp_path, sig):
    preset = tiny_preset(shards, steps=8, save_interval=100)  # no regular checkpoint before the end
    straight = tmp_path / "straight"
    train(preset, straight)
    run, toml = tmp_path / "run", tmp_path / "tiny.toml"
    toml.write_text(preset.to_toml())
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTER, str(toml), str(run), "3", sig],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the step in flight finished, then it saved there and returned, naming the signal (no done event)
    assert proc.stdout.splitlines()[-3:] == ["log 4", "checkpoint 4", f"stopped {sig} 4 00000004"], (
        proc.stdout
    )
    assert (run / "ckpts" / "latest").read_text().strip() == "00000004"
    events = []
    train(preset, run, on_event=events.append)
    assert "resuming from 00000004" in next(e.message for e in events if e.kind == "start")
    assert _losses(run) == _losses(straight)
    a, b = _weights(straight, 8, "ema.safetensors"), _weights(run, 8, "ema.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def _due_as_the_loop_read_it(step, log, save, grid, ev, end, stopping):
    """The seven modulo tests the loop's tail wrote inline, as (log, save, grid, eval, report, forced)."""
    saving = step % save == 0 or step == end or stopping
    evaluating = ev is not None and (step % ev == 0 or step == end) and not stopping
    report = step % log == 0 or saving or evaluating
    forced = evaluating or step % grid == 0 or step == end or stopping
    return (step % log == 0 or saving, saving, step % grid == 0, evaluating, report, forced)


@pytest.mark.parametrize("ev", [None, 5])
def test_what_is_due_after_each_step_is_computed_once(ev):
    from uvit_cli.train.observers import Intervals
    from uvit_cli.train.stop import StopRequest

    every = Intervals(log=2, save=3, grid=4, eval=ev, end_step=11)
    stop = StopRequest(world=1, device=torch.device("cpu"))
    for step in range(1, 12):
        if step == 9:
            stop.signal = 15  # SIGTERM arrives during step 9: one process stops there
        due = every.due(step, stop)
        got = (due.log, due.save, due.grid, due.eval, due.report, due.report_now)
        assert got == _due_as_the_loop_read_it(step, 2, 3, 4, ev, 11, step >= 9), step
        assert due.stop == (step >= 9) and due.pause == (due.save or due.grid or due.eval)
    assert stop.reason == "SIGTERM"


def test_ranks_agree_on_a_stop_at_log_steps_only(tmp_path):
    from uvit_cli.train.stop import StopRequest

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        stop = StopRequest(
            world=2, device=torch.device("cpu")
        )  # as one of two ranks: every check all-reduces
        assert not stop.agreed(at_log_step=True)
        stop.signal = 2
        assert not stop.agreed(at_log_step=False) and stop.reason is None  # no collective between logs
        assert stop.agreed(at_log_step=True) and stop.reason == "SIGINT"
    finally:
        torch.distributed.destroy_process_group()


def test_stop_handlers_are_installed_for_the_loop_and_restored_however_it_ends():
    import signal

    from uvit_cli.train.stop import stop_requests

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_requests(1, torch.device("cpu")) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle == signal.getsignal(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the first asks for a clean stop
        assert stop.signal == signal.SIGTERM and stop.agreed(at_log_step=False)
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(KeyboardInterrupt), stop_requests(1, torch.device("cpu")):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second gives up on it
    assert {s: signal.getsignal(s) for s in before} == before


def test_accumulation_matches_the_full_batch(shards, tmp_path):
    preset = tiny_preset(shards, steps=2, save_interval=2)
    train(preset, tmp_path / "full")
    train(preset, tmp_path / "accum", batch_per_gpu=2)  # 4 micro-batches of 2
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-5)
    wa, wb = (
        _weights(tmp_path / "full", 2, "model.safetensors"),
        _weights(tmp_path / "accum", 2, "model.safetensors"),
    )
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="does not divide"):
        train(preset, tmp_path / "bad", batch_per_gpu=3)


# --------------------------------------------------------------------------------------------------
# CLI: one line per problem


def _cli(args):
    from uvit_cli.cli import app

    return CliRunner().invoke(app, ["train", *args])


def _error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error:")]) == 1, res.output
    assert "Traceback" not in res.output
    return next(line for line in lines if line.startswith("error:"))


def test_cli_errors_are_one_line(shards, tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_preset(shards, steps=1, save_interval=1).to_toml())

    res = _cli([str(toml), "--run-dir", str(tmp_path / "r0"), "--set", f"data.path={tmp_path / 'missing'}"])
    assert res.exit_code == 2 and "prepare the data first" in _error_line(res)
    assert not (tmp_path / "r0").exists()  # nothing created for a run that cannot start

    res = _cli([str(toml), "--run-dir", str(tmp_path / "r1"), "--set", "model.img_size=16"])
    assert res.exit_code == 2 and "but the model takes (3, 16, 16)" in _error_line(res)

    res = _cli([str(toml), "--run-dir", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    res = _cli([str(toml), "--run-dir", str(tmp_path / "r2"), "--set", "train.weight_decay=0.5"])
    assert res.exit_code == 2 and "created by a different preset (train.weight_decay: 0.03 -> 0.5)" in (
        _error_line(res)
    )
    res = _cli(
        [
            str(toml),
            "--run-dir",
            str(tmp_path / "r2"),
            "--set",
            "train.weight_decay=0.5",
            "--set",
            "train.lr=1e-2",
            "--set",
            "train.steps=2",
            "--force",
        ]
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "r2").glob("preset.*.toml"))) == 1  # the old preset is kept
    assert [m["lr"] for m in read_metrics(tmp_path / "r2")] == [0.0, 0.01 * 1 / 2]  # the new lr applies

    res = _cli([str(toml), "--run-dir", str(tmp_path / "r3"), "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
                "--set", "train.steps=5"])  # fmt: skip
    assert res.exit_code == 3 and "loss became" in _error_line(res)
    assert "the last good checkpoint is" in res.output
    assert (tmp_path / "r3" / "ckpts" / "latest").read_text().strip() == "00000001"


def test_corrupt_checkpoint_falls_back_to_the_previous_one(shards, tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_preset(shards, steps=2, save_interval=1, keep_last=3).to_toml())
    run = tmp_path / "run"
    assert _cli([str(toml), "--run-dir", str(run)]).exit_code == 0
    (run / "ckpts" / "00000002" / "model.safetensors").write_bytes(b"\x01\x02 truncated")
    res = _cli([str(toml), "--run-dir", str(run), "--set", "train.steps=3"])
    assert res.exit_code == 0, res.output
    assert "checkpoint 00000002 is unreadable" in res.output and "trying the previous one" in res.output
    assert "resuming from 00000001" in res.output
    assert [s for s, _ in _losses(run)] == [1, 2, 3]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_latent_text_run_without_vae_warns_once_and_trains(tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    moments = np.concatenate([rng.normal(size=(n, 4, 4, 4)), rng.normal(-2, 0.5, size=(n, 4, 4, 4))], axis=1)
    contexts = [rng.normal(size=(1 + i % 3, 5, 16)).astype(np.float32) for i in range(n)]
    root = data.write_arrays(
        tmp_path / "lat",
        moments,
        space="latent",
        contexts=contexts,
        empty_context=np.zeros((5, 16), np.float32),
    )
    p = tiny_preset(root, steps=3, batch_size=4, save_interval=3, sample_interval=1).model_dump()
    p["model"].update(in_chans=4, img_size=4, num_classes=-1, clip_dim=16, num_clip_token=5)
    p["data"].update(space="latent", random_flip=False)
    p["autoencoder"] = {"pretrained": str(tmp_path / "no_such_vae.pth"), "scale_factor": 0.23010}
    p["text_encoder"] = {"kind": "toy", "pretrained": "toy"}
    events = []
    res = train(preset_from_dict(p), tmp_path / "run", on_event=events.append)
    assert res.step == 3 and np.isfinite(res.loss)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "no sample grids" in warnings[0]
    assert not (tmp_path / "run" / "samples").exists()


def test_the_unfused_optimiser_equals_the_per_parameter_adamw_bit_for_bit():
    """build_optimizer's foreach AdamW (fast on the CPU) is torch's plain AdamW loop, to the last bit."""
    from uvit_cli.train.step import build_optimizer

    torch.manual_seed(0)
    shapes = [(64, 3, 4, 4), (64,), (192, 64), (256, 64), (1, 29, 64)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, sched = build_optimizer(ours, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.03, warmup_steps=3)
    assert opt.defaults["foreach"] is True
    ref = torch.optim.AdamW(plain, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.03, eps=1e-8, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: min(s / 3, 1.0))
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        for a, b in zip(ours, plain):
            a.grad = torch.randn(a.shape, generator=g) * (1 + i % 3)
            b.grad = a.grad.clone()
        opt.step(), ref.step(), sched.step(), ref_sched.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))  # fused=True differs by ~1e-7 here
