"""[eval] metrics and classes: every metric of one Inception pass logged beside `fid` while training (a tiny
shapes run with stand-ins for the Inception and CLIP), equal to `uvit fid --ckpt` of the checkpoint saved at
that step with the same metrics; a request that cannot be measured fails before the first step; a class
model's evaluations label by `eval.classes`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_fid import _images
from test_metrics import standin

from uvit_cli import checkpoint as ck
from uvit_cli.config import load_preset
from uvit_cli.errors import ConfigError
from uvit_cli.fid import make_ref_stats
from uvit_cli.fid.generated import fid_from_checkpoint
from uvit_cli.sample import SampleOptions, SamplerSpec
from uvit_cli.shapes.prepare import prepare_shapes
from uvit_cli.train import read_metrics, train

ADM = "legacy_tensorflow"  # sFID, IS and precision/recall are defined in the ADM evaluator's mode only
LOGGED = ("fid", "sfid", "inception_score", "precision", "recall", "clip_score")  # the stamp's keys


def clip_standin(images, prompts) -> np.ndarray:
    """A deterministic stand-in for CLIP score: depends on each image and its caption."""
    return np.array([float(im.mean()) / 255 + len(p) % 7 for im, p in zip(images, prompts, strict=True)])


FEATURES = {"features": standin, "feature_dim": 16, "clip_score": clip_standin}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_metrics")
    prepare_shapes(d, n=40, resolution=16)  # d/shapes, with 4 held-out (val) scenes and their captions
    _images(d / "ref_images", 12, seed=1, size=16)
    make_ref_stats(
        d / "ref_images",
        d / "ref.npz",
        metrics="all",
        mode=ADM,
        device="cpu",
        features=standin,
        feature_dim=16,
    )  # mu/sigma, mu_s/sigma_s and pool features
    return d


def _preset(d, **eval_):
    sets = {"interval": 3, "n": 6, "steps": 2, "seed": 5, "ref": f'"{d / "ref.npz"}"', "mode": ADM} | eval_
    return load_preset(
        "shapes_uvit_tiny",
        [f"data.path={d / 'shapes'}", "train.steps=6", "train.batch_size=8", "train.log_interval=3",
         "train.save_interval=3", "train.keep_last=4", "train.sample_interval=1000", "train.num_workers=0",
         "model.depth=2", "sample.batch_size=4", *(f"eval.{k}={v}" for k, v in sets.items())],
    )  # fmt: skip


def test_every_metric_is_logged_and_equals_uvit_fid_of_the_saved_checkpoint(setup, tmp_path):
    metrics = ["fid", "sfid", "is", "pr", "clip"]
    preset, run = _preset(setup, metrics=metrics), tmp_path / "run"
    assert preset.eval.metrics == metrics
    train(preset, run, fid_features=FEATURES)
    logged = [m for m in read_metrics(run) if "fid" in m]
    assert [m["step"] for m in logged] == [3, 6]
    for m in logged:
        assert all(isinstance(m[k], float) and math.isfinite(m[k]) for k in LOGGED), m
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["inception_score"] >= 1
        # the in-training numbers are `uvit fid --ckpt RUN/ckpts/STEP --metrics ...` with [eval]'s settings
        spec = SamplerSpec(
            ckpt=run / ck.CKPTS / ck.step_dir_name(m["step"]),
            seed=5,
            settings=SampleOptions(steps=2, compile=False),
        )
        again = fid_from_checkpoint(
            setup / "ref.npz", spec, n=6, mode=ADM, device="cpu", metrics=metrics, **FEATURES
        )
        assert set(again.metrics) == set(LOGGED)
        for k in LOGGED:
            assert m[k] == pytest.approx(again.metrics[k], rel=1e-6, abs=1e-9), k
    assert logged[0]["clip_score"] != logged[1]["clip_score"]  # a real number of the images, not a constant


def test_fid_alone_logs_fid_alone(setup, tmp_path):
    run = tmp_path / "run"
    train(_preset(setup), run, max_steps=3, fid_features=FEATURES)
    (m,) = [m for m in read_metrics(run) if "fid" in m]
    assert not set(LOGGED[1:]) & set(m)


def test_a_request_that_cannot_be_measured_fails_before_the_first_step(setup, tmp_path):
    with pytest.raises(ConfigError, match="legacy_tensorflow"):  # an ADM metric in another mode
        train(_preset(setup, metrics='"fid,is"', mode="clean"), tmp_path / "a", fid_features=FEATURES)
    assert not (tmp_path / "a" / ck.CKPTS).exists()
    with pytest.raises(ConfigError, match="must include 'fid'"):  # FID picks RUN/best
        _preset(setup, metrics='"is"')


def test_class_model_evaluations_label_by_eval_classes(tmp_path):
    """`eval.classes = "balanced"` gives image i class i % K in every evaluation, and says so."""
    from test_fid_generate import class_toml

    from uvit_cli.train.evaluate import FidEvaluator

    (tmp_path / "c.toml").write_text(class_toml("c"))
    _images(tmp_path / "ref_images", 4, seed=1, size=8)
    make_ref_stats(
        tmp_path / "ref_images", tmp_path / "ref.npz", device="cpu", features=standin, feature_dim=16
    )
    for classes, want in (("balanced", [i % 10 for i in range(23)]), ("random", None)):
        p = load_preset(tmp_path / "c.toml", [f"eval.ref={tmp_path / 'ref.npz'}", f"eval.classes={classes}"])
        ev = FidEvaluator(p, tmp_path / "run", "cpu", features=standin, feature_dim=16)
        labels = ev.conditions(range(23))["y"].tolist()
        assert ev.cond_info["label_protocol"] == classes and set(labels) <= set(range(10))
        assert labels == want if want else len(set(labels)) > 3 and labels != [i % 10 for i in range(23)]
