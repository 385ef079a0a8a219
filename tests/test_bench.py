"""`uvit bench` on the CPU: the real code paths run, the table and JSON are sound, FLOPs are counted right."""

import json

import pytest
import torch
from train_fixtures import tiny_toml
from typer.testing import CliRunner

from uvit_cli.bench.measure import peak_tflops
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
    assert forward_flops(p, B) == B * (blocks * per_block + skips + patch + decoder + final_conv)


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
    (m,) = bench_train(p, batch=2, steps=1, warmup=0, recipes=[OFFICIAL], device=torch.device("cpu"))
    assert m.note.startswith("fp32") and m.batch == 2 and m.ms_per_step > 0


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None
