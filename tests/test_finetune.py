"""`uvit train PRESET --init CKPT`: a new run from given weights (ours or the paper's .pth layout), model and
EMA loaded, fresh optimiser and schedule, the source recorded; strict architecture check; a run dir with
checkpoints of another start is refused, the same command resumes."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import tiny_preset
from train_fixtures import weights as _weights
from typer.testing import CliRunner

from uvit_cli.cli import app
from uvit_cli.errors import CheckpointError, CheckpointMismatch
from uvit_cli.fileio import sha256_file
from uvit_cli.model import UViT
from uvit_cli.train import train


def _same_as_source(run, source):
    """After one step at lr 0 the online weights are the source's bit for bit; the EMA 0.9 e + 0.1 p of e = p
    is p up to the rounding of that sum (a few ulp)."""
    model, ema = _weights(run, 1, "model.safetensors"), _weights(run, 1, "ema.safetensors")
    assert sorted(model) == sorted(source) and all(torch.equal(model[k], source[k]) for k in source)
    for k in source:
        torch.testing.assert_close(ema[k], source[k], rtol=1e-6, atol=1e-8)


def test_init_loads_model_and_ema_with_a_fresh_optimiser(shards, tmp_path):
    base = tmp_path / "base"
    train(tiny_preset(shards, steps=3, save_interval=3), base)
    source = _weights(base, 3, "ema.safetensors")
    # warm-up 2: the first step runs at lr 0, so after one step the weights are still the source's
    events = []
    res = train(
        tiny_preset(shards, steps=1, save_interval=1), tmp_path / "ft", init=base, on_event=events.append
    )
    assert res.step == 1
    _same_as_source(tmp_path / "ft", source)
    rec = json.loads((tmp_path / "ft" / "init.json").read_text())
    file = base / "ckpts" / "00000003" / "ema.safetensors"
    assert rec["path"] == str(file) and rec["sha256"] == sha256_file(file)
    assert "initialised from" in events[0].message
    state = torch.load(tmp_path / "ft" / "ckpts" / "00000001" / "state.pt", weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == 1  # a fresh schedule, not the source run's step 3


def test_init_from_the_official_pth_layout_and_a_strict_architecture_check(shards, tmp_path):
    preset = tiny_preset(shards, steps=1, save_interval=1)
    torch.manual_seed(3)
    official = UViT(**preset.model)
    torch.save(official.state_dict(), tmp_path / "nnet_ema.pth")
    train(preset, tmp_path / "ft", init=tmp_path / "nnet_ema.pth")
    _same_as_source(tmp_path / "ft", official.state_dict())
    deeper = UViT(**(preset.model.model_dump() | {"depth": 4}))
    torch.save(deeper.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(CheckpointMismatch, match="--init .*deep.pth does not fit the model"):
        train(preset, tmp_path / "ft2", init=tmp_path / "deep.pth")


def test_init_into_a_run_with_checkpoints_is_refused_and_the_same_command_resumes(shards, tmp_path):
    base = tmp_path / "base"
    train(tiny_preset(shards, steps=2, save_interval=2), base)
    other = tmp_path / "other"
    train(tiny_preset(shards, steps=2, save_interval=2), other)
    with pytest.raises(CheckpointError, match="did not start from"):
        train(tiny_preset(shards, steps=4, save_interval=2), other, init=base)
    ft = tmp_path / "ft"
    train(tiny_preset(shards, steps=4, save_interval=2), ft, init=base, max_steps=2)
    events = []
    res = train(tiny_preset(shards, steps=4, save_interval=2), ft, init=base, on_event=events.append)
    assert res.step == 4 and "resuming from 00000002" in events[0].message


def test_init_cli_option_is_one_line_when_missing(shards, tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_preset(shards).to_toml())
    res = CliRunner().invoke(
        app, ["train", str(toml), "--run-dir", str(tmp_path / "r"), "--init", str(tmp_path / "nope")]
    )
    assert res.exit_code == 2, res.output
    assert "no such file or directory" in res.output and "Traceback" not in res.output
