"""The README's four lines, run as written in one directory, on a fake COCO layout with tiny encoders and a tiny
Inception given through the environment variables a user would set."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import torch
from encoder_fixtures import save_autoencoder, save_text_encoder, tiny_autoencoder, tiny_text_encoder
from test_prepare import make_coco
from typer.testing import CliRunner

from uvit_cli import config, data
from uvit_cli.cli import app
from uvit_cli.inception import FIDInception

README = Path(__file__).resolve().parent.parent / "README.md"
PRESET = config.presets_dir() / "coco_uvit_s2_deep.toml"


def readme_lines() -> list[str]:
    """The command block after 'Typical use with the real data' in README.md."""
    text = README.read_text()
    block = text.split("Typical use with the real data", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def tiny_coco_preset(clip_dim: int) -> str:
    """presets/coco_uvit_s2_deep.toml with a tiny network and a few steps; every other line as packaged."""
    text = PRESET.read_text()
    for key, value in {
        "patch_size": 8,  # 4 tokens of the 32x32 latent
        "embed_dim": 32,
        "num_heads": 2,
        "depth": 3,
        "clip_dim": clip_dim,
        "steps": 4,
        "batch_size": 2,
        "warmup_steps": 1,
        "n_samples": 4,
    }.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, key
    assert "\nsteps = 50\n" in text  # [sample]'s solver steps
    return text.replace("\nsteps = 50\n", "\nsteps = 3\n")


def test_the_readme_four_lines_chain_in_one_directory(tmp_path, monkeypatch):
    lines = readme_lines()
    assert [shlex.split(line)[:2] for line in lines] == [
        ["uvit", "prepare"],
        ["uvit", "train"],
        ["uvit", "sample"],
        ["uvit", "fid"],
    ], lines

    weights = tmp_path / "weights"
    clip = tiny_text_encoder(seed=3)
    monkeypatch.setenv(
        "UVIT_VAE", str(save_autoencoder(tiny_autoencoder(seed=1), weights / "vae.pth", "uvit"))
    )
    monkeypatch.setenv("UVIT_CLIP", str(save_text_encoder(clip, weights / "clip", layout="clipmodel")))
    inception = weights / "inception.pt"
    torch.save(FIDInception().state_dict(), inception)
    monkeypatch.setenv("UVIT_INCEPTION", str(inception))
    monkeypatch.setenv("UVIT_COCO", str(make_coco(tmp_path / "coco", n_train=5, n_val=2)))

    work = tmp_path / "work"  # the user's directory: the preset file at the path the README names
    (work / "presets").mkdir(parents=True)
    (work / "presets" / PRESET.name).write_text(tiny_coco_preset(clip.config.hidden_size))
    monkeypatch.chdir(work)
    runner = CliRunner()
    ref = runner.invoke(app, ["fid", "ref", str(tmp_path / "coco" / "val2014"), "--out", "ref.npz"])
    assert ref.exit_code == 0, ref.output

    outputs = []
    for line in lines:
        r = runner.invoke(app, shlex.split(line)[1:], terminal_width=200)
        assert r.exit_code == 0, f"{line}\n{r.output}"
        outputs.append(r.output)

    assert data.read_manifest(work / "feats" / "coco256")["kind"] == "coco"
    assert (work / "runs" / "coco_uvit_s2_deep" / "preset.toml").is_file()
    assert "using runs/coco_uvit_s2_deep: the only text-to-image run" in outputs[2].splitlines()[0]
    assert len(sorted((work / "samples").glob("*.png"))) >= 4
    fid = re.search(r"FID[^0-9]*([0-9.]+)", outputs[3])
    assert fid is not None and np.isfinite(float(fid.group(1))), outputs[3]
