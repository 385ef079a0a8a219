"""The Hugging Face Hub: `uvit export` (a Hub-ready folder), `uvit push` (a fake HfApi, no network), `--ckpt
org/name` / `hf://org/name/file` / `--init org/name` through a local cache in the hub layout, and the paper's
released files (`uvit presets weights`, export of an official .pth).

The cache is built as huggingface_hub builds it (models--org--name/blobs, snapshots/<rev>/ symlinks,
refs/main); downloads are off (HF_HUB_OFFLINE) except where a fake snapshot_download stands in."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sample_fixtures import class_toml, save_tiny_uvit
from train_fixtures import tiny_preset
from typer.testing import CliRunner

from uvit_cli import export, hub
from uvit_cli.checkpoint import find_checkpoint, load_model
from uvit_cli.cli import app
from uvit_cli.errors import CheckpointError
from uvit_cli.fileio import sha256_file
from uvit_cli.model import UViT
from uvit_cli.sample import SampleOptions, SamplerSpec, sample_to_dir

runner = CliRunner()
REV = "0123456789abcdef0123456789abcdef01234567"


def _one_line_error(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def hub_cache(cache: Path, repo_id: str, folder: Path, rev: str = REV) -> Path:
    """`folder`'s files in the hub cache layout: blobs by sha256, snapshots/<rev>/<name> -> ../../blobs/<sha>,
    refs/main naming <rev>. The snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        sha = sha256_file(f)
        shutil.copyfile(f, repo / "blobs" / sha)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards):
    """A tiny trained run (3 steps, a sample grid at step 3), with FID rows in metrics.jsonl as [eval] writes
    them, a `uvit fid --ckpt` stamp beside its EMA weights, and an exported folder of it."""
    from uvit_cli.train import train

    d = tmp_path_factory.mktemp("hub_run")
    preset = tiny_preset(shards, steps=3, save_interval=3, sample_interval=3)
    train(preset, d / "run")
    run = d / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "fid": 123.456, "fid_n": 64, "fid_seconds": 1.0, "fid_best": 123.456,
                            "fid_is_best": True, "sfid": 45.6}) + "\n")  # fmt: skip
    ema = run / "ckpts" / "00000003" / "ema.safetensors"
    stamp = {"metric": "fid", "fid": 98.7654, "mode": "legacy_tensorflow", "num_images": 50000,
             "reference": {"sha256": "ab" * 32},
             "samples": {"kind": "generator", "generator": {"checkpoint_sha256": sha256_file(ema),
                         "solver": "dpm_solver_pp", "steps": 4, "cfg_scale": 1.0, "seed": 0}}}  # fmt: skip
    (ema.parent / "ema.fid-legacy_tensorflow-n50000-dpm_solver_pp4-cfg1-seed0.json").write_text(
        json.dumps(stamp)
    )
    other = dict(
        stamp, fid=1.0, samples={"generator": {"checkpoint_sha256": "0" * 64}}
    )  # another checkpoint's
    (ema.parent / "ema.fid-clean-n10-x.json").write_text(json.dumps(other))
    exported = d / "exported"
    export.export(run, exported)
    return {"dir": d, "run": run, "ema": ema, "exported": exported, "preset": preset}


def _sample(out: Path, ckpt: str | Path) -> dict[str, np.ndarray]:
    spec = SamplerSpec(ckpt=ckpt, settings=SampleOptions(steps=2, compile=False), seed=3)
    sample_to_dir(out, spec, classes=[1, 2], n=2)
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))}


# --------------------------------------------------------------------------------------------------
# Export


def test_export_of_a_run_is_a_hub_ready_folder(run):
    out = run["exported"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "metrics.json", "model.safetensors",
                                                     "preset.toml", "samples.png"]  # fmt: skip
    # the EMA weights under the official key names (the model's own), unchanged
    got, ema = load_file(str(out / "model.safetensors")), load_file(str(run["ema"]))
    with torch.device("meta"):
        official = UViT(**run["preset"].model).state_dict()
    assert sorted(got) == sorted(official)
    for k in official:
        torch.testing.assert_close(got[k], ema[k], rtol=0, atol=0)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (
        meta["weights"] == "ema" and meta["step"] == "3" and meta["source_sha256"] == sha256_file(run["ema"])
    )
    assert (out / "preset.toml").read_text() == run["preset"].to_toml()
    assert (out / "samples.png").read_bytes() == (run["run"] / "samples" / "00000003.png").read_bytes()


