"""`uvit sample`: per-image seeds, resume, official checkpoints, guidance, decoding, outputs, bad input.

Tiny seeded U-ViTs (text/latent and class/pixel) and tiny encoders saved in their real file formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_fixtures import class_toml, save_tiny_encoders, save_tiny_uvit, t2i_toml
from typer.testing import CliRunner

from uvit_cli import solvers
from uvit_cli.checkpoint import save_weights
from uvit_cli.cli import app
from uvit_cli.config import load_preset
from uvit_cli.errors import UvitError
from uvit_cli.model import UViT
from uvit_cli.sample import (
    SampleOptions,
    SamplerSpec,
    SampleSettings,
    class_conditions,
    context_conditions,
    decode_latents,
    generate,
    image_generators,
    null_condition,
    sample_latents,
    sample_to_dir,
    to_uint8,
)
from uvit_cli.schedule import make_schedule

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Preset files, a seeded model of each, and the tiny VAE / CLIP written in their real formats."""
    d = tmp_path_factory.mktemp("sample_env")
    (d / "tiny_t2i_deep.toml").write_text(t2i_toml("tiny_t2i_deep", depth=4))
    t2i, t2i_model = save_tiny_uvit(t2i_toml(), d / "tiny_t2i.toml", d / "nnet_ema.pth", seed=1)
    cls, cls_model = save_tiny_uvit(
        class_toml(steps=4), d / "tiny_class.toml", d / "cls" / "nnet_ema.pth", seed=2
    )
    vae, clip = save_tiny_encoders(d / "autoencoder_kl.pth", d / "clip", vae_seed=3, clip_seed=4)
    return dict(dir=d, t2i=t2i, cls=cls, t2i_model=t2i_model, cls_model=cls_model, vae=vae, clip=clip)


def _pngs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))}


def _sample(out, *, prompts=(), classes=(), n=4, clip=None, grid=False, npz=False, progress=None, **spec):
    """`sample_to_dir` with the SamplerSpec of `spec` (ckpt, preset, seed, settings, vae, ...)."""
    return sample_to_dir(
        out, SamplerSpec(**spec), prompts=prompts, classes=classes, n=n, clip=clip, grid=grid, npz=npz,
        progress=progress,
    )  # fmt: skip


def _run(env, out, **kw):
    d = env["dir"]
    args = dict(
        out=out,
        preset=d / "tiny_t2i.toml",
        ckpt=d / "nnet_ema.pth",
        prompts=["a red cube", "a blue ball"],
        n=3,
        seed=7,
        vae=str(d / "autoencoder_kl.pth"),
        clip=str(d / "clip"),
    )
    args.update(kw)
    return _sample(**args)


