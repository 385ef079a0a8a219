"""`uvit fid --ckpt`: FID straight from a checkpoint. Tiny seeded U-ViTs saved as the paper's .pth, a seeded
stand-in feature function (the 2048-d Fréchet alone takes seconds on the CI box), and one slow end-to-end run
with the real Inception architecture and random weights."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import itertools
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_fixtures import randomize_
from test_fid import _images, _standin
from train_fixtures import TORCHRUN_2, tiny_toml
from typer.testing import CliRunner

import uvit_cli.fid.features as fid_features
from uvit_cli import dist
from uvit_cli.cli import app
from uvit_cli.config import load_preset
from uvit_cli.data import write_arrays
from uvit_cli.errors import DataError
from uvit_cli.fid import compute_fid, make_ref_stats
from uvit_cli.fid import generated as gen
from uvit_cli.fid.generated import fid_from_checkpoint, val_context_conditions
from uvit_cli.model import UViT
from uvit_cli.sample import SampleOptions, SamplerSpec, random_class_conditions

runner = CliRunner()


def class_toml(name: str, depth: int = 2) -> str:
    return tiny_toml(
        name,
        {"kind": "imagenet64", "path": "unused", "space": "pixel", "resolution": 8},
        model={"depth": depth, "num_classes": 11},
        sample={"solver": "dpm_solver_pp", "steps": 3, "cfg_scale": 0.5, "batch_size": 4, "n_samples": 5},
    )


def text_toml(path: Path) -> str:
    return tiny_toml(
        "tiny_t2i_px",
        {"kind": "coco", "path": path, "space": "pixel", "resolution": 8},
        model={"clip_dim": 8, "num_clip_token": 5},
        sample={"solver": "dpm_solver_pp", "steps": 2, "cfg_scale": 1.0, "batch_size": 4},
        text_encoder={"kind": "toy"},
    )


FEATS = {"features": _standin(), "feature_dim": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Presets, the paper's checkpoint layout (a plain state dict), text shards with and without a val split,
    and 16-d reference statistics of random images."""
    d = tmp_path_factory.mktemp("fid_gen")
    (d / "tiny_class.toml").write_text(class_toml("tiny_class"))
    (d / "tiny_class_deep.toml").write_text(class_toml("tiny_class_deep", depth=4))
    (d / "tiny_t2i_px.toml").write_text(text_toml(d / "shards"))
    cls = load_preset(d / "tiny_class.toml")
    txt = load_preset(d / "tiny_t2i_px.toml")
    (d / "cls").mkdir()
    torch.save(randomize_(UViT(**cls.model.model_dump()), seed=2).state_dict(), d / "cls" / "nnet_ema.pth")
    (d / "txt").mkdir()
    torch.save(randomize_(UViT(**txt.model.model_dump()), seed=3).state_dict(), d / "txt" / "nnet_ema.pth")

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    captions = [rng.standard_normal((k, 5, 8)).astype(np.float32) for k in (1, 2, 3, 2, 5)]
    empty = rng.standard_normal((5, 8)).astype(np.float32)
    kw = dict(contexts=captions, empty_context=empty, kind="coco", dtype="float32")
    write_arrays(d / "shards", x, split="val", items_per_shard=2, **kw)
    write_arrays(d / "train_only", x, split="train", **kw)

    _images(d / "real", 12, seed=1, size=8)
    ref = make_ref_stats(d / "real", d / "ref16.npz", **FEATS).path
    return dict(dir=d, cls=cls, txt=txt, captions=captions, empty=empty, ref=ref)


def _cls_fid(env, n=8, **spec):
    """FID of the tiny class model with the stand-in features; `spec`: SamplerSpec fields (seed 3)."""
    d = env["dir"]
    spec = SamplerSpec(ckpt=d / "cls" / "nnet_ema.pth", preset=d / "tiny_class.toml", **{"seed": 3, **spec})
    return fid_from_checkpoint(env["ref"], spec, n=n, **FEATS)


