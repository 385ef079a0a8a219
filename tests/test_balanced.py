"""Label protocols of class-conditional sampling: "balanced" (class = index % K) and "random" (uniform from
(seed, index)), in the core and through `uvit sample --classes`. Each image's class is a function of its index,
so the set does not depend on batch size, GPU count or resume (docs/sampling.md §4)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from sample_fixtures import class_toml, save_tiny_uvit, t2i_toml
from train_fixtures import tiny_toml
from typer.testing import CliRunner

from uvit_cli.cli import app
from uvit_cli.cli.common import LabelProtocolName
from uvit_cli.errors import ConfigError, UvitError
from uvit_cli.sample import (
    LABEL_PROTOCOLS,
    SampleOptions,
    SamplerSpec,
    SampleSettings,
    balanced_class_conditions,
    class_label,
    describe_labels,
    generate,
    label_conditions,
    null_condition,
    random_class_conditions,
    sample_to_dir,
    valid_classes,
)

UNCOND = tiny_toml(
    "tiny_unc",
    {"kind": "cifar10", "path": "unused", "space": "pixel", "resolution": 8},
    sample={"solver": "ddim", "steps": 2, "batch_size": 4},
)


def _labels(fn, indices) -> list[int]:
    return fn(list(indices))["y"].tolist()


# --------------------------------------------------------------------------------------------------
# The core: labels as a function of the index


def test_balanced_labels_are_the_index_mod_k_and_n_over_k_of_each_class():
    for k, m in ((10, 5), (7, 3), (1000, 50)):
        labels = _labels(balanced_class_conditions(k), range(k * m))
        assert labels == [i % k for i in range(k * m)]
        assert Counter(labels) == {c: m for c in range(k)}  # FID-50K on ImageNet: 50 of each of 1000
    # N not a multiple of K: the first N % K classes have one image more, none has two more
    counts = Counter(_labels(balanced_class_conditions(10), range(23)))
    assert [counts[c] for c in range(10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]


def test_balanced_labels_ignore_batching_ranks_and_a_larger_n():
    k, n = 10, 37
    assert _labels(balanced_class_conditions(k), range(n)) == [i % k for i in range(n)]
    for protocol in LABEL_PROTOCOLS:
        fn = label_conditions(protocol, 5, k)
        whole = _labels(fn, range(n))
        for bs in (1, 2, 3, 8):  # batches of any size, in any order
            batches = [range(s, min(s + bs, n)) for s in range(0, n, bs)]
            got: dict[int, int] = {}
            for b in reversed(batches):
                got.update(zip(b, _labels(fn, b), strict=True))
            assert [got[i] for i in range(n)] == whole
        for world in (2, 3, 8):  # rank r of a torchrun takes the indices r::world
            got = {}
            for r in range(world):
                got.update(zip(range(r, n, world), _labels(fn, range(r, n, world)), strict=True))
            assert [got[i] for i in range(n)] == whole
        # growing --n keeps the earlier images' classes (a resumed FID-50K after an FID-10K)
        assert _labels(fn, range(2 * n))[:n] == whole


def test_random_labels_are_unchanged_and_differ_from_balanced():
    # values of the uniform labels as `uvit fid --ckpt` has drawn them (stamps and folders stay valid)
    assert _labels(random_class_conditions(0, 1000), range(8)) == [889, 674, 967, 918, 661, 558, 961, 914]
    assert _labels(random_class_conditions(3, 10), range(12)) == [2, 3, 6, 8, 7, 5, 8, 1, 9, 9, 2, 6]

    # the rule, computed independently: numpy's default_rng on SeedSequence([seed, index, 1])
    def uniform(seed: int, k: int, i: int) -> int:
        return int(np.random.default_rng(np.random.SeedSequence([seed, i, 1])).integers(k))

    for seed in (0, 1, 12345):
        assert _labels(random_class_conditions(seed, 1000), range(40)) == [
            uniform(seed, 1000, i) for i in range(40)
        ]
        assert _labels(label_conditions("random", seed, 1000), range(40)) == [
            class_label("random", seed, 1000, i) for i in range(40)
        ]
    assert _labels(random_class_conditions(0, 1000), range(40)) != _labels(
        random_class_conditions(1, 1000), range(40)
    )
    # balanced labels do not depend on the seed; random ones are not balanced
    assert _labels(label_conditions("balanced", 0, 10), range(30)) == _labels(
        label_conditions("balanced", 9, 10), range(30)
    )
    assert Counter(_labels(random_class_conditions(0, 10), range(30))) != {c: 3 for c in range(10)}


def test_the_null_class_is_never_a_label(env):
    p = env["cls"]
    k = len(valid_classes(p.model.num_classes, p.train.p_uncond))
    assert k == p.model.num_classes - 1 == 10
    for protocol in LABEL_PROTOCOLS:
        assert max(_labels(label_conditions(protocol, 0, k), range(200))) == k - 1


def test_protocol_names_descriptions_and_bad_values():
    assert LABEL_PROTOCOLS == ("random", "balanced")
    assert get_args(LabelProtocolName) == LABEL_PROTOCOLS  # the CLI's choices (no torch import there)
    # the random description is the one FID stamps have always carried
    assert describe_labels("random", 1000) == "uniform over 0..999 from (seed, index)"
    assert "index % 1000" in describe_labels("balanced", 1000)
    with pytest.raises(ConfigError, match="unknown label protocol 'sorted'.*random, balanced"):
        label_conditions("sorted", 0, 10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown label protocol"):
        describe_labels("sorted", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        label_conditions("balanced", 0, 0)


# --------------------------------------------------------------------------------------------------
# uvit sample --classes: images, records, resume, refusals


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("balanced")
    cls, cls_model = save_tiny_uvit(class_toml(), d / "class.toml", d / "class" / "nnet_ema.pth", seed=2)
    for name, text in (("unc", UNCOND), ("t2i", t2i_toml())):
        save_tiny_uvit(text, d / f"{name}.toml", d / name / "nnet_ema.pth", seed=2)
    return dict(dir=d, cls=cls, cls_model=cls_model)


def _spec(env, name: str = "class", **kw) -> SamplerSpec:
    d = env["dir"]
    kw.setdefault("settings", SampleOptions(compile=False))
    return SamplerSpec(ckpt=d / name / "nnet_ema.pth", preset=d / f"{name}.toml", **kw)


def _pngs(out: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(n)])


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]


def test_balanced_images_are_the_same_for_any_batch_size_and_rank_split(env, tmp_path):
    p, model = env["cls"], env["cls_model"]
    n = 7
    r2 = sample_to_dir(tmp_path / "b2", _spec(env, seed=3, settings=SampleOptions(batch_size=2, compile=False)),
                       label_protocol="balanced", n=n)  # fmt: skip
    sample_to_dir(tmp_path / "b3", _spec(env, seed=3, settings=SampleOptions(batch_size=3, compile=False)),
                  label_protocol="balanced", n=n)  # fmt: skip
    assert r2.total == n and r2.label_protocol == "balanced" and "balanced labels" in r2.summary()
    got = _pngs(tmp_path / "b2", n)
    assert np.array_equal(got, _pngs(tmp_path / "b3", n))
    # the images are those of the core with class = index % 10, also when two ranks take 0::2 and 1::2
    settings = SampleSettings.from_preset(p, SampleOptions(batch_size=2, compile=False))
    labels, unc = balanced_class_conditions(10), null_condition(p.model)
    by_rank: dict[int, np.ndarray] = {}
    for r in (1, 0):
        for idx, images in generate(model, p, range(r, n, 2), labels, unc, seed=3, settings=settings):
            by_rank.update(zip(idx, images, strict=True))
    assert np.array_equal(got, np.stack([by_rank[i] for i in range(n)]))
    recs = _records(tmp_path / "b2")
    assert [r["class"] for r in recs] == [i % 10 for i in range(n)]
    assert {r["label_protocol"] for r in recs} == {"balanced"}


def test_random_labels_make_the_images_uvit_fid_ckpt_makes(env, tmp_path):
    p, model = env["cls"], env["cls_model"]
    r = sample_to_dir(tmp_path / "r", _spec(env, seed=4), label_protocol="random", n=5)
    assert "random labels" in r.summary()
    settings = SampleSettings.from_preset(p, SampleOptions(compile=False))
    want = np.concatenate([b for _, b in generate(model, p, range(5), random_class_conditions(4, 10),
                                                    null_condition(p.model), seed=4, settings=settings)])  # fmt: skip
    assert np.array_equal(_pngs(tmp_path / "r", 5), want)
    recs = _records(tmp_path / "r")
    assert [x["class"] for x in recs] == _labels(random_class_conditions(4, 10), range(5))
    assert {x["label_protocol"] for x in recs} == {"random"}


def test_a_folder_is_one_label_protocol_and_a_larger_n_resumes_it(env, tmp_path):
    out = tmp_path / "s"
    sample_to_dir(out, _spec(env, seed=1), label_protocol="balanced", n=3)
    first = _pngs(out, 3)
    r = sample_to_dir(out, _spec(env, seed=1), label_protocol="balanced", n=5)  # grow --n
    assert (r.skipped, r.written) == (3, 2) and np.array_equal(_pngs(out, 3), first)
    before = (out / "samples.jsonl").read_bytes()
    with pytest.raises(UvitError, match=r"different .*label_protocol.*another --out"):
        sample_to_dir(out, _spec(env, seed=1), label_protocol="random", n=5)
    # --class 0 --class 1 -n 1 would make images 0 and 1 with the same classes: still another request
    with pytest.raises(UvitError, match=r"different label_protocol \(see samples.jsonl\)"):
        sample_to_dir(out, _spec(env, seed=1), classes=[0, 1], n=1)
    assert (out / "samples.jsonl").read_bytes() == before
    # and a folder made with --class refuses --classes
    old = tmp_path / "old"
    sample_to_dir(old, _spec(env, seed=1), classes=[0, 1], n=1)
    assert "label_protocol" not in _records(old)[0]
    with pytest.raises(UvitError, match="different label_protocol"):
        sample_to_dir(old, _spec(env, seed=1), label_protocol="balanced", n=2)


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, terminal_width=400)


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    return lines[0]


def _cli(env, name: str, out: Path, *more: str) -> list[str]:
    d = env["dir"]
    return ["sample", "--ckpt", str(d / name / "nnet_ema.pth"), "--preset", str(d / f"{name}.toml"),
            "--out", str(out), "--no-compile", *more]  # fmt: skip


def test_the_cli_takes_classes_and_refuses_it_where_it_means_nothing(env, tmp_path, monkeypatch):
    r = _invoke(_cli(env, "class", tmp_path / "ok", "--classes", "balanced", "-n", "4", "--batch-size", "3"))
    assert r.exit_code == 0, r.output
    assert "4 images in" in r.output and "balanced labels" in r.output
    assert [x["class"] for x in _records(tmp_path / "ok")] == [0, 1, 2, 3]

    # with --class: refused before the model loads
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("uvit_cli.sample.run.load_sampler", no_model)
    line = _error_line(_invoke(_cli(env, "class", tmp_path / "a", "--classes", "random", "--class", "3")))
    assert "--classes random and --class exclude each other" in line and "pass one of them" in line
    monkeypatch.undo()

    line = _error_line(_invoke(_cli(env, "unc", tmp_path / "b", "--classes", "balanced")))
    assert "--classes balanced needs a class-conditional preset" in line and "unconditional" in line
    line = _error_line(_invoke(_cli(env, "t2i", tmp_path / "c", "--classes", "random", "--prompt", "x")))
    assert "needs a class-conditional preset" in line and "text-conditional: use --prompt" in line
    # neither --class nor --classes on a class model: refused as before, naming both
    line = _error_line(_invoke(_cli(env, "class", tmp_path / "d")))
    assert "pass --class N (repeatable), or --classes random|balanced" in line
    # an unknown protocol is typer's usage error
    r = _invoke(_cli(env, "class", tmp_path / "e", "--classes", "sorted"))
    assert r.exit_code == 2 and "Traceback" not in r.output and "sorted" in r.output
    assert not any((tmp_path / s).exists() for s in "abcde")


def test_help_names_the_protocols_and_the_papers_default():
    r = CliRunner().invoke(app, ["sample", "--help"], env={"COLUMNS": "2000"})
    assert r.exit_code == 0
    text = " ".join(r.output.replace("│", " ").split())
    assert "--classes" in text and "random|balanced" in text
    assert "index % K" in text and "U-ViT's ImageNet FID" in text and "no default" in text