def _one_line_error(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Seeds and batching


def test_images_do_not_depend_on_batch_size(env, tmp_path):
    p, m = env["t2i"], env["t2i_model"]
    ctx = _contexts(env, ["a red cube", "a blue ball", ""])
    cond, unc = context_conditions(ctx, [0, 0, 1, 1]), null_condition(p.model, ctx[2:])
    # the network + solver output is the same for batch sizes 1 and 3 (per-image noise): bitwise with
    # AVX-512 kernels; with AVX2 or plain ones the GEMM blocking depends on the batch size (1.3e-5 of 63)
    z1 = torch.cat([sample_latents(m, p, [i], cond, unc, seed=7) for i in range(4)])
    z3 = torch.cat([sample_latents(m, p, b, cond, unc, seed=7) for b in ([0, 1, 2], [3])])
    torch.testing.assert_close(z1, z3, rtol=0, atol=1e-3)
    assert (z1[0] - z1[1]).abs().max() > 0.1

    # images: equal when the VAE decodes image by image (--decode-batch-size 1): bitwise where the
    # latents are; the latents' last-bit differences above could move a pixel across a rounding step ...
    vae = env["vae"]
    vae.scale_factor = p.autoencoder.scale_factor

    def images(**kw):
        s = SampleSettings.from_preset(p, SampleOptions(**kw))
        return np.concatenate(
            [b for _, b in generate(m, p, range(3), cond, unc, seed=7, autoencoder=vae, settings=s)]
        )

    a, b = images(batch_size=1), images(batch_size=2, decode_batch_size=1)
    assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 1e-3
    assert not np.array_equal(a[0], a[1]) and a[0].std() > 1
    # ... and within one 8-bit level when batched decoding picks other conv kernels (float rounding)
    diff = np.abs(images(batch_size=3).astype(int) - a.astype(int))  # one batch of 3
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_stochastic_solver_noise_is_per_image(env):
    """Euler–Maruyama draws fresh noise every step: still the same image for batch 1 and batch 3."""
    p, m = env["cls"], env["cls_model"]
    cond, unc = class_conditions([3, 5, 5, 1]), null_condition(p.model)

    def images(batch_size: int) -> np.ndarray:
        settings = SampleSettings.from_preset(p, SampleOptions(batch_size=batch_size))
        return np.concatenate([b for _, b in generate(m, p, range(4), cond, unc, seed=1, settings=settings)])

    one, three = images(1), images(3)
    np.testing.assert_array_equal(np.stack(one), three)
    other_seed = np.concatenate([b for _, b in generate(m, p, range(4), cond, unc, seed=2)])
    assert not np.array_equal(three, other_seed)
    # a subset of indices (another rank, or a resumed run) gives the same images for those indices
    sub = next(generate(m, p, [2, 3], cond, unc, seed=1))[1]
    np.testing.assert_array_equal(sub, three[2:])


def test_interrupted_then_resumed_run_is_identical(env, tmp_path):
    d = env["dir"]
    kw = dict(preset=d / "tiny_class.toml", ckpt=d / "cls" / "nnet_ema.pth", classes=[1, 4, 7], n=2, seed=3)
    _sample(out=tmp_path / "full", settings=SampleOptions(batch_size=3), **kw)  # other batches than below

    part = tmp_path / "part"

    def stop_after_two_batches(p):
        if p.done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sample(out=part, settings=SampleOptions(batch_size=2), progress=stop_after_two_batches, **kw)
    assert sorted(_pngs(part)) == [f"{i:05d}.png" for i in range(4)] and not list(part.glob(".*.tmp"))
    r = _sample(out=part, settings=SampleOptions(batch_size=3), **kw)
    assert (r.skipped, r.written) == (4, 2)
    a, b = _pngs(tmp_path / "full"), _pngs(part)
    assert sorted(a) == sorted(b) == [f"{i:05d}.png" for i in range(6)]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not np.array_equal(a["00000.png"], a["00001.png"])
    again = _sample(out=part, **kw)
    assert (again.skipped, again.written) == (6, 0)
    # resuming with other settings would mix images: refused
    with pytest.raises(UvitError, match="different settings"):
        _sample(out=part, settings=SampleOptions(cfg_scale=3.0), **kw)


# --------------------------------------------------------------------------------------------------
# Guidance and decoding


def _contexts(env, prompts):
    return env["clip"].encode(prompts)


def test_cfg_scale_zero_equals_the_conditional_model(env):
    p, m = env["t2i"], env["t2i_model"]
    ctx = _contexts(env, ["a red cube", "a blue ball"])
    cond = context_conditions(ctx, [0, 1, 1])
    idx = [0, 1, 2]
    garbage = {"context": torch.randn(1, 77, 32) * 100}
    s0 = SampleSettings.from_preset(p, SampleOptions(cfg_scale=0.0))
    got = sample_latents(m, p, idx, cond, garbage, seed=3, settings=s0)

    # reference: the solver on the conditional network alone, from the same per-image noise
    x_T = torch.stack([torch.randn(4, 4, 4, generator=g) for g in image_generators(3, idx)])
    eps_fn = lambda x, t: m(x, t, context=ctx[[0, 1, 1]])  # noqa: E731
    ref = solvers.sample("dpm_solver_pp", eps_fn, x_T, 2, schedule=make_schedule("discrete"))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)

    # scale s: eps_c + s (eps_c - eps_u) with the empty context, as two separate passes (spec §4.2)
    uncond = null_condition(p.model, _contexts(env, [""]))
    s1 = SampleSettings.from_preset(p, SampleOptions(cfg_scale=1.5))
    guided = sample_latents(m, p, idx, cond, uncond, seed=3, settings=s1)
    empty = uncond["context"].expand(3, -1, -1)

    def two_pass(x, t):
        e_c, e_u = m(x, t, context=ctx[[0, 1, 1]]), m(x, t, context=empty)
        return e_c + 1.5 * (e_c - e_u)

    ref_g = solvers.sample("dpm_solver_pp", two_pass, x_T, 2, schedule=make_schedule("discrete"))
    torch.testing.assert_close(guided, ref_g, rtol=1e-4, atol=1e-4)
    assert (guided - got).abs().max() > 1e-2  # guidance does something


