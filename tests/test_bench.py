"""`uvit bench` on the CPU: the real code paths run, the table and JSON are sound, FLOPs are counted right."""

import json
import os
import subprocess
import sys

import pytest
import torch
from train_fixtures import tiny_toml
from typer.testing import CliRunner

from uvit_cli.bench.measure import Timing, peak_tflops
from uvit_cli.bench.recipes import OFFICIAL, OfficialAttention, apply_attention
from uvit_cli.bench.tasks import bench_train, forward_flops
from uvit_cli.cli import app
from uvit_cli.config import preset_from_toml
from uvit_cli.model import UViT

TINY = tiny_toml(
    "tiny_bench",
    {"kind": "folder", "path": "unused", "space": "pixel", "resolution": 8},
    model={"num_classes": 5},
    sample={"steps": 3, "cfg_scale": 1.0, "batch_size": 2},
)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny_bench.toml"
    path.write_text(TINY)
    return path


def test_cli_train_and_sample_write_valid_json(tiny, tmp_path):
    runner = CliRunner()
    for task in ("train", "sample"):
        out = tmp_path / f"{task}.json"
        r = runner.invoke(
            app,
            ["bench", task, "--preset", str(tiny), "--repeats", "1", "--json", str(out)],
            terminal_width=200,
        )
        assert r.exit_code == 0, r.output
        assert "official" in r.output and "uvit" in r.output and "speed-up" in r.output
        report = json.loads(out.read_text())
        assert report["task"] == task and report["preset"] == "tiny_bench"
        assert [m["recipe"] for m in report["measurements"]] == ["official", "uvit"]
        for m in report["measurements"]:
            assert m["images_per_s"] > 0 and m["flops_per_step"] > 0 and m["mfu"] is None  # no MFU on CPU
            assert m["warmup_s"] >= 0
        streamed, table = r.output.split(f"uvit bench {task} ·")
        assert f"{task} · official:" in streamed and "warm-up" in table
        assert report["speedup"] == pytest.approx(
            report["measurements"][1]["images_per_s"] / report["measurements"][0]["images_per_s"]
        )


def test_unknown_task_is_one_line(tiny):
    r = CliRunner().invoke(app, ["bench", "nope", "--preset", str(tiny)])
    assert (
        r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    )


