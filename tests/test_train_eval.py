"""FID while training ([eval]) on the shapes preset, with a 16-d Inception stand-in: logged beside the loss,
equal to `uvit fid --ckpt` of the checkpoint saved at the same step, best weights kept, bad settings refused
at the start."""

from __future__ import annotations

import json
import math

import pytest
from test_fid import _images, _standin

from uvit_cli import checkpoint as ck
from uvit_cli.config import load_preset
from uvit_cli.errors import DataError
from uvit_cli.fid import make_ref_stats
from uvit_cli.fid.generated import fid_from_checkpoint
from uvit_cli.sample import SampleOptions, SamplerSpec
from uvit_cli.shapes.prepare import prepare_shapes
from uvit_cli.train import read_metrics, train
from uvit_cli.train.evaluate import BEST_DIR, BEST_FILE

FEATURES = {"features": _standin(), "feature_dim": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_eval")
    prepare_shapes(d, n=40, resolution=16)  # d/shapes, with 4 held-out (val) scenes
    _images(d / "ref_images", 12, seed=1, size=16)
    make_ref_stats(d / "ref_images", d / "ref.npz", device="cpu", **FEATURES)
    return d


def _preset(d, **eval_):
    sets = {"interval": 3, "n": 6, "steps": 2, "seed": 5, "ref": str(d / "ref.npz")} | eval_
    return load_preset(
        "shapes_uvit_tiny",
        [f"data.path={d / 'shapes'}", "train.steps=6", "train.batch_size=8", "train.log_interval=1",
         "train.save_interval=3", "train.keep_last=4", "train.sample_interval=1000", "train.num_workers=0", "model.depth=2",
         "sample.batch_size=4", *(f"eval.{k}={v}" for k, v in sets.items())],
    )  # fmt: skip


def test_fid_is_logged_and_equals_uvit_fid_of_the_saved_checkpoint(setup, tmp_path):
    preset, run = _preset(setup), tmp_path / "run"
    events = []
    train(preset, run, fid_features=FEATURES, on_event=events.append)
    fids = [m for m in read_metrics(run) if "fid" in m]
    assert [m["step"] for m in fids] == [3, 6] and all(math.isfinite(m["fid"]) for m in fids)
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3, 4, 5, 6]  # beside the loss
    assert [e.step for e in events if e.kind == "fid"] == [3, 6]

    for m in fids:  # the in-training number is `uvit fid --ckpt RUN/ckpts/STEP` with [eval]'s settings
        step = SamplerSpec(
            ckpt=run / ck.CKPTS / ck.step_dir_name(m["step"]),
            seed=5,
            settings=SampleOptions(steps=2, compile=False),
        )
        again = fid_from_checkpoint(setup / "ref.npz", step, n=6, device="cpu", **FEATURES)
        assert again.fid == pytest.approx(m["fid"], rel=1e-6, abs=1e-9)

    best = min(fids, key=lambda m: m["fid"])
    kept = json.loads((run / BEST_DIR / BEST_FILE).read_text())
    assert kept["step"] == best["step"] and kept["fid"] == best["fid"] and fids[-1]["fid_best"] == best["fid"]
    _, _, info = ck.load_model(run / BEST_DIR / ck.EMA_FILE)
    assert info.step == best["step"] and info.weights == "ema"


def test_resume_keeps_the_best_and_eval_settings_may_change(setup, tmp_path):
    run = tmp_path / "run"
    train(_preset(setup), run, max_steps=3, fid_features=FEATURES)
    first = json.loads((run / BEST_DIR / BEST_FILE).read_text())
    train(_preset(setup, interval=2), run, fid_features=FEATURES)  # [eval] is not what the run is: no --force
    fids = [m for m in read_metrics(run) if "fid" in m]
    assert [m["step"] for m in fids] == [3, 4, 6]
    assert fids[-1]["fid_best"] == min(first["fid"], *(m["fid"] for m in fids[1:]))


def test_bad_eval_settings_fail_before_the_first_step(setup, tmp_path):
    with pytest.raises(DataError, match="nothing.npz"):
        train(_preset(setup, ref=str(setup / "nothing.npz")), tmp_path / "a", fid_features=FEATURES)
    assert not (tmp_path / "a" / ck.CKPTS).exists()
    no_val = tmp_path / "train_only"
    prepare_shapes(no_val, n=20, n_val=0, resolution=16)
    p = _preset(setup).model_copy(deep=True)
    p.data.path = str(no_val / "shapes")
    with pytest.raises(DataError, match="val"):
        train(p, tmp_path / "b", fid_features=FEATURES)
    assert not (tmp_path / "b" / ck.CKPTS).exists()