def test_decoding_uses_the_presets_scale_factor(env, tmp_path):
    p, m = env["t2i"], env["t2i_model"]
    assert p.autoencoder.scale_factor == 0.5
    _run(env, tmp_path / "o", prompts=["a red cube"], n=2, settings=SampleOptions(cfg_scale=0.0))
    got = np.stack(list(_pngs(tmp_path / "o").values()))

    ctx = _contexts(env, ["a red cube"])
    z = sample_latents(
        m,
        p,
        [0, 1],
        context_conditions(ctx, [0, 0]),
        seed=7,
        settings=SampleSettings.from_preset(p, SampleOptions(cfg_scale=0.0)),
    )
    vae = env["vae"]
    with torch.no_grad():
        right = to_uint8(vae.decoder(vae.post_quant_conv(z / 0.5)))
        wrong = to_uint8(vae.decoder(vae.post_quant_conv(z / 0.18215)))  # sample_t2i_discrete.py's bug (§9.1)
    np.testing.assert_array_equal(got, right)
    assert np.abs(got.astype(int) - wrong.astype(int)).max() > 10
    # chunked decoding equals one call
    vae.scale_factor = 0.5
    torch.testing.assert_close(
        decode_latents(vae, z, chunk=1), decode_latents(vae, z, chunk=50), rtol=1e-5, atol=1e-5
    )


def test_to_uint8_matches_save_image_rounding():
    v = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 2 * (100.4 / 255) - 1, 2 * (100.6 / 255) - 1]).reshape(
        1, 1, 1, 7
    )
    v = v.expand(1, 3, 1, 7)
    assert to_uint8(v)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 100, 101]


def test_pngs_equal_the_official_unpreprocess_and_save_image(tmp_path):
    # The official eval scripts: dataset.unpreprocess (clamp(0.5 (v + 1), 0, 1)) then torchvision save_image
    # per image (utils.sample2dir). Every uint8 level's edge, out-of-range values and random values.
    save_image = pytest.importorskip("torchvision.utils").save_image
    from uvit_cli.sample.outputs import png_name, write_png

    edges = (torch.arange(256.0) + 0.5) / 255 * 2 - 1  # exactly where x * 255 + 0.5 crosses an integer
    v = torch.cat([edges, edges - 1e-6, edges + 1e-6, torch.tensor([-3.0, -1.0, 1.0, 3.0])])
    v = torch.cat([v, torch.randn(3 * 32 * 32 - v.numel(), generator=torch.Generator().manual_seed(0)) * 1.5])
    images = v.reshape(1, 3, 32, 32)
    write_png(tmp_path, 0, to_uint8(images)[0])
    save_image((0.5 * (images[0] + 1.0)).clamp(0.0, 1.0), tmp_path / "official.png")
    ours = np.asarray(Image.open(tmp_path / png_name(0)))
    np.testing.assert_array_equal(ours, np.asarray(Image.open(tmp_path / "official.png")))


# --------------------------------------------------------------------------------------------------
# The CLI: official checkpoints, our checkpoints, outputs