def _one_line_error(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


# --------------------------------------------------------------------------------------------------
# The number: same as FID of the PNGs `uvit sample` writes; independent of batching and ranks


def test_ckpt_fid_equals_fid_of_the_pngs_uvit_sample_writes(env, tmp_path):
    d = env["dir"]
    settings = SampleOptions(steps=3, cfg_scale=0.5, solver="dpm_solver_pp", batch_size=3)
    got = _cls_fid(env, settings=settings)

    # the same images through `uvit sample`: image i of `--class l0 --class l1 ... --n 1` has label l_i
    labels = random_class_conditions(3, 10)(range(8))["y"].tolist()
    assert set(labels) <= set(range(10)) and len(set(labels)) > 3  # uniform over the real classes, no null
    args = ["sample", "--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "tiny_class.toml"),
            "--n", "1", "--seed", "3", "--steps", "3", "--cfg-scale", "0.5", "--solver", "dpm_solver_pp",
            "--batch-size", "5", "--no-compile", "--out", str(tmp_path / "png")]  # fmt: skip
    for label in labels:
        args += ["--class", str(label)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "png" / "samples.jsonl").exists()  # a sidecar `uvit fid` must skip
    from_pngs = compute_fid(tmp_path / "png", env["ref"], batch_size=4, **FEATS)
    assert from_pngs.num_images == got.num_images == 8
    assert got.fid_raw == pytest.approx(from_pngs.fid_raw, rel=1e-6, abs=1e-9)
    assert got.fid > 0.01

    # the settings matter (the comparison above can fail): another seed, no guidance
    other_seed = _cls_fid(env, seed=4, settings=settings)
    no_cfg = _cls_fid(env, settings=dataclasses.replace(settings, cfg_scale=0.0))
    assert abs(other_seed.fid_raw - got.fid_raw) > 1e-4 and abs(no_cfg.fid_raw - got.fid_raw) > 1e-4


def _captured_stats(monkeypatch):
    """Record each run's images (as streamed to the features) and this process's statistics, where
    fid_from_generator merges them over ranks."""
    seen: list = []
    images: list = []
    stats_fn, reduce_fn = fid_features.batches_stats, fid_features.all_reduce_stats

    def batches_spy(batches, *args, **kw):
        got = [np.asarray(b) for b in batches]
        images.append(np.concatenate(got))
        return stats_fn(iter(got), *args, **kw)

    def reduce_spy(stats, device):
        seen.append(stats)
        return reduce_fn(stats, device)

    monkeypatch.setattr(fid_features, "batches_stats", batches_spy)
    monkeypatch.setattr(fid_features, "all_reduce_stats", reduce_spy)
    return seen, images


def test_batch_size_and_rank_slices_do_not_change_the_result(env, monkeypatch):
    seen, images = _captured_stats(monkeypatch)
    one = _cls_fid(env, n=7, settings=SampleOptions(batch_size=1))
    five = _cls_fid(env, n=7, settings=SampleOptions(batch_size=5))
    np.testing.assert_array_equal(images[0], images[1])  # the same 7 images, bit for bit
    assert len(np.unique(images[0].reshape(7, -1), axis=0)) == 7
    # float32 features of other batch shapes round differently: measured up to 2.6e-7 here (AVX-512, AVX2, plain
    # kernels) and 1.35e-6 on another AVX-512 machine; the tolerance is 15x that
    assert one.fid_raw == pytest.approx(five.fid_raw, rel=2e-5)
    # torchrun without processes: rank r of 3 generates indices r::3; the summed stats are the whole run's
    for r in range(3):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "world_size", lambda: 3)
        _cls_fid(env, n=7, settings=SampleOptions(batch_size=2))
    for r in range(3):
        np.testing.assert_array_equal(images[2 + r], images[0][r::3])
    whole, shards = seen[0], seen[2:]
    assert [s.n for s in shards] == [3, 2, 2]
    merged = shards[0] + shards[1] + shards[2]
    for a, b in zip(merged.mu_sigma(), whole.mu_sigma(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # batch-shape rounding: <= 4.9e-7 measured


def test_ranks_generate_a_range_of_indices_whatever_n(env, monkeypatch):
    """Rank r of w generates range(r, n, w), never a list of all n: n = 10**12 costs no memory."""
    sample_generate = importlib.import_module("uvit_cli.sample.generate")  # the package exports a `generate`

    real, seen = sample_generate.generate, []

    def first_batch(model, preset, indices, *args, **kw):
        seen.append(indices)
        return real(model, preset, itertools.islice(indices, 4), *args, **kw)

    monkeypatch.setattr(sample_generate, "generate", first_batch)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    r = _cls_fid(env, n=10**12, settings=SampleOptions(batch_size=4))
    assert seen == [range(1, 10**12, 3)] and r.num_images == 4


# --------------------------------------------------------------------------------------------------
# --classes balanced: class = index % K


def _labels_of_runs(monkeypatch) -> list:
    """The labels each run's conditions give its indices."""
    sample_generate = importlib.import_module("uvit_cli.sample.generate")  # the package exports a `generate`

    real, labels = sample_generate.generate, []

    def spy(model, preset, indices, conditions, *args, **kw):
        indices = list(indices)
        labels.append(conditions(indices)["y"].tolist())
        return real(model, preset, indices, conditions, *args, **kw)

    monkeypatch.setattr(sample_generate, "generate", spy)
    return labels


def test_balanced_labels_ignore_the_batch_size_and_name_their_protocol(
    env, tmp_path, monkeypatch, standin_cli
):
    d = env["dir"]
    _, images = _captured_stats(monkeypatch)
    labels = _labels_of_runs(monkeypatch)
    base = ["fid", "--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "tiny_class.toml"),
            str(env["ref"]), "-n", "13", "--seed", "2", "--classes", "balanced"]  # fmt: skip
    stamps = []
    for bs in ("1", "5"):
        out = tmp_path / f"bs{bs}.json"
        r = runner.invoke(app, [*base, "--batch-size", bs, "--json", str(out)], terminal_width=300)
        assert r.exit_code == 0, r.output
        stamps.append(json.loads(out.read_text()))
    assert labels[0] == labels[1] == [i % 10 for i in range(13)]  # K = 10 real classes (11 with the null)
    np.testing.assert_array_equal(images[0], images[1])  # the same 13 images, bit for bit
    one, five = stamps
    assert one["fid_raw"] == pytest.approx(five["fid_raw"], rel=2e-5)  # batch-shape rounding of the features
    for s in stamps:
        assert s["protocol"]["label_protocol"] == "balanced" and s["num_images"] == 13
        c = s["samples"]["generator"]["conditions"]
        assert c["label_protocol"] == "balanced" and c["labels"].startswith("balanced: class = index % 10")

    # the protocol matters: random labels (the default) make other images from the same seeds
    out = tmp_path / "random.json"
    r = runner.invoke(app, [*base[:-2], "--batch-size", "5", "--json", str(out)], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert labels[2] == random_class_conditions(2, 10)(range(13))["y"].tolist() != labels[0]
    assert json.loads(out.read_text())["protocol"]["label_protocol"] == "random"
    assert not np.array_equal(images[2], images[0])


def test_balanced_on_a_text_model_is_one_line(env, standin_cli):
    d = env["dir"]
    args = ["fid", "--ckpt", str(d / "txt" / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i_px.toml")]
    line = _one_line_error(runner.invoke(app, [*args, "-n", "4", "--classes", "balanced", str(env["ref"])]))
    assert "--classes balanced" in line and "text-conditional" in line and "tiny_t2i_px" in line
    r = runner.invoke(app, ["fid", "generate", "--help"])
    shown = " ".join(w for w in r.output.split() if w != "│")  # the help column wraps at 80
    assert "--classes <random|balanced>" in shown and "Default: random" in shown


# --------------------------------------------------------------------------------------------------
# Text models: val-split contexts


def test_text_contexts_come_from_the_val_split_per_index(env):
    d, caps = env["dir"], env["captions"]
    cond, empty, info = val_context_conditions(d / "shards", 5, env["txt"])
    rows = cond(range(12))["context"]  # (12, 5, 8): 12 images over 5 val images
    assert rows.shape == (12, 5, 8)
    torch.testing.assert_close(torch.cat([cond([i])["context"] for i in (11, 3, 0)]), rows[[11, 3, 0]])
    torch.testing.assert_close(empty, torch.from_numpy(env["empty"]))
    assert info["val_images"] == 5 and info["split"] == "val"

    def image_of(row: torch.Tensor) -> int:
        hits = [j for j, c in enumerate(caps) if any(np.allclose(row.numpy(), k) for k in c)]
        assert len(hits) == 1, "every context must be one caption of one val image"
        return hits[0]

    images = [image_of(r) for r in rows]
    assert sorted(images[:5]) == sorted(images[5:10]) == [0, 1, 2, 3, 4]  # each val image once per pass
    # a repeated val image draws its caption again: image 4 (5 captions) over 10 passes uses several
    many = cond(range(50))["context"]
    used = {k for r in many for k, c in enumerate(caps[4]) if np.allclose(r.numpy(), c)}
    assert len(used) >= 3
    # deterministic in (seed, index), and the seed matters
    torch.testing.assert_close(
        val_context_conditions(d / "shards", 5, env["txt"])[0](range(12))["context"], rows
    )
    assert not torch.equal(val_context_conditions(d / "shards", 6, env["txt"])[0](range(12))["context"], rows)


def test_text_checkpoint_fid_runs_and_ignores_batching(env, monkeypatch):
    d = env["dir"]
    seen, images = _captured_stats(monkeypatch)
    spec = dict(ckpt=d / "txt" / "nnet_ema.pth", preset=d / "tiny_t2i_px.toml", seed=1)
    # a takes its contexts from the preset's data.path, b from --contexts-from
    a = fid_from_checkpoint(
        env["ref"], SamplerSpec(**spec, settings=SampleOptions(batch_size=4)), n=6, **FEATS
    )
    b = fid_from_checkpoint(
        env["ref"],
        SamplerSpec(**spec, settings=SampleOptions(batch_size=6)),
        n=6,
        contexts_from=d / "shards",
        **FEATS,
    )
    np.testing.assert_array_equal(images[0], images[1])
    assert a.fid_raw == pytest.approx(b.fid_raw, rel=2e-5) and a.num_images == 6 and seen[0].n == 6
    g = a.stamp["samples"]["generator"]
    assert g["conditions"]["kind"] == "text" and g["conditions"]["contexts"]["path"] == str(d / "shards")
    assert g["cfg_scale"] == 1.0  # the preset's guidance, with the shards' CLIP('') as null


# --------------------------------------------------------------------------------------------------
# The CLI: routing, stamp, progress, one-line errors


@pytest.fixture()
def standin_cli(monkeypatch):
    """The CLI with the stand-in features (the real Inception is covered by test_fid and the slow test)."""
    monkeypatch.setattr(gen, "fid_from_checkpoint", functools.partial(gen.fid_from_checkpoint, **FEATS))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cli_stamp(env, tmp_path, standin_cli):
    d = env["dir"]
    ckpt = d / "cls" / "nnet_ema.pth"
    base = ["fid", "--ckpt", str(ckpt), "--preset", str(d / "tiny_class.toml"), str(env["ref"])]
    r = runner.invoke(
        app,
        [*base, "-n", "6", "--seed", "2", "--steps", "2", "--cfg-scale", "0.25", "--solver", "ddim",
         "--guidance-interval", "0.1", "0.9", "--batch-size", "4", "--json", str(tmp_path / "s.json")],
        terminal_width=300,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert re.search(r"FID \d+\.\d{4}  mode clean  images 6 ", r.output) and "img/s" in r.output
    assert "EMA weights" in r.output or "released weights" in r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["mode"] == "clean" and s["num_images"] == 6
    assert s["reference"]["sha256"] == _sha(env["ref"]) and "sha256" in s["inception"]
    g = s["samples"]["generator"]
    assert g["checkpoint"] == str(ckpt) and g["checkpoint_sha256"] == _sha(ckpt)
    assert (g["preset"], g["solver"], g["steps"], g["cfg_scale"]) == ("tiny_class", "ddim", 2, 0.25)
    assert g["guidance_interval"] == [0.1, 0.9] and g["ema"] is True and g["seed"] == 2 and g["n"] == 6
    assert g["conditions"] == {
        "kind": "class",
        "labels": "uniform over 0..9 from (seed, index)",
        "label_protocol": "random",
    }
    assert s["protocol"]["label_protocol"] == "random"  # the default, the paper's
    assert "batch_size" not in g  # it does not change the number

    # defaults: the preset's settings and n_samples; the stamp beside the checkpoint
    r = runner.invoke(app, [*base, "--model-weights", "model"], terminal_width=300)
    assert r.exit_code == 0, r.output
    default = d / "cls" / "nnet_ema.fid-clean-n5-dpm_solver_pp3-cfg0.5-seed0.json"
    g = json.loads(default.read_text())["samples"]["generator"]
    assert g["n"] == 5 and g["ema"] is False and g["cfg_scale"] == 0.5


def test_cli_bad_input_is_one_line(env, tmp_path, monkeypatch, standin_cli):
    d = env["dir"]
    ref = tmp_path / "ref2048.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "inception.pt").write_bytes(b"x")  # only looked up before the model loads; never read here
    monkeypatch.setattr(gen, "fid_from_checkpoint", gen.fid_from_checkpoint.func)  # the real Inception path
    inc = ["--inception-weights", str(tmp_path / "inception.pt")]
    monkeypatch.chdir(tmp_path)

    # no checkpoint: how to get one
    line = _one_line_error(
        runner.invoke(app, ["fid", "--preset", str(d / "tiny_class.toml"), "-n", "4", str(ref), *inc])
    )
    assert "uvit train tiny_class" in line and "--ckpt" in line
    line = _one_line_error(runner.invoke(app, ["fid", "--ckpt", "nope.pth", "--n", "4", str(ref), *inc]))
    assert "nope.pth: no such file" in line

    # checkpoint and preset do not fit
    args = ["fid", "--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "tiny_class_deep.toml")]
    line = _one_line_error(runner.invoke(app, [*args, "--n", "4", str(ref), *inc]))
    assert (
        "does not fit" in line
        and "in_blocks.1" in line
        and "--preset this checkpoint was trained with" in line
    )

    # a text model with no val split to take captions from
    txt = ["fid", "--ckpt", str(d / "txt" / "nnet_ema.pth"), "--preset", str(d / "tiny_t2i_px.toml")]
    txt += ["--n", "4"]
    line = _one_line_error(
        runner.invoke(app, [*txt, "--contexts-from", str(d / "train_only"), str(ref), *inc])
    )
    assert "no prepared 'val' split" in line and "prepared: train" in line and "uvit prepare coco" in line
    line = _one_line_error(
        runner.invoke(app, [*txt, "--contexts-from", str(tmp_path / "none"), str(ref), *inc])
    )
    assert "no manifest.json" in line and "--split val" in line

    # the reference is checked before anything loads
    line = _one_line_error(runner.invoke(app, [*txt, str(tmp_path / "missing.npz"), *inc]))
    assert "reference statistics not found" in line


def test_cli_routing():
    """`uvit fid SAMPLES REF` stays compare; a checkpoint option (--ckpt, --preset, --n/-n) means generate."""
    cases = [
        (["a", "b"], "compare"),
        (["--mode", "clean", "a", "b"], "compare"),
        (["--ckpt", "x.pth", "r.npz"], "generate"),
        (["r.npz", "--preset=p", "-n5"], "generate"),
        (["ref", "imgs", "--out", "o.npz"], "ref"),
    ]
    for args, command in cases:
        r = runner.invoke(app, ["fid", *args, "--help"], terminal_width=200)
        assert r.exit_code == 0 and f"Usage: uvit fid {command} " in r.output, (args, r.output[:300])


# --------------------------------------------------------------------------------------------------
# Slow: the real Inception architecture (random weights) end to end, and two torchrun processes


@pytest.mark.slow  # two 2048-d Fréchet distances + 2 x 8 Inception forwards: ~1 min on a busy 2-core box
def test_cli_ckpt_equals_cli_on_pngs_with_random_inception(env, tmp_path):
    from uvit_cli.inception import FIDInception

    d = env["dir"]
    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    torch.save(FIDInception().state_dict(), weights)
    inc = ["--inception-weights", str(weights)]
    r = runner.invoke(app, ["fid", "ref", str(d / "real"), "--out", str(tmp_path / "ref.npz"), *inc])
    assert r.exit_code == 0, r.output
    ck = ["--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "tiny_class.toml")]
    r = runner.invoke(
        app, ["fid", *ck, "--n", "6", str(tmp_path / "ref.npz"), *inc, "--json", str(tmp_path / "g.json")]
    )
    assert r.exit_code == 0, r.output
    labels = random_class_conditions(0, 10)(range(6))["y"].tolist()
    args = ["sample", *ck, "--n", "1", "--no-compile", "--out", str(tmp_path / "png")]
    r = runner.invoke(app, [*args, *[a for lab in labels for a in ("--class", str(lab))]])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["fid", str(tmp_path / "png"), str(tmp_path / "ref.npz"), *inc, "--json", str(tmp_path / "p.json")],
    )
    assert r.exit_code == 0, r.output
    g, p = (json.loads((tmp_path / f).read_text()) for f in ("g.json", "p.json"))
    assert g["fid_raw"] == pytest.approx(p["fid_raw"], rel=2e-5) and g["fid"] > 0
    assert g["inception"]["sha256"] == p["inception"]["sha256"] == _sha(weights)


TORCHRUN_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_fid import _standin
from uvit_cli.fid.generated import fid_from_checkpoint
from uvit_cli.sample import SampleOptions, SamplerSpec
torch.set_num_threads(1)
spec = SamplerSpec(ckpt={ckpt!r}, preset={preset!r}, seed=3, settings=SampleOptions(batch_size=2))
r = fid_from_checkpoint({ref!r}, spec, n=7, features=_standin(), feature_dim=16, device="cpu")
if r.is_main:
    json.dump(r.stamp, open({out!r}, "w"))
"""


@pytest.mark.slow  # two processes import torch and build the model: ~15 s on a busy 2-core box
def test_two_torchrun_processes_match_one(env, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    d = env["dir"]
    script = tmp_path / "run.py"
    script.write_text(
        TORCHRUN_SCRIPT.format(
            tests=str(Path(__file__).parent),
            ref=str(env["ref"]),
            ckpt=str(d / "cls" / "nnet_ema.pth"),
            preset=str(d / "tiny_class.toml"),
            out=str(tmp_path / "two.json"),
        )
    )
    cmd = [*TORCHRUN_2, str(script)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = _cls_fid(env, n=7, settings=SampleOptions(batch_size=2))
    assert two["world_size"] == 2 and two["num_images"] == 7
    assert two["fid_raw"] == pytest.approx(one.fid_raw, rel=2e-5)


def test_n_below_two_is_refused(env):
    with pytest.raises(DataError, match="at least 2 images"):
        _cls_fid(env, n=1)


def test_the_default_stamp_of_balanced_labels_does_not_replace_the_random_one(tmp_path):
    from uvit_cli.fid.result import FidResult

    gen = {"checkpoint": str(tmp_path / "model.safetensors"), "n": 100, "solver": "dpm_solver_pp", "steps": 25,
           "cfg_scale": 0.4, "seed": 0}  # fmt: skip
    paths = {
        labels: FidResult(1.0, 1.0, 100, {"mode": "clean", "samples": {"generator": gen},
                                          "protocol": {"label_protocol": labels}}).default_stamp_path()
        for labels in ("random", "balanced")
    }  # fmt: skip
    assert paths["random"].name == "model.fid-clean-n100-dpm_solver_pp25-cfg0.4-seed0.json"
    assert paths["balanced"] != paths["random"] and paths["balanced"].name.endswith("-balanced.json")


def test_the_default_stamp_of_a_hub_checkpoint_goes_to_the_current_folder(tmp_path, monkeypatch):
    """uvit never writes into the Hugging Face cache: a stamp of `--ckpt org/name` lands in the current folder."""
    from uvit_cli.fid.result import FidResult

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123" / "model.safetensors"
    gen = {
        "checkpoint": str(ckpt),
        "n": 100,
        "solver": "dpm_solver_pp",
        "steps": 25,
        "cfg_scale": 0.4,
        "seed": 0,
    }
    path = FidResult(1.0, 1.0, 100, {"mode": "clean", "samples": {"generator": gen}}).default_stamp_path()
    assert path == tmp_path / "org--name.model.fid-clean-n100-dpm_solver_pp25-cfg0.4-seed0.json"
