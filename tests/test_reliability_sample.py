"""`uvit sample`, devices, bench and the quickstart when things go wrong: a sample folder is one request (its
encoders and every input that changes the pixels included), requests that cannot fit are refused before
anything is allocated, a device this machine lacks is one line, `--out` never lies where training deletes,
and tiny CPU runs use one thread (docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_fixtures import class_toml, save_tiny_encoders, save_tiny_uvit, t2i_toml
from typer.testing import CliRunner

from uvit_cli import dist, resources
from uvit_cli.cli import app
from uvit_cli.config import load_preset
from uvit_cli.errors import ConfigError, ResourceError, UvitError
from uvit_cli.model import UViT
from uvit_cli.sample import (
    SampleOptions,
    SamplerSpec,
    SampleSettings,
    class_conditions,
    generate,
    null_condition,
    sample_to_dir,
)

T2I, CLASS = t2i_toml(), class_toml()
GiB = 1 << 30


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two presets with a seeded model each (the official .pth layout), and two VAEs and two CLIPs."""
    d = tmp_path_factory.mktemp("reliability_sample")
    t2i, _ = save_tiny_uvit(T2I, d / "t2i.toml", d / "t2i" / "nnet_ema.pth", seed=1)
    cls, cls_model = save_tiny_uvit(CLASS, d / "class.toml", d / "cls" / "nnet_ema.pth", seed=2)
    for k in (1, 2):
        save_tiny_encoders(
            d / f"vae{k}" / "autoencoder_kl.pth", d / f"clip{k}", vae_seed=2 + k, clip_seed=4 + k
        )
    return dict(dir=d, t2i=t2i, cls=cls, cls_model=cls_model)


def _t2i_args(env, out: Path, vae: int | None = 1, clip: int | None = 1) -> list[str]:
    d = env["dir"]
    args = ["sample", "--ckpt", str(d / "t2i" / "nnet_ema.pth"), "--preset", str(d / "t2i.toml"),
            "--prompt", "a red cube", "--n", "2", "--out", str(out)]  # fmt: skip
    if vae is not None:
        args += ["--vae", str(d / f"vae{vae}" / "autoencoder_kl.pth")]
    if clip is not None:
        args += ["--clip", str(d / f"clip{clip}")]
    return args


def _class_args(env, out: Path, *more: str) -> list[str]:
    d = env["dir"]
    return ["sample", "--ckpt", str(d / "cls" / "nnet_ema.pth"), "--preset", str(d / "class.toml"),
            "--class", "3", "--n", "2", "--out", str(out), *more]  # fmt: skip


def _invoke(args: list[str], **kw):
    return CliRunner().invoke(app, args, terminal_width=400, **kw)


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    return lines[0]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --------------------------------------------------------------------------------------------------
# A sample folder is one request: the encoders and every input that changes the pixels