def test_official_checkpoint_samples_through_the_cli(env, tmp_path):
    d, out = env["dir"], tmp_path / "cli"
    args = ["sample", "--ckpt", str(d / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i.toml"),
            "--prompt", "a calico cat wearing a tie", "--n", "3", "--out", str(out), "--vae", str(d / "autoencoder_kl.pth"),
            "--clip", str(d / "clip"), "--steps", "2", "--no-compile", "--grid", "--npz", "--seed", "5"]  # fmt: skip
    r = runner.invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "EMA weights" in r.output and "nnet_ema.pth" in r.output
    assert f"3 images in {out} (3 new, 0 already there)" in r.output and "2 steps, cfg 1, seed 5" in r.output
    pngs = _pngs(out)
    assert sorted(pngs) == ["00000.png", "00001.png", "00002.png"]
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(arr, np.stack(list(pngs.values())))
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 2x2 tiles of 32 px, 2 px padding
    np.testing.assert_array_equal(grid[2:34, 36:68], pngs["00001.png"])
    recs = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert recs[0]["prompt"] == "a calico cat wearing a tie" and recs[0]["seed"] == 5
    assert recs[0]["settings"]["steps"] == 2 and recs[0]["settings"]["cfg_scale"] == 1.0


def test_our_checkpoint_from_the_default_run_dir(env, tmp_path, monkeypatch):
    d = env["dir"]
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "runs" / "tiny_class" / "ckpts" / "00000010"
    step.mkdir(parents=True)
    m = env["cls_model"]
    save_weights(step / "ema.safetensors", m.state_dict(), env["cls"], 10, "ema")
    other = {k: v + 0.05 for k, v in m.state_dict().items()}
    save_weights(step / "model.safetensors", other, env["cls"], 10, "model")
    (tmp_path / "runs" / "tiny_class" / "ckpts" / "latest").write_text("00000010")
    base = ["sample", "--preset", str(d / "tiny_class.toml"), "--class", "3", "--n", "2", "--no-compile"]
    r = runner.invoke(app, [*base, "--out", "ema"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "EMA weights" in r.output and "step 10" in r.output
    r = runner.invoke(app, [*base, "--out", "online", "--model-weights", "model"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "online (non-EMA) weights" in r.output
    assert not np.array_equal(
        np.stack(list(_pngs(tmp_path / "ema").values())), np.stack(list(_pngs(tmp_path / "online").values()))
    )
    # the embedded preset's pixel images, 8 px, no VAE needed
    assert np.asarray(Image.open(tmp_path / "ema" / "00000.png")).shape == (8, 8, 3)
    # the folder belongs to its weights: the other choice is refused, not counted as "0 new"
    line = _one_line_error(runner.invoke(app, [*base, "--out", "ema", "--model-weights", "model"]))
    assert "different checkpoint_sha256, weights" in line and "another --out" in line


def _fake_run(root, name, preset, model, mtime):
    step = root / "runs" / name / "ckpts" / "00000010"
    step.mkdir(parents=True)
    save_weights(step / "ema.safetensors", model.state_dict(), preset, 10, "ema")
    (step.parent / "latest").write_text("00000010")
    (root / "runs" / name / "preset.toml").write_text(preset.to_toml())
    os.utime(step, (mtime, mtime))


def test_without_ckpt_or_preset_the_run_that_fits_is_used_and_named(env, tmp_path, monkeypatch):
    from uvit_cli.errors import CheckpointError
    from uvit_cli.sample import pick_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no text-to-image run with a checkpoint in runs/"):
        pick_run(True)
    _fake_run(tmp_path, "cls_old", env["cls"], env["cls_model"], 1_000)
    _fake_run(tmp_path, "cls_new", env["cls"], env["cls_model"], 2_000)
    _fake_run(tmp_path, "t2i", env["t2i"], env["t2i_model"], 500)
    assert pick_run(True) == (Path("runs/t2i"), "the only text-to-image run in runs/")
    run, why = pick_run(False)
    assert run == Path("runs/cls_new") and "most recently updated" in why and "runs/cls_old" in why
    assert pick_run(None)[0] == Path("runs/cls_new")
    r = runner.invoke(
        app, ["sample", "--class", "3", "--n", "1", "--no-compile", "--out", "s"], terminal_width=200
    )
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].startswith("using runs/cls_new: the most recently updated")


def test_a_folder_made_with_another_checkpoint_is_refused(env, tmp_path):
    d = env["dir"]
    kw = dict(preset=d / "tiny_class.toml", classes=[2], n=2, seed=1)
    _sample(out=tmp_path / "s", ckpt=d / "cls" / "nnet_ema.pth", **kw)
    before = (tmp_path / "s" / "samples.jsonl").read_bytes()
    (tmp_path / "b").mkdir()
    other = {k: v + 0.01 for k, v in env["cls_model"].state_dict().items()}
    torch.save(other, tmp_path / "b" / "nnet_ema.pth")
    with pytest.raises(UvitError, match="different checkpoint_sha256"):
        _sample(out=tmp_path / "s", ckpt=tmp_path / "b" / "nnet_ema.pth", **kw)
    assert (tmp_path / "s" / "samples.jsonl").read_bytes() == before  # old images keep their labels
    rec = json.loads(before.splitlines()[0])
    assert len(rec["checkpoint_sha256"]) == 64 and rec["weights"] == "ema"


def test_a_truncated_png_is_made_again(env, tmp_path):
    d = env["dir"]
    kw = dict(preset=d / "tiny_class.toml", ckpt=d / "cls" / "nnet_ema.pth", classes=[2, 5], n=2, seed=1)
    _sample(out=tmp_path / "s", **kw)
    want = _pngs(tmp_path / "s")
    png = tmp_path / "s" / "00001.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # cut short outside our atomic writer
    (tmp_path / "s" / "00002.png").write_bytes(b"")
    r = _sample(out=tmp_path / "s", grid=True, **kw)
    assert (r.skipped, r.written) == (2, 2)
    got = _pngs(tmp_path / "s")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert (tmp_path / "s" / "grid.png").is_file()


def test_files_that_are_not_utf8_are_one_line(env, tmp_path):
    d = env["dir"]
    (tmp_path / "prompts.txt").write_bytes(b"a red cube\n\xff\xfe caf\xe9\n")
    args = ["sample", "--ckpt", str(d / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i.toml"), "--out",
            str(tmp_path / "o"), "--vae", str(d / "autoencoder_kl.pth"), "--clip", str(d / "clip")]  # fmt: skip
    line = _one_line_error(runner.invoke(app, [*args, "--prompts-file", str(tmp_path / "prompts.txt")]))
    assert "not UTF-8" in line and "prompts.txt" in line
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "samples.jsonl").write_bytes(b'{"index": 0, "file": "\xff"}\n')
    line = _one_line_error(runner.invoke(app, [*args, "--prompt", "x", "--n", "1"]))
    assert "samples.jsonl:1: not a samples.jsonl record" in line


# --------------------------------------------------------------------------------------------------
# Bad input: one line each


def test_bad_input_is_one_line(env, tmp_path, monkeypatch):
    d = env["dir"]
    t2i = ["sample", "--ckpt", str(d / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i.toml"), "--n", "1",
           "--steps", "1", "--vae", str(d / "autoencoder_kl.pth"), "--clip", str(d / "clip")]  # fmt: skip

    # a checkpoint that does not fit the preset names the keys
    line = _one_line_error(
        runner.invoke(
            app,
            [*t2i, "--preset", str(d / "tiny_t2i_deep.toml"), "--prompt", "x", "--out", str(tmp_path / "a")],
        )
    )
    assert "missing" in line and "in_blocks.1" in line

    # --out not writable
    (tmp_path / "file").write_text("")
    line = _one_line_error(
        runner.invoke(app, [*t2i, "--prompt", "x", "--out", str(tmp_path / "file" / "sub")])
    )
    assert "not writable" in line

    # missing VAE weights: the encoders' resolution message
    line = _one_line_error(
        runner.invoke(
            app, [*t2i, "--prompt", "x", "--out", str(tmp_path / "b"), "--vae", str(tmp_path / "nope.pth")]
        )
    )
    assert "autoencoder weights not found" in line and "--vae" in line

    # unknown class index
    cls = ["sample", "--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "tiny_class.toml")]
    cls += ["--out", str(tmp_path / "c")]
    line = _one_line_error(runner.invoke(app, [*cls, "--class", "10"]))
    assert "unknown class 10" in line and "null class" in line

    # no checkpoint anywhere: how to get one
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(
        runner.invoke(app, ["sample", "--preset", str(d / "tiny_t2i.toml"), "--prompt", "x"])
    )
    assert "uvit train tiny_t2i" in line and "nnet_ema.pth" in line and "baofff/U-ViT" in line
    line = _one_line_error(runner.invoke(app, ["sample", "--preset", "shapes_uvit_tiny", "--prompt", "x"]))
    assert "uvit quickstart" in line and "--ckpt quickstart/run" in line and "nnet_ema.pth" not in line


def test_long_prompt_is_truncated_with_a_warning(env, tmp_path):
    d = env["dir"]
    long = " ".join(["cat"] * 100)
    (tmp_path / "prompts.txt").write_text("a dog\n\n  a bird  \n")
    args = ["sample", "--ckpt", str(d / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i.toml"), "--prompt", long,
            "--n", "1", "--steps", "1", "--out", str(tmp_path / "o"), "--vae", str(d / "autoencoder_kl.pth"),
            "--clip", str(d / "clip")]  # fmt: skip
    r = runner.invoke(app, args, terminal_width=300)
    assert r.exit_code == 0, r.output
    assert "truncated" in r.output and (tmp_path / "o" / "00000.png").is_file()
    r = runner.invoke(
        app, [*args, "--prompts-file", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "f")]
    )
    assert r.exit_code == 0, r.output
    recs = [json.loads(ln) for ln in (tmp_path / "f" / "samples.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in recs] == [long, "a dog", "a bird"]


@pytest.mark.gpu
def test_cuda_fast_path_matches_fp32(env):
    """bf16 autocast + torch.compile (+ CUDA graphs) on CUDA stay close to the fp32 eager images."""
    p, m = env["cls"], env["cls_model"].to("cuda")
    cond, unc = class_conditions([3, 5, 5, 1, 2]), null_condition(p.model)
    s = dict(solver="dpm_solver_pp", steps=6, batch_size=2)

    def run(**kw):
        settings = SampleSettings.from_preset(p, SampleOptions(**s, **kw))
        return np.concatenate([b for _, b in generate(m, p, range(5), cond, unc, seed=1, settings=settings)])

    ref = run(precision="fp32").astype(int)
    for kw in (
        dict(precision="bf16"),
        dict(precision="bf16", compile=True),
        dict(precision="bf16", cuda_graphs=True),
    ):
        diff = np.abs(run(**kw).astype(int) - ref)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12, (kw, diff.mean())
    env["cls_model"].to("cpu")


def test_toy_text_preset_samples_through_the_cli(tmp_path):
    """`uvit sample` builds the preset's toy text encoder (shapes quickstart): no CLIP weights needed, and the
    context it feeds equals `toy_text_encoder().encode` of the prompt."""
    from uvit_cli.shapes.text import toy_text_encoder

    p = load_preset("shapes_uvit_tiny", ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"])
    torch.manual_seed(0)
    model = UViT(**p.model.model_dump()).eval()
    ckpt = tmp_path / "ema.safetensors"
    save_weights(ckpt, model.state_dict(), p, step=1, weights="ema")
    out = tmp_path / "toy"
    args = ["sample", "--ckpt", str(ckpt), "--prompt", "a red circle at the top left", "--n", "2",
            "--steps", "3", "--cfg-scale", "1.0", "--no-compile", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    got = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(2)])

    enc = toy_text_encoder()
    settings = SampleSettings.from_preset(p, SampleOptions(steps=3, cfg_scale=1.0))
    ctx = enc.encode(["a red circle at the top left"])
    batches = list(generate(model, p, [0, 1], context_conditions(ctx, {0: 0, 1: 0}),
                            null_condition(p.model, enc.encode([""])), settings=settings))  # fmt: skip
    assert np.array_equal(got, batches[0][1])


def test_the_presets_pretrained_values_are_read_after_flag_and_env(env, tmp_path, monkeypatch):
    for var in ("UVIT_VAE", "UVIT_CLIP"):
        monkeypatch.delenv(var, raising=False)
    d = env["dir"]
    base = (d / "tiny_t2i.toml").read_text()

    def preset_with(vae: str, clip: str) -> Path:
        p = tmp_path / f"p{len(list(tmp_path.glob('p*.toml')))}.toml"
        text = base.replace("scale_factor = 0.5", f'scale_factor = 0.5\npretrained = "{vae}"')
        p.write_text(text.replace('kind = "clip"', f'kind = "clip"\npretrained = "{clip}"'))
        return p

    flags = _run(env, tmp_path / "flags")
    # no flag, no variable: the preset's values (a file and a directory) are what sample loads
    _run(
        env,
        tmp_path / "preset",
        preset=preset_with(d / "autoencoder_kl.pth", d / "clip"),
        vae=None,
        clip=None,
    )
    a, b = _pngs(tmp_path / "flags"), _pngs(tmp_path / "preset")
    assert sorted(a) == sorted(b) and len(a) == flags.written
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    missing = preset_with(tmp_path / "no_vae.pth", tmp_path / "no_clip")
    with pytest.raises(UvitError, match="the preset's pretrained"):  # a given path never falls back
        _run(env, tmp_path / "x", preset=missing, vae=None, clip=None)
    _run(env, tmp_path / "flag_wins", preset=missing)  # the flags beat the preset
    monkeypatch.setenv("UVIT_VAE", str(d / "autoencoder_kl.pth"))
    monkeypatch.setenv("UVIT_CLIP", str(d / "clip"))
    _run(env, tmp_path / "env_wins", preset=missing, vae=None, clip=None)  # so does the variable
    assert _pngs(tmp_path / "env_wins").keys() == a.keys()