def test_the_model_card_has_the_hub_header_and_the_measured_rows(run):
    yaml = pytest.importorskip("yaml")
    card = (run["exported"] / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "uvit"
    assert header["pipeline_tag"] == "unconditional-image-generation"  # class-conditional: the Hub's task
    assert {"u-vit", "diffusion", "class-conditional"} <= set(header["tags"])
    assert "`tiny`" in card and "step 3" in card and "41,600 parameters" in card
    # the `uvit fid --ckpt` stamp of these weights, with its protocol; not the stamp of another checkpoint
    assert "98.77" in card and "legacy_tensorflow, 50000 images, dpm_solver_pp 4 steps" in card
    assert "| 1 |" not in card and "ema.fid-clean-n10-x.json" not in card
    # the [eval] row of metrics.jsonl, with the run's protocol
    assert "| 3 | 123.5 | 45.6 |" in card and "`metrics.jsonl`" in card
    assert "![samples](samples.png)" in card and "step 3" in card
    rows = json.loads((run["exported"] / "metrics.json").read_text())["rows"]
    assert [r["source"] for r in rows][0].startswith("ema.fid-legacy") and len(rows) == 2
    assert rows[0]["stamp"]["reference"]["sha256"] == "ab" * 32


def test_an_exported_folder_samples_as_its_run(run, tmp_path):
    base, exp = _sample(tmp_path / "run", run["run"]), _sample(tmp_path / "exp", run["exported"])
    assert len(base) == 4 and exp.keys() == base.keys()
    assert all(np.array_equal(exp[k], base[k]) for k in base)


def test_export_refuses_a_non_empty_out_and_force_replaces(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _one_line_error(runner.invoke(app, ["export", str(run["run"]), "--out", str(out)]))
    assert "not empty" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    r = runner.invoke(app, ["export", str(run["run"]), "--out", str(out), "--force"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert "wrote" in r.output and "step 3" in r.output


def test_export_best_takes_run_best_or_says_why_not(run, tmp_path):
    line = _one_line_error(
        runner.invoke(app, ["export", str(run["run"]), "--best", "--out", str(tmp_path / "b")])
    )
    assert "best" in line and "keep_best" in line
    best = run["dir"] / "run_best"
    shutil.copytree(run["run"], best)
    (best / "best").mkdir()
    shutil.copy(best / "ckpts" / "00000003" / "ema.safetensors", best / "best" / "ema.safetensors")
    (best / "best" / "fid.json").write_text(json.dumps({"step": 3, "fid": 77.5, "stamp": {"mode": "clean"}}))
    result = export.export(best, tmp_path / "b", best=True)
    assert result.source == best / "best" / "ema.safetensors"
    assert "| 3 | 77.5 |" in (tmp_path / "b" / "README.md").read_text()


# --------------------------------------------------------------------------------------------------
# An official .pth


def _official_pth(d: Path, name: str = "nnet_ema.pth"):
    """The tiny class preset and a seeded model of it saved as the paper saves (a plain state dict), with a
    tensor shared by two keys and a non-contiguous one, as torch.save keeps them."""
    preset, model = save_tiny_uvit(class_toml(), d / "tiny_class.toml", d / name, seed=5)
    sd = model.state_dict()
    sd["in_blocks.0.norm2.weight"] = sd["in_blocks.0.norm1.weight"]  # one storage, two keys
    w = sd["in_blocks.0.attn.proj.weight"]
    sd["in_blocks.0.attn.proj.weight"] = w.t().contiguous().t()  # same values, transposed strides
    assert not sd["in_blocks.0.attn.proj.weight"].is_contiguous()
    torch.save(sd, d / name)
    return preset, sd


def test_export_of_an_official_pth_keeps_its_keys_and_values(tmp_path):
    preset, sd = _official_pth(tmp_path)
    out = tmp_path / "exp"
    r = runner.invoke(app, ["export", str(tmp_path / "nnet_ema.pth"), "--preset", str(tmp_path / "tiny_class.toml"),
                            "--out", str(out)], terminal_width=200)  # fmt: skip
    assert r.exit_code == 0, r.output
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert not (out / "samples.png").exists() and not (out / "metrics.json").exists()
    card = (out / "README.md").read_text()
    assert "No sample grid" in card and "--samples" in card and "step not recorded" in card
    # the folder loads by itself: the preset is embedded (and beside it)
    model, loaded, info = load_model(out)
    assert loaded.name == preset.name and info.weights == "ema" and info.step is None

    grid = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(grid)
    export.export(
        tmp_path / "nnet_ema.pth", out, preset=tmp_path / "tiny_class.toml", samples=grid, force=True
    )
    assert (out / "samples.png").read_bytes() == grid.read_bytes()
    assert "given with --samples" in (out / "README.md").read_text()


def test_export_of_a_pth_without_a_preset_that_fits_none_is_one_line(tmp_path):
    _official_pth(tmp_path)
    line = _one_line_error(
        runner.invoke(app, ["export", str(tmp_path / "nnet_ema.pth"), "--out", str(tmp_path / "o")])
    )
    assert "fits none of the packaged" in line and "--preset" in line


@pytest.mark.slow
def test_a_released_file_of_the_paper_exports_and_loads_as_its_preset(tmp_path):
    """cifar10_uvit_small.pth at its real size (44M parameters), random values, recognised by its shapes."""
    from uvit_cli.config import load_preset

    preset = load_preset("cifar10_uvit_s2")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UViT(**preset.model).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    torch.save(sd, tmp_path / "cifar10_uvit_small.pth")
    result = export.export(tmp_path / "cifar10_uvit_small.pth", tmp_path / "exp")
    assert result.preset.name == "cifar10_uvit_s2" and result.weights == "released"
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "CIFAR10 (U-ViT-S/2)" in card and "FID 3.11 after 500K" in card and "as released" in card
    got = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    _, loaded, info = load_model(tmp_path / "exp")
    assert loaded.name == "cifar10_uvit_s2" and info.weights == "released"


# --------------------------------------------------------------------------------------------------
# Loading from the Hub


def test_hub_references_are_parsed_and_local_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.hub_ref("hf://org/name") == hub.HubRef("org/name", None, "hf://org/name")
    assert hub.hub_ref("hf:/org/name/sub/ema.safetensors").file == "sub/ema.safetensors"  # as Path folds it
    assert hub.hub_ref("org/name").repo_id == "org/name"
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.hub_ref("org/name") is None  # an existing local path is never a Hub id
    assert hub.hub_ref("model.safetensors") is None and hub.hub_ref("/abs/x") is None
    for bad in ("hf://org", "hf://org/name/../x", "hf:///name"):
        with pytest.raises(CheckpointError, match="not a Hub reference"):
            hub.hub_ref(bad)


def test_sampling_from_the_hub_cache_equals_the_local_export(run, tmp_path, offline_cache):
    hub_cache(offline_cache, "org/name", run["exported"])
    local = _sample(tmp_path / "local", run["exported"])
    assert len(local) == 4
    for ref in ("org/name", "hf://org/name", "hf://org/name/model.safetensors"):
        got = _sample(tmp_path / ref.replace("/", "_").replace(":", ""), ref)
        assert got.keys() == local.keys() and all(np.array_equal(got[k], local[k]) for k in local), ref
    file = find_checkpoint("org/name")
    assert file.parent == offline_cache / "models--org--name" / "snapshots" / REV and file.is_symlink()


def test_uvit_sample_takes_a_hub_id(run, tmp_path, offline_cache):
    """Needs cli/common.sampler_spec to let a Hub reference through its early existence check."""
    hub_cache(offline_cache, "org/name", run["exported"])
    out = tmp_path / "cli"
    r = runner.invoke(app, ["sample", "--ckpt", "org/name", "--class", "1", "--class", "2", "--n", "2",
                            "--steps", "2", "--seed", "3", "--no-compile", "--out", str(out)], terminal_width=200)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Hub org/name" in r.output and "EMA weights" in r.output
    local = _sample(tmp_path / "local", run["exported"])
    assert all(np.array_equal(np.asarray(Image.open(out / k)), v) for k, v in local.items())


def test_init_from_a_hub_id_starts_from_those_weights(run, tmp_path, offline_cache):
    from uvit_cli.train import train

    hub_cache(offline_cache, "org/name", run["exported"])
    preset = run["preset"]
    result = train(preset, tmp_path / "ft", init="hf:/org/name/model.safetensors", max_steps=1)
    assert result is not None
    record = json.loads((tmp_path / "ft" / "init.json").read_text())
    assert record["sha256"] == sha256_file(run["exported"] / "model.safetensors")
    assert "models--org--name" in record["path"]


def test_an_offline_miss_is_one_line_naming_what_and_how(tmp_path, offline_cache, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("offline: the network must not be touched")

    monkeypatch.setattr(socket, "create_connection", no_network)
    line = _one_line_error(
        runner.invoke(app, ["export", "org/missing", "--out", str(tmp_path / "o")], terminal_width=400)
    )
    assert "org/missing" in line and str(offline_cache) in line
    assert "no download of org/missing (HF_HUB_OFFLINE/UVIT_OFFLINE set)" in line
    assert "huggingface-cli download org/missing" in line
    with pytest.raises(CheckpointError, match="hf://org/name/nope.safetensors: no Hub model"):
        find_checkpoint("hf://org/name/nope.safetensors")


def test_a_download_is_guarded_and_fetches_the_checkpoint_and_preset(run, tmp_path, monkeypatch):
    """Online (no offline variables), huggingface.co reachable and huggingface_hub installed: one
    snapshot_download of the checkpoint files and preset.toml; a stand-in answers, no network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import socket

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("UVIT_OFFLINE", raising=False)

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, list(allow_patterns)))
        snap = tmp_path / "downloaded" / repo_id
        shutil.copytree(run["exported"], snap, dirs_exist_ok=True)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert find_checkpoint("org/name") == tmp_path / "downloaded" / "org/name" / "model.safetensors"
    assert calls[0][0] == "org/name" and {"model.safetensors", "preset.toml"} <= set(calls[0][1])
    assert find_checkpoint("hf://org/other/model.safetensors").name == "model.safetensors"
    assert calls[1] == ("org/other", ["model.safetensors", "preset.toml"])


# --------------------------------------------------------------------------------------------------
# Push


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))
        FakeApi.card = (Path(kw["folder_path"]) / "README.md").read_text()


def test_push_creates_the_repo_and_uploads_the_folder(run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path / "exp"
    shutil.copytree(run["exported"], folder)
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    r = runner.invoke(app, ["push", str(folder), "me/tiny-uvit", "--private"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "https://huggingface.co/me/tiny-uvit" in r.output and "--ckpt me/tiny-uvit" in r.output
    assert FakeApi.calls[0] == ("init", "hf_secret")
    assert FakeApi.calls[1] == (
        "create_repo",
        "me/tiny-uvit",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    kw = FakeApi.calls[2][1]
    assert kw["folder_path"] == str(folder) and kw["repo_id"] == "me/tiny-uvit" and kw["repo_type"] == "model"
    # the card's usage lines name the repo
    assert "uvit sample --ckpt me/tiny-uvit" in FakeApi.card and "ORG/NAME" not in FakeApi.card


def test_push_without_token_package_or_export_is_one_line(run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = run["exported"]
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    line = _one_line_error(runner.invoke(app, ["push", str(folder), "me/x"], terminal_width=300))
    assert "no Hugging Face token" in line and "huggingface-cli login" in line and "HF_TOKEN" in line
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    line = _one_line_error(runner.invoke(app, ["push", str(folder), "me/x"], terminal_width=300))
    assert 'pip install "uvit[hub]"' in line
    line = _one_line_error(runner.invoke(app, ["push", str(tmp_path), "me/x"], terminal_width=300))
    assert "not an exported folder" in line and "uvit export" in line
    line = _one_line_error(runner.invoke(app, ["push", str(folder), "not a repo"], terminal_width=300))
    assert "not a Hub repo id" in line


def test_a_failed_upload_is_one_line(run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    class Refusing(FakeApi):
        def upload_folder(self, **kw):
            raise RuntimeError("403 Forbidden: you cannot write to me/x\ndetails")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    line = _one_line_error(runner.invoke(app, ["push", str(run["exported"]), "me/x"], terminal_width=300))
    assert "upload of" in line and "403 Forbidden" in line and "details" not in line


# --------------------------------------------------------------------------------------------------
# The paper's files


def test_presets_weights_lists_the_papers_files_with_their_presets():
    from uvit_cli.config import list_presets
    from uvit_cli.state_dicts import OFFICIAL_FILES

    assert len(OFFICIAL_FILES) == 10 and {f.preset for f in OFFICIAL_FILES} <= set(list_presets())
    assert all(f.sha256 is None and f.size_bytes is None for f in OFFICIAL_FILES)  # none published
    r = runner.invoke(app, ["presets", "weights"], terminal_width=300)
    assert r.exit_code == 0, r.output
    for f in OFFICIAL_FILES:
        assert f.file in r.output and f.preset in r.output and f.drive_id in r.output
    assert "thu-ml/imagenet256_uvit_huge" in r.output and "uvit export FILE --out DIR" in r.output
    assert not math.isnan(OFFICIAL_FILES[5].fid) and OFFICIAL_FILES[5].fid == 2.29