def test_a_folder_reused_with_another_vae_or_clip_is_refused(env, tmp_path, monkeypatch):
    for var in ("UVIT_VAE", "UVIT_CLIP"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "s"
    assert _invoke(_t2i_args(env, out)).exit_code == 0
    before = _files(out)

    line = _error_line(_invoke(_t2i_args(env, out, vae=2)))
    assert "different vae (sha256" in line and "samples.jsonl" in line and str(out) in line
    line = _error_line(_invoke(_t2i_args(env, out, clip=2)))
    assert "different clip (sha256" in line
    # the same choice through the environment variables is refused too
    monkeypatch.setenv("UVIT_VAE", str(env["dir"] / "vae2" / "autoencoder_kl.pth"))
    line = _error_line(_invoke(_t2i_args(env, out, vae=None)))
    assert "different vae" in line
    monkeypatch.delenv("UVIT_VAE")
    monkeypatch.setenv("UVIT_CLIP", str(env["dir"] / "clip2"))
    assert "different clip" in _error_line(_invoke(_t2i_args(env, out, clip=None)))
    monkeypatch.delenv("UVIT_CLIP")
    # the decoder's scale is part of the autoencoder
    line = _error_line(_invoke([*_t2i_args(env, out), "--set", "autoencoder.scale_factor=0.25"]))
    assert "different vae (scale_factor 0.5 there, 0.25 now)" in line
    assert _files(out) == before  # nothing lost, nothing rewritten

    # the same weights under another path are the same request: resumed, nothing redone
    copy = tmp_path / "copy"
    shutil.copytree(env["dir"] / "vae1", copy)
    r = _invoke(_t2i_args(env, out)[:-4] + ["--vae", str(copy / "autoencoder_kl.pth"), "--clip",
                                            str(env["dir"] / "clip1")])  # fmt: skip
    assert r.exit_code == 0 and "(0 new, 2 already there)" in r.output, r.output
    rec = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert len(rec["vae"]["sha256"]) == 64 and rec["vae"]["scale_factor"] == 0.5
    assert rec["clip"]["kind"] == "clip" and len(rec["clip"]["sha256"]) == 64


def test_the_schedule_and_the_arithmetic_are_part_of_the_request(env, tmp_path):
    out = tmp_path / "s"
    assert _invoke(_class_args(env, out)).exit_code == 0
    before = _files(out)
    line = _error_line(_invoke(_class_args(env, out, "--set", "schedule.num_steps=500")))
    assert "different schedule" in line
    line = _error_line(_invoke(_class_args(env, out, "--precision", "bf16")))
    assert "different settings" in line
    assert _files(out) == before
    # on the CPU the default precision is fp32: asking for it by name is the same request
    r = _invoke(_class_args(env, out, "--precision", "fp32"))
    assert r.exit_code == 0 and "(0 new, 2 already there)" in r.output, r.output
    rec = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert rec["settings"]["precision"] == "fp32" and rec["settings"]["decode_precision"] == "fp32"
    assert rec["schedule"]["num_steps"] == 1000


# --------------------------------------------------------------------------------------------------
# Requests that cannot fit are refused before anything is allocated or written


def test_a_billion_images_are_refused_before_anything_is_written(env, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "free_disk_bytes", lambda path: 100 * GiB)
    out = tmp_path / "huge"
    args = _class_args(env, out)
    args[args.index("--n") + 1] = "1000000000"
    line = _error_line(_invoke(args))
    assert "1,000,000,000 images of 8x8" in line and "100.0 GiB is free" in line and "--n" in line
    assert not out.exists()


def test_images_that_cannot_fit_on_the_disk_are_refused(env, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "free_disk_bytes", lambda path: 1 << 20)  # 1 MiB
    out = tmp_path / "s"
    kw = dict(ckpt=env["dir"] / "cls" / "nnet_ema.pth", preset=env["dir"] / "class.toml")
    with pytest.raises(ResourceError, match=r"2,000 images of 8x8 needs about .* MiB on disk and 1.0 MiB"):
        sample_to_dir(out, SamplerSpec(**kw), classes=[3], n=2000)
    assert not out.exists()


def test_a_batch_that_cannot_fit_in_memory_is_refused(env, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB
    out = tmp_path / "s"
    kw = dict(ckpt=env["dir"] / "cls" / "nnet_ema.pth", preset=env["dir"] / "class.toml")
    spec = SamplerSpec(**kw, settings=SampleOptions(batch_size=1000))
    with pytest.raises(ResourceError, match="sampling a batch of 1000 images needs about .* --batch-size"):
        sample_to_dir(out, spec, classes=[3], n=2)
    assert not out.exists()


def test_generation_reads_its_indices_a_batch_at_a_time(env):
    """A plan of any length: generate takes a batch of indices, makes it, and only then takes the next."""
    p, model = env["cls"], env["cls_model"]
    pulled = []

    def indices():
        for i in range(10**12):
            pulled.append(i)
            assert len(pulled) <= 8, "generate read ahead of its batches"
            yield i

    settings = SampleSettings.from_preset(p, SampleOptions(steps=1, batch_size=4, cfg_scale=0.0))
    batches = generate(model, p, indices(), class_conditions(_Three()), None, settings=settings)
    first = next(batches)
    assert first[0] == [0, 1, 2, 3] and first[1].shape == (4, 8, 8, 3)
    assert len(pulled) <= 5
    assert next(batches)[0] == [4, 5, 6, 7]


class _Three:
    def __getitem__(self, i: int) -> int:
        return 3


def test_an_infinite_cfg_scale_is_refused_not_sampled_into_nan(env, tmp_path):
    line = _error_line(_invoke(_class_args(env, tmp_path / "s", "--cfg-scale", "inf")))
    assert "cfg scale must be a finite number" in line
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------
# --out never lies where training deletes


def test_an_out_inside_a_runs_checkpoints_is_refused(env, tmp_path):
    run = tmp_path / "runs" / "x"
    (run / "ckpts" / "00000100").mkdir(parents=True)
    (run / "preset.toml").write_text(CLASS)
    out = run / "ckpts" / "00000100" / "samples"
    line = _error_line(_invoke(_class_args(env, out)))
    assert f"inside {run / 'ckpts'}" in line and "deletes old checkpoints" in line
    assert not out.exists()
    link = tmp_path / "link"
    link.symlink_to(run / "ckpts" / "00000100")
    assert "the checkpoint folder" in _error_line(_invoke(_class_args(env, link / "s")))
    # a folder that merely is named ckpts, outside any run, is fine
    r = _invoke(_class_args(env, tmp_path / "mine" / "ckpts" / "s"))
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------------
# Devices and bench options: one line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_device_this_machine_lacks_is_one_line(env, tmp_path, monkeypatch):
    for bad, words in (("nosuchdev", "not a device"), ("cuda", "has no CUDA GPU"), ("cuda:3", "no CUDA GPU")):
        line = _error_line(_invoke(["bench", "train", "--preset", str(env["dir"] / "class.toml"),
                                    "--device", bad]))  # fmt: skip
        assert f"--device {bad}: " in line and words in line
        kw = dict(ckpt=env["dir"] / "cls" / "nnet_ema.pth", preset=env["dir"] / "class.toml")
        with pytest.raises(ConfigError, match=words):
            sample_to_dir(tmp_path / "s", SamplerSpec(**kw), classes=[3], n=1, device=bad)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad", [["--batch=-5"], ["--batch", "0"], ["--repeats", "0"], ["--workers", "-1"]])
def test_nonsense_bench_numbers_are_refused_without_a_traceback(env, bad):
    r = _invoke(["bench", "data", "--preset", str(env["dir"] / "class.toml"), *bad])
    assert r.exit_code == 2 and "Traceback" not in r.output and "Invalid value" in r.output, r.output


def test_a_bench_batch_that_cannot_fit_is_one_line(env, monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 8 * GiB)
    for task in ("train", "sample", "fid", "data"):
        args = ["bench", task, "--preset", str(env["dir"] / "class.toml"), "--batch", "1000000000"]
        line = _error_line(_invoke([*args, "--device", "cpu"]))
        assert f"bench {task} at batch 1,000,000,000 needs about" in line and "8.0 GiB is available" in line


def test_bench_json_never_overwrites_its_preset(env, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(CLASS)
    line = _error_line(_invoke(["bench", "train", "--preset", str(preset), "--json", str(preset)]))
    assert "--json" in line and "--preset" in line and str(preset) in line
    assert preset.read_text() == CLASS


# --------------------------------------------------------------------------------------------------
# Tiny CPU runs use one thread, by one rule


def test_the_thread_rule(monkeypatch):
    small, big = 280_000, 44_000_000
    assert dist.choose_cpu_threads(small, None, {}).threads == 1
    assert dist.choose_cpu_threads(big, None, {}).threads is None  # torch's default: one per core
    assert dist.choose_cpu_threads(small, 2, {"OMP_NUM_THREADS": "4"}) == dist.ThreadChoice(2, "--threads")
    env = dist.choose_cpu_threads(small, None, {"OMP_NUM_THREADS": "3"})
    assert env.threads is None and env.why == "OMP_NUM_THREADS=3"
    with pytest.raises(ConfigError, match="--threads 0"):
        dist.choose_cpu_threads(small, 0, {})

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        line = dist.use_cpu_threads(small)
        assert torch.get_num_threads() == 1 and line.startswith("1 CPU thread for torch (a 0.28M-parameter")
        assert dist.use_cpu_threads(small, 2).startswith("2 CPU threads for torch (--threads)")
    finally:
        torch.set_num_threads(before)


def test_the_quickstart_model_is_small_enough_for_one_thread():
    from uvit_cli.quickstart import PRESET

    with torch.device("meta"):
        params = sum(p.numel() for p in UViT(**load_preset(PRESET).model).parameters())
    assert dist.choose_cpu_threads(params, None, {}).threads == 1


def test_sample_pngs_are_unchanged_by_the_streaming_plan(env, tmp_path):
    """Indices, conditions and records made per condition give the images per index as before: image c*n+j is
    the j-th of condition c (two classes, three each, batch 4 across the boundary)."""
    p, model = env["cls"], env["cls_model"]
    out = tmp_path / "s"
    spec = SamplerSpec(ckpt=env["dir"] / "cls" / "nnet_ema.pth", preset=env["dir"] / "class.toml", seed=5)
    sample_to_dir(out, spec, classes=[3, 7], n=3)
    settings = SampleSettings.from_preset(p)
    labels = [3, 3, 3, 7, 7, 7]
    want = np.concatenate([b for _, b in generate(model, p, range(6), class_conditions(labels),
                                                    null_condition(p.model), seed=5, settings=settings)])  # fmt: skip
    got = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(6)])
    assert np.array_equal(got, want)
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["class"] for r in recs] == labels and [r["index"] for r in recs] == list(range(6))


def test_an_old_folder_without_encoder_records_is_refused_by_name(env, tmp_path):
    out = tmp_path / "s"
    assert _invoke(_t2i_args(env, out)).exit_code == 0
    lines = []
    for raw in (out / "samples.jsonl").read_text().splitlines():
        rec = json.loads(raw)
        rec.pop("vae")
        lines.append(json.dumps(rec))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UvitError, match=r"different vae \(none recorded there, one now\)"):
        sample_to_dir(
            out,
            SamplerSpec(ckpt=env["dir"] / "t2i" / "nnet_ema.pth", preset=env["dir"] / "t2i.toml",
                        vae=str(env["dir"] / "vae1" / "autoencoder_kl.pth")),
            prompts=["a red cube"], n=2, clip=str(env["dir"] / "clip1"),
        )  # fmt: skip