def test_forward_flops_match_analytic_count(tiny):
    # Linear layers: 2 * in * out per token; attention: 2 * T^2 * D for q k^T and again for attn v.
    p = preset_from_toml(TINY)
    m = p.model
    B, D, L = 3, m.embed_dim, (m.img_size // m.patch_size) ** 2
    T = L + 2  # label and time tokens
    blocks = m.depth + 1
    per_block = 2 * T * (D * 3 * D + D * D + 2 * D * 4 * D) + 2 * 2 * T * T * D
    skips = (m.depth // 2) * 2 * T * 2 * D * D
    patch = 2 * L * (m.in_chans * m.patch_size**2) * D
    decoder = 2 * T * D * m.patch_size**2 * m.in_chans
    final_conv = 2 * m.img_size**2 * m.in_chans * m.in_chans * 9
    assert forward_flops(p.model, B) == B * (blocks * per_block + skips + patch + decoder + final_conv)


def test_official_attention_upcasts_and_matches_in_fp32():
    torch.manual_seed(0)
    m = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 5.0])
    with torch.no_grad():
        ours = m(x, t)
        apply_attention(m, official=True)
        assert all(type(a.attn) is OfficialAttention for a in m.in_blocks)
        theirs = m(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            upcast = m.in_blocks[0].attn(torch.randn(2, 18, 32))
    assert (ours - theirs).abs().max() < 1e-5
    assert upcast.dtype == torch.bfloat16  # proj recasts under autocast; the SDPA itself ran in fp32


def test_train_bench_on_cpu_is_fp32_eager(tiny):
    p = preset_from_toml(TINY)
    (m,) = bench_train(p, batch=2, recipes=[OFFICIAL], timing=Timing(1, 0, torch.device("cpu")))
    assert m.note.startswith("fp32") and m.batch == 2 and m.ms_per_step > 0


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


# --------------------------------------------------------------------------------------------------
# Streaming, warm-up, the CUDA settings of each recipe, the device and attention probes


def test_rows_stream_into_the_report_and_carry_their_warm_up(tiny):
    from uvit_cli.bench import run_bench

    p = preset_from_toml(tiny.read_text())
    seen = []
    report = run_bench(
        "train", p, batch=2, steps=1, on_row=lambda rep, row: seen.append((len(rep.measurements), row))
    )
    assert [(n, row.recipe) for n, row in seen] == [(1, "official"), (2, "uvit")]
    assert all(m.warmup_s is not None and m.warmup_s >= 0 for m in report.measurements)


def test_a_killed_bench_keeps_every_row_it_printed(tiny, tmp_path):
    """`uvit bench --json` writes each row before printing it: killed after the first row, the file holds it."""
    out = tmp_path / "train.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    cmd = [
        sys.executable,
        "-m",
        "uvit_cli",
        "bench",
        "train",
        "--preset",
        str(tiny),
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    printed = None
    try:
        printed = next(line for line in proc.stdout if line.startswith("train · official:"))
        proc.kill()  # before the uvit row
    finally:
        proc.kill()
        proc.wait()
    report = json.loads(out.read_text())
    first = report["measurements"][0]
    assert first["recipe"] == "official" and first["images_per_s"] > 0 and first["warmup_s"] >= 0
    assert "warm-up" in printed


def test_the_table_shows_the_warm_up(tiny):
    r = CliRunner().invoke(app, ["bench", "fid", "--batch", "1", "--repeats", "1"], terminal_width=200)
    assert r.exit_code == 0, r.output
    streamed, table = r.output.split("uvit bench fid ·")
    assert "fid · uvit:" in streamed and "TF32 off" in streamed and "warm-up" in table


def test_cuda_defaults_sets_the_backend_flags():
    from uvit_cli.dist import cuda_defaults

    flags = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        assert cuda_defaults(torch.device("cpu")) == ""
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == flags[::2]
        line = cuda_defaults(torch.device("cuda"))  # the flags are process-wide: no GPU needed to set them
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
        assert line == "TF32 matmuls, TF32 convolutions, cuDNN autotuning"
        cuda_defaults(torch.device("cuda"), tf32=False, autotune=False)  # uvit prepare, the official recipes
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.allow_tf32  # convolutions: cuDNN's default either way
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = flags


def test_each_recipe_runs_its_code_base_cuda_settings(monkeypatch):
    from uvit_cli import dist
    from uvit_cli.bench.recipes import OURS, TRAIN_LADDER
    from uvit_cli.bench.tasks import use_recipe_settings

    calls = []
    monkeypatch.setattr(dist, "cuda_defaults", lambda device, **kw: calls.append(kw) or "")
    for r in (OFFICIAL, OURS, TRAIN_LADDER[-1]):
        use_recipe_settings(r, torch.device("cuda"))
    on = {"tf32": True, "autotune": True}
    assert calls == [{"tf32": False, "autotune": False}, on, on]  # the official code ran torch's defaults


def test_attention_shapes_are_the_presets():
    from uvit_cli.bench.device import attention_shape
    from uvit_cli.config import load_preset

    assert attention_shape(load_preset("coco_uvit_s2_deep").model, 256) == (256, 8, 334, 64)
    assert attention_shape(load_preset("imagenet256_uvit_h2").model, 128) == (128, 16, 258, 72)


def test_kernel_family_reads_the_aten_op():
    from uvit_cli.bench.device import kernel_family

    assert kernel_family({"aten._scaled_dot_product_cudnn_attention.default"}) == "cudnn"
    assert kernel_family({"aten._scaled_dot_product_flash_attention_backward.default"}) == "flash"
    assert kernel_family({"aten._scaled_dot_product_efficient_attention.default"}) == "efficient"
    assert kernel_family({"aten.bmm.default", "aten._softmax.default"}) == "math"
    assert kernel_family({"aten.add.Tensor"}) == "?"


def test_attention_probe_on_the_cpu(tiny):
    from uvit_cli.bench import run_bench

    report = run_bench("attention", preset_from_toml(tiny.read_text()), batch=2, steps=1)
    rows = {m.recipe: m for m in report.measurements}
    assert "forward flash, backward flash" in rows["default"].note  # the CPU's flash kernel
    assert {"default", "flash", "math"} <= set(rows) and all(m.tflops for m in rows.values())
    skipped = report.settings["skipped"]
    assert any(k.startswith("cudnn") for k in skipped) and "official (fp32 q, k, v)" in skipped


def test_device_probe_says_what_needs_cuda(tmp_path):
    out = tmp_path / "device.json"
    r = CliRunner().invoke(app, ["bench", "device", "--json", str(out)], terminal_width=200)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [m["recipe"] for m in report["measurements"]] == ["matmul fp32 512³", "copy device→device 32 MiB"]
    assert report["measurements"][1]["gb_per_s"] > 0
    assert "copy host→device 32 MiB (pinned): skipped: no CUDA" in r.output
    assert "matmul bf16 512³: skipped: no CUDA" in r.output
