"""The speed levers (docs/benchmarks.md, *The levers*), each off by default, tested for numerics on the CPU:
the bf16 residual stream, cuDNN attention first, the compile mode, FP8 linears, the channels_last VAE decoder.
Their speed is a GPU's to measure (`uvit bench --levers`, `.ci/gpu-check`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from train_fixtures import tiny_preset

from uvit_cli import fp8
from uvit_cli.bench import run_bench
from uvit_cli.bench.recipes import OURS, SAMPLE_LEVERS, TRAIN_LEVERS, lever_refusal
from uvit_cli.config import preset_from_dict
from uvit_cli.encoders.autoencoder import AutoencoderKL
from uvit_cli.errors import ConfigError
from uvit_cli.model import UViT, attention_kernels, set_autocast_stream
from uvit_cli.sample.generate import compile_mode, decode_latents, decoding_network, sampling_network
from uvit_cli.sample.settings import SampleSettings
from uvit_cli.train.step import Levers, setup_step, train_step

CPU = torch.device("cpu")


def _net(**kw) -> UViT:
    torch.manual_seed(0)
    return UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2, **kw).eval()


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g) * 999
    cond = {"class": {"y": torch.tensor([1, 2, 4])}, "text": {"context": torch.randn(3, 4, 16, generator=g)}}
    return x, t, cond.get(kind, {})


_KINDS = {"class": dict(num_classes=5), "text": dict(clip_dim=16, num_clip_token=4), "none": {}}


# --------------------------------------------------------------------------------------------------
# bf16 residual stream


@pytest.mark.parametrize("kind", list(_KINDS))
def test_the_stream_is_bf16_with_the_switch_and_fp32_without(kind):
    net = _net(**_KINDS[kind])
    x, t, cond = _inputs(kind)
    with torch.no_grad():
        ref = net(x, t, **cond)  # fp32, no autocast
    seen: list[torch.dtype] = []
    for blk in [*net.in_blocks, net.mid_block, *net.out_blocks]:
        blk.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = {}
    for on in (False, True):
        set_autocast_stream(net, on)
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[on] = net(x, t, **cond).float()
        # Official: fp32 through the in-blocks and the mid block; an out-block's skip_linear (a bf16 matmul of
        # [h, skip]) starts it again in bf16. With the switch every block's stream is bf16.
        n_in = len(net.in_blocks) + 1
        if on:
            assert set(seen) == {torch.bfloat16}, seen
        else:
            assert set(seen[:n_in]) == {torch.float32} and set(seen[n_in:]) == {torch.bfloat16}, seen
    # bf16 keeps 8 significant bits (rounding 2^-9 relative); a 2-block network composes ~10 rounded ops, so
    # both autocast outputs sit within a few 2^-9 of fp32 (measured 0.5-0.6% of the largest output).
    scale = ref.abs().max()
    for on in (False, True):
        assert (out[on] - ref).abs().max() < 2e-2 * scale, on


def test_the_stream_switch_off_leaves_the_official_bits():
    net, fresh = _net(num_classes=5), _net(num_classes=5)
    x, t, cond = _inputs("class")
    set_autocast_stream(net, True)
    with torch.no_grad():
        assert torch.equal(net(x, t, **cond), fresh(x, t, **cond))  # without autocast the switch does nothing
        set_autocast_stream(net, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(net(x, t, **cond), fresh(x, t, **cond))
    assert UViT.autocast_stream is False  # the default is the official numerics


def test_setup_step_sets_the_stream_on_the_online_model_only(tmp_path):
    p = tiny_preset(tmp_path, stream_dtype="autocast")
    model = UViT(**p.model)
    state, ema = setup_step(p, model, CPU)
    assert model.autocast_stream and not ema.autocast_stream and state.attention == "auto"
    model = UViT(**p.model)
    setup_step(p, model, CPU, levers=Levers())  # a recipe's explicit levers win over the preset's
    assert not model.autocast_stream


# --------------------------------------------------------------------------------------------------
# cuDNN attention first


def test_cudnn_attention_is_a_no_op_off_cuda():
    net = _net(num_classes=5)
    x, t, cond = _inputs("class")
    with torch.no_grad():
        ref = net(x, t, **cond)
        with attention_kernels("cudnn", CPU):
            assert torch.equal(net(x, t, **cond), ref)


def test_cudnn_attention_goes_first_on_cuda():
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    with attention_kernels("cudnn", torch.device("cuda")):  # sets the order only; needs no GPU
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == before
    with attention_kernels("auto", torch.device("cuda")):
        assert torch._C._get_sdp_priority_order() == before


# --------------------------------------------------------------------------------------------------
# The compile mode


def test_the_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    p = tiny_preset(tmp_path, compile_mode="max-autotune-no-cudagraphs")
    setup_step(p, UViT(**p.model), CPU, compile=True)
    assert calls[-1] == {"mode": "max-autotune-no-cudagraphs"}
    setup_step(tiny_preset(tmp_path), UViT(**p.model), CPU, compile=True)
    assert calls[-1] == {"mode": None}  # the default: torch.compile(loss) as before
    s = SampleSettings(compile=True, compile_mode="max-autotune-no-cudagraphs")
    sampling_network(UViT(**p.model), s, CPU)
    assert calls[-1] == {"mode": "max-autotune-no-cudagraphs", "dynamic": False}
    assert compile_mode("default", True) == "reduce-overhead"
    assert compile_mode("max-autotune-no-cudagraphs", True) == "max-autotune"  # CUDA graphs + autotuning
    assert compile_mode("default", False) is None


def test_every_lever_traces_the_train_step_in_one_graph(tmp_path):
    """bf16 autocast, the bf16 stream, FP8 linears, cuDNN first, a compile mode: one graph over the warm-up."""
    p = tiny_preset(tmp_path)
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(0)
    levers = Levers("autocast", "cudnn", "max-autotune-no-cudagraphs", fp8=True)
    state, _ = setup_step(p, UViT(**p.model), CPU, amp_dtype=torch.bfloat16, compile=counter, uncond={"y": torch.tensor(4)},
                          levers=levers)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = {"x": torch.randn(8, 3, 8, 8, generator=g), "y": torch.randint(0, 4, (8,), generator=g)}
        train_step(state, [(batch, state.objective.draw(g, 8))], n_micro=1, share=8)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs; see TORCH_LOGS=graph_breaks,recompiles"
    assert torch.isfinite(state.loss_sum)


# --------------------------------------------------------------------------------------------------
# FP8 linears


def test_float8_scaling_fills_the_range():
    x = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    x8, inv = fp8.to_float8(x, fp8.E4M3)
    assert x8.dtype == fp8.E4M3 and x8.float().abs().max() == 448  # amax maps to e4m3's largest value
    assert torch.equal(x8.float() * inv, x)  # powers of two survive the cast exactly
    z8, inv = fp8.to_float8(torch.zeros(2, 2), fp8.E5M2)
    assert torch.isfinite(inv) and not z8.float().any()


def test_float8_linear_is_close_to_fp32_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(48, 32, generator=g)).requires_grad_()
    b = torch.randn(48, generator=g)
    grad = torch.randn(64, 48, generator=g)
    ref = F.linear(x, w, b)
    ref.backward(grad)
    ref_gx, ref_gw = x.grad, w.grad
    x.grad = w.grad = None
    out = fp8.float8_linear(x, w, b)
    out.backward(grad)

    def rel(a: torch.Tensor, r: torch.Tensor) -> float:
        return ((a - r).norm() / r.norm()).item()

    # e4m3 rounds each operand by up to 2^-4 (RMS ~2^-6 relative); a K-term dot product of two rounded
    # operands keeps the sqrt(2) of that: ~2.5% (measured 1.9%). The backward's e5m2 gradient rounds by up to
    # 2^-3 (measured 6%). Bounds with a margin; a plain bf16 matmul would be ~0.3%.
    assert 1e-3 < rel(out, ref) < 4e-2
    assert rel(x.grad, ref_gx) < 1e-1 and rel(w.grad, ref_gw) < 1e-1
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8.float8_linear(x, w, b).dtype == torch.bfloat16  # written in the autocast dtype
    odd = torch.randn(5, 32, generator=g)  # 5 tokens: not a multiple of 16, so F.linear itself
    assert torch.equal(fp8.float8_linear(odd, w, b), F.linear(odd, w, b))


def test_fp8_converts_the_block_linears_and_keeps_the_state_dict(tmp_path):
    p = tiny_preset(tmp_path, fp8=True)
    torch.manual_seed(0)
    model = UViT(**p.model)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    _, ema = setup_step(p, model, CPU)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    converted = {type(m).__name__ for m in linears if isinstance(m, fp8.Float8Linear)}
    # 3 blocks x (qkv, proj, fc1, fc2) + 1 skip_linear; decoder_pred stays full precision
    assert sum(isinstance(m, fp8.Float8Linear) for m in linears) == 13 and converted == {"Float8Linear"}
    assert type(model.decoder_pred) is torch.nn.Linear
    assert not any(isinstance(m, fp8.Float8Linear) for m in ema.modules())  # the EMA stays plain
    assert list(model.state_dict()) == list(plain)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
    fresh = UViT(**p.model)
    fresh.load_state_dict(model.state_dict(), strict=True)  # a checkpoint of an FP8 run loads unchanged


def test_an_fp8_train_step_stays_close_to_full_precision(tmp_path):
    losses = {}
    for on in (False, True):
        p = tiny_preset(tmp_path, fp8=on)
        torch.manual_seed(0)
        state, _ = setup_step(p, UViT(**p.model), CPU, uncond={"y": torch.tensor(4)})
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            batch = {"x": torch.randn(8, 3, 8, 8, generator=g), "y": torch.randint(0, 4, (8,), generator=g)}
            train_step(state, [(batch, state.objective.draw(g, 8))], n_micro=1, share=8)
        losses[on] = state.loss_sum.item()
    assert losses[True] != losses[False]  # the FP8 path ran
    assert abs(losses[True] - losses[False]) < 0.05 * losses[False]  # loss ~1: float8 rounding, 3 steps


def test_fp8_is_refused_before_compute_capability_8_9(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    why = fp8.fp8_refusal(torch.device("cuda"))
    assert why is not None and "A100" in why and "8.9" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.fp8_refusal(torch.device("cuda")) is None and fp8.fp8_refusal(CPU) is None


# --------------------------------------------------------------------------------------------------
# The channels_last VAE decoder


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scale_factor=0.5).eval()


def test_channels_last_decode_equals_the_contiguous_decode():
    vae = _tiny_vae()
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = decode_latents(vae, z, 2)
    settings = SampleSettings(vae_channels_last=True)
    decoder = decoding_network(vae, settings, CPU)
    assert decoder is not vae and decoder.decoder.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert vae.decoder.conv_in.weight.is_contiguous()  # the loaded autoencoder is not changed
    out = decode_latents(decoder, z, 2)
    # the same arithmetic in another memory order: fp32 round-off of the convolutions' sums only
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert decoding_network(vae, SampleSettings(), CPU) is vae


# --------------------------------------------------------------------------------------------------
# Presets, settings, bench rungs


def test_the_presets_carry_the_switches_off_by_default(tmp_path):
    p = tiny_preset(tmp_path)
    assert (p.train.stream_dtype, p.train.attention, p.train.compile_mode, p.train.fp8) == (
        "fp32", "auto", "default", False,
    )  # fmt: skip
    assert Levers.of(p.train) == Levers()
    d = p.model_dump()
    d["sample"] |= {"stream_dtype": "autocast", "attention": "cudnn", "vae_channels_last": True}
    s = SampleSettings.from_preset(preset_from_dict(d))
    assert (s.stream_dtype, s.attention, s.vae_channels_last) == ("autocast", "cudnn", True)
    with pytest.raises(ConfigError, match="train.stream_dtype"):
        preset_from_dict(d | {"train": d["train"] | {"stream_dtype": "bf16"}})


def test_sample_records_keep_their_keys_unless_the_stream_changes():
    base = SampleSettings()
    assert dataclasses.replace(base, attention="cudnn", vae_channels_last=True).to_dict() == base.to_dict()
    assert "stream_dtype" not in base.to_dict()  # an existing sample folder's record resumes
    assert dataclasses.replace(base, stream_dtype="autocast").to_dict()["stream_dtype"] == "autocast"


def test_lever_rungs_say_why_they_do_not_apply():
    cuda = torch.device("cuda")
    for r in [*TRAIN_LEVERS, *SAMPLE_LEVERS]:
        why = lever_refusal(r, CPU)
        assert (why is None) == r.vae_channels_last, r.name  # only the decoder's layout shows on a CPU
        if not r.fp8:
            assert lever_refusal(r, cuda) is None
        assert dataclasses.replace(r, name=OURS.name) != OURS  # each rung is one lever on top of ours
    assert "no VAE decoding" in lever_refusal(SAMPLE_LEVERS[0], CPU, decodes=False)


def test_bench_levers_on_the_cpu_run_uvit_and_skip_with_notes(tmp_path):
    p = tiny_preset(tmp_path)
    report = run_bench("train", p, batch=2, steps=1, levers=True, official=False, device=CPU)
    assert [m.recipe for m in report.measurements] == ["uvit"]
    skipped = report.settings["skipped"]
    assert set(skipped) == {r.name for r in TRAIN_LEVERS} and all("no CUDA" in w for w in skipped.values())
    report = run_bench("sample", p, batch=2, steps=1, levers=True, official=False, device=CPU)
    assert report.settings["skipped"]["+channels_last VAE"].startswith("no VAE decoding")  # a pixel preset


def test_a_bench_row_can_name_the_attention_kernel_it_runs(tmp_path):
    from uvit_cli.bench.recipes import for_device
    from uvit_cli.bench.tasks import attention_kernel, recipe_note

    p = tiny_preset(tmp_path)
    r = for_device(SAMPLE_LEVERS[2], CPU)  # +cuDNN attention, as the CPU runs it
    fwd, bwd = attention_kernel(r, p, CPU).split("/")
    assert fwd in ("flash", "math") and bwd in ("flash", "math")  # the CPU's kernels
    assert "/" not in recipe_note(r, p, CPU)  # named on CUDA only, where it tells cuDNN from flash


def test_the_start_line_names_the_levers_that_are_on():
    from uvit_cli.config import load_preset
    from uvit_cli.train.loop import _levers_on

    assert _levers_on(load_preset("shapes_uvit_tiny").train) == ""  # the official numerics: nothing to name
    on = load_preset(
        "shapes_uvit_tiny", ["train.fp8=true", "train.stream_dtype=autocast", "train.attention=cudnn"]
    )
    assert _levers_on(on.train) == ", stream_dtype=autocast, attention=cudnn, fp8"
