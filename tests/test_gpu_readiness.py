"""What would crash, slow down or run out of memory on a first GPU run, caught on the CPU.

Three checks beside tests/test_cuda_paths_on_cpu.py (which holds the host-sync detector `_HostSyncs`):
* the sampling loop of every solver waits for the device nowhere between a batch's first network call and its
  final latents;
* the real S/2-Deep and H/2 networks (with and without activation checkpointing) trace into one graph that
  does not recompile, for the training step and for guided sampling (slow);
* each recipe of `uvit bench --compare` frees its model before the next recipe builds one.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import weakref
from collections import Counter

import pytest
import torch
from encoder_fixtures import tiny_autoencoder
from test_cuda_paths_on_cpu import _SYNCS, _HostSyncs

from uvit_cli.config import Preset, preset_from_dict
from uvit_cli.model import UViT
from uvit_cli.sample import (
    SampleOptions,
    SampleSettings,
    class_conditions,
    context_conditions,
    generate,
    null_condition,
)
from uvit_cli.schedule import DiscreteVPSchedule

# `uvit_cli.sample.generate` is also the name of the function the package exports: import the module by path.
generate_module = importlib.import_module("uvit_cli.sample.generate")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_preset(solver: str, objective: str, kind: str, cond: str) -> Preset:
    """A tiny guided preset (p_uncond > 0): class-conditional pixels, or text-conditional latents."""
    latent = cond == "text"
    model: dict = dict(
        img_size=8, patch_size=2, in_chans=4 if latent else 3, embed_dim=32, depth=2, num_heads=2
    )
    if latent:
        model.update(clip_dim=16, num_clip_token=5)
    else:
        model["num_classes"] = 5
    train: dict = dict(steps=4, batch_size=8, lr=1e-3, p_uncond=0.2, objective=objective, compile=False)
    if objective == "flow":
        train["time_shift"] = 2.0
    d: dict = {
        "name": f"tiny_{solver}_{objective}",
        "model": model,
        "data": {
            "kind": "shapes",
            "path": "unused",
            "space": "latent" if latent else "pixel",
            "resolution": 64 if latent else 8,
        },
        "schedule": {"kind": kind},
        "train": train,
        "sample": {"solver": solver, "steps": 4, "cfg_scale": 1.0, "batch_size": 2},
    }
    if latent:
        d["autoencoder"] = {"scale_factor": 0.18215}
        d["text_encoder"] = {"kind": "toy"}
    return preset_from_dict(d)


# --------------------------------------------------------------------------------------------------
# 1. The sampling loop waits for the device nowhere


class _SamplingSyncs(_HostSyncs):
    """Host syncs made by uvit code inside each batch's solver loop, and (apart) the ones made outside it.

    The window opens at a batch's first network call (a forward pre-hook) and closes when `sample_latents`
    returns its latents: everything between is the per-step part (the solver, the schedule, the guidance and
    objective adapters, the network call of generate.py, the network itself). Before the window, the schedule's
    time grid may read Python floats once per batch (`time_logsnr`), and the starting noise and conditions are
    copied to the device; after it, `to_uint8`'s copy to the CPU is the batch's one intended sync.

    A sync is a tensor -> host conversion (`_SYNCS`: `.item()`, `.cpu()`, `bool(t)` ...) or a blocking copy to a
    device (`.to(device)` / `.cuda()` without non_blocking: on CUDA a copy from pageable memory waits for the
    stream). On the CPU every tensor is already on its device, so every such copy is counted as one that would
    cross to the GPU. `torch.tensor(..., device=)` is invisible to a TorchFunctionMode (torch ignores it)."""

    def __init__(self) -> None:
        super().__init__("/uvit_cli/")
        self.inside, self.outside = Counter(), Counter()
        self.hits = self.outside

    def arm(self) -> None:
        self.hits = self.inside

    def disarm(self) -> None:
        self.hits = self.outside

    def is_sync(self, func, args, kwargs) -> bool:
        name = getattr(func, "__name__", "")
        if name in _SYNCS:
            return True
        if name not in ("to", "cuda") or kwargs.get("non_blocking"):
            return False
        if name == "cuda":
            return True
        moves = [a for a in args[1:] if isinstance(a, (torch.device, str, torch.Tensor))]
        return bool(moves) or kwargs.get("device") is not None


def _generate_in_windows(p: Preset, model: UViT, monkeypatch, arm, disarm) -> None:
    """generate() of 3 images in batches of 2 with guidance and a guidance interval on the model's device;
    `arm()` at each batch's first network call, `disarm()` when its `sample_latents` returns."""
    real = generate_module.sample_latents

    def sample_latents(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        finally:
            disarm()

    monkeypatch.setattr(generate_module, "sample_latents", sample_latents)
    device = next(model.parameters()).device
    s = SampleSettings.from_preset(p, SampleOptions(guidance_interval=(0.2, 0.8)))
    vae = None
    if p.model.conditioning == "text":
        g = torch.Generator().manual_seed(1)
        contexts = torch.randn(3, p.model.num_clip_token, p.model.clip_dim, generator=g)
        conditions = context_conditions(contexts, [0, 1, 2])
        uncond = null_condition(p.model, torch.zeros(p.model.num_clip_token, p.model.clip_dim))
        vae = tiny_autoencoder().to(device)
    else:
        conditions, uncond = class_conditions([3, 0, 1]), null_condition(p.model)
    hook = model.register_forward_pre_hook(lambda *_: arm())
    try:
        out = list(generate(model, p, range(3), conditions, uncond, seed=0, autoencoder=vae, settings=s))
    finally:
        hook.remove()
        disarm()
    assert [i for i, _ in out] == [[0, 1], [2]]


def _run_under_detector(p: Preset, model: UViT, monkeypatch) -> _SamplingSyncs:
    syncs = _SamplingSyncs()
    with syncs:
        _generate_in_windows(p, model, monkeypatch, syncs.arm, syncs.disarm)
    return syncs


# (solver, objective, schedule kind, conditioning): every solver, the presets' pairs first.
_SOLVER_CASES = [
    ("dpm_solver_pp", "eps", "discrete", "class"),  # imagenet256_uvit_h2, imagenet512_uvit_h4
    ("dpm_solver_pp", "eps", "discrete", "text"),  # coco_uvit_s2(_deep)
    ("dpm_solver", "eps", "continuous", "class"),  # imagenet256_uvit_l2, imagenet64, imagenet512_uvit_l4
    ("euler_maruyama", "eps", "continuous", "class"),  # cifar10, celeba64 (unconditional there)
    ("flow_euler_maruyama", "flow", "discrete", "text"),  # coco_uvit_s2_deep_flow, imagenet256_*_flow
    ("flow_heun", "flow", "discrete", "class"),  # shapes_uvit_tiny_flow
    ("dpm_solver_pp", "v", "continuous", "class"),  # shapes_uvit_tiny_v
    ("dpm_solver_pp_2m", "eps", "discrete", "class"),
    ("ddim", "eps", "discrete", "class"),
    ("euler_ode", "eps", "continuous", "class"),
    ("flow_euler", "flow", "discrete", "class"),
]


@pytest.mark.parametrize(("solver", "objective", "kind", "cond"), _SOLVER_CASES)
def test_sampling_loop_makes_no_host_sync(solver, objective, kind, cond, monkeypatch):
    """`sample.generate` with guidance (cfg_scale 1, a guidance interval) and class or text conditions: nothing
    from a batch's first network call to its final latents waits for the device (see `_SamplingSyncs`); the
    conversion to 8-bit images after it is the one sync of a batch, and the detector sees it."""
    p = _tiny_preset(solver, objective, kind, cond)
    torch.manual_seed(0)
    model = UViT(**p.model.model_dump()).eval()
    syncs = _run_under_detector(p, model, monkeypatch)
    assert not syncs.inside, dict(syncs.inside)
    assert any(k.startswith("cpu at generate.py") for k in syncs.outside), dict(syncs.outside)


def test_sampling_sync_detector_sees_planted_syncs(monkeypatch):
    """Positive controls: a `.item()` per step planted in the schedule and the per-image blocking noise copy
    of a stochastic solver are both seen inside the window."""
    p = _tiny_preset("dpm_solver_pp", "eps", "discrete", "class")
    model = UViT(**p.model.model_dump()).eval()

    def timestep_input(self, t):
        t.max().item()  # a host read per network call
        return t * self.time_scale

    monkeypatch.setattr(DiscreteVPSchedule, "timestep_input", timestep_input)
    syncs = _run_under_detector(p, model, monkeypatch)
    assert any(k.startswith("item at base.py") for k in syncs.inside), dict(syncs.inside)
    monkeypatch.undo()

    from uvit_cli.solvers import euler

    def randn_like(x, generator):  # one blocking copy per image and step
        return torch.stack([torch.randn(x.shape[1:], generator=g).to(x.device) for g in generator])

    monkeypatch.setattr(euler, "_randn_like", randn_like)
    p = _tiny_preset("euler_maruyama", "eps", "continuous", "class")
    syncs = _run_under_detector(p, model, monkeypatch)
    assert any(k.startswith("to at euler.py") for k in syncs.inside), dict(syncs.inside)


@pytest.mark.gpu
@pytest.mark.parametrize(("solver", "objective", "kind", "cond"), _SOLVER_CASES[:5])
def test_sampling_loop_makes_no_host_sync_on_cuda(solver, objective, kind, cond, monkeypatch):
    """The same window on a GPU, checked by CUDA itself: torch's sync debug mode raises on every synchronising
    call (a blocking copy, `.item()`, a stream synchronisation) from a batch's first network call to its
    latents."""
    p = _tiny_preset(solver, objective, kind, cond)
    torch.manual_seed(0)
    model = UViT(**p.model.model_dump()).cuda().eval()
    arm = functools.partial(torch.cuda.set_sync_debug_mode, "error")
    disarm = functools.partial(torch.cuda.set_sync_debug_mode, "default")
    _generate_in_windows(p, model, monkeypatch, arm, disarm)


# --------------------------------------------------------------------------------------------------
# 2. The real sizes trace into one graph that does not recompile (slow)


def _real_batch(p: Preset, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One training item of the real shapes: stored latent moments (1, 8, 32, 32) and a label or a context."""
    m = p.model
    b = {"x": torch.randn(1, 2 * m.in_chans, m.img_size, m.img_size, generator=g)}
    if m.conditioning == "class":
        b["y"] = torch.randint(0, m.num_classes - 1, (1,), generator=g)
    else:
        b["context"] = torch.randn(1, m.num_clip_token, m.clip_dim, generator=g)
    return b


def _trace_two_train_steps(p: Preset, model: UViT, full_recipe: bool, monkeypatch) -> None:
    """Two steps of batch 1 of `uvit train`'s step (setup_step, train_step) under bf16 autocast with the loss
    module compiled by aot_eager, fullgraph, recompiles as errors. `full_recipe`: fused AdamW and the EMA;
    else a stateless optimiser and no EMA (the H/2 AdamW moments and EMA copy would add 6 GB; the compiled
    graph, the loss module's forward and backward, is the same)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from uvit_cli.train.step import setup_step, train_step

    m = p.model
    counter = CompileCounterWithBackend("aot_eager")
    real = torch.compile
    with monkeypatch.context() as mp:
        mp.setattr(torch, "compile", lambda module, **kw: real(module, fullgraph=True, **kw))
        s, ema = setup_step(
            p,
            model,
            torch.device("cpu"),
            amp_dtype=torch.bfloat16,
            compile=counter,
            fused=full_recipe,
            uncond=null_condition(m, torch.zeros(m.num_clip_token, m.clip_dim or 1)),
        )
    if not full_recipe:
        del ema
        s.ema_params, s.ema_fn = [], lambda *_: None
        s.opt = torch.optim.SGD(s.params, lr=0.0)
        s.sched = torch.optim.lr_scheduler.LambdaLR(s.opt, lambda _: 1.0)
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            train_step(s, [(_real_batch(p, g), s.objective.draw(g, 1))], n_micro=1, share=1)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs; see TORCH_LOGS=graph_breaks,recompiles"
    assert torch.isfinite(s.loss_sum), s.loss_sum


def _trace_guided_sampling(p: Preset, model: UViT, monkeypatch) -> None:
    """`sample.generate` of one image, 2 solver steps, the preset's guidance with an interval: the network
    call (batch 2: cond and uncond) compiled by aot_eager, fullgraph, bf16, recompiles as errors."""
    from torch._dynamo.testing import CompileCounterWithBackend

    m = p.model
    counter = CompileCounterWithBackend("aot_eager")
    real = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda module, mode=None, **kw: real(module, backend=counter, fullgraph=True, **kw)
    )
    s = SampleSettings.from_preset(
        p, SampleOptions(steps=2, batch_size=1, precision="bf16", compile=True, guidance_interval=(0.0, 0.9))
    )
    assert s.cfg_scale > 0
    if m.conditioning == "class":
        conditions, uncond = class_conditions([7]), null_condition(m)
    else:
        g = torch.Generator().manual_seed(0)
        conditions = context_conditions(torch.randn(1, m.num_clip_token, m.clip_dim, generator=g), [0])
        uncond = null_condition(m, torch.zeros(m.num_clip_token, m.clip_dim))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = list(
            generate(
                model.eval(), p, range(1), conditions, uncond, autoencoder=tiny_autoencoder(), settings=s
            )
        )
    assert out[0][1].shape == (1, 256, 256, 3)
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "full_recipe"), [("coco_uvit_s2_deep", True), ("imagenet256_uvit_h2", False)]
)
def test_real_sizes_trace_without_recompiles(name, full_recipe, monkeypatch):
    """S/2-Deep (text, 58M) and H/2 (class, 501M) at batch 1 (latent 4x32x32): the training step with and
    without activation checkpointing, then guided sampling, each one aot_eager graph that the second step or
    network call reuses. One model at a time (H/2: 2 GB of weights, ~5 GB at the peak), freed after use.
    Measured on a shared 2-core machine, one thread: S/2-Deep 23 s, H/2 92 s."""
    from uvit_cli.config import load_preset

    for use_checkpoint in (True, False):
        torch._dynamo.reset()
        p = load_preset(name, [f"model.use_checkpoint={str(use_checkpoint).lower()}"])
        torch.manual_seed(0)
        model = UViT(**p.model.model_dump())
        _trace_two_train_steps(p, model, full_recipe, monkeypatch)
        if not use_checkpoint:  # sampling runs without gradients: checkpointing does not change its graph
            torch._dynamo.reset()
            _trace_guided_sampling(p, model, monkeypatch)
        alive = weakref.ref(model)
        del model
        torch._dynamo.reset()
        gc.collect()
        assert alive() is None, "the model outlived its test case: the next one would hold two in memory"


# --------------------------------------------------------------------------------------------------
# 3. Each recipe of `uvit bench --compare` frees its model before the next one is built


@pytest.mark.parametrize("task", ["train", "sample"])
def test_bench_ladder_frees_each_recipe_model(task, monkeypatch):
    """`uvit bench train|sample --compare` on the tiny preset, its ladder run backwards so that the compiled
    recipes (aot_eager; on the CPU `for_device` turns compiling off) come first and the others build their
    networks after a compile: when a recipe builds its network, no earlier recipe's is alive, with the garbage
    collector off (a model freed only by a collection could outlive, on a GPU, the next one's allocation). On
    an 80 GB GPU an H/2 ladder that kept one more model (weights, AdamW moments, EMA, a compiled graph's
    cache) would run out of memory."""
    import uvit_cli.bench as bench
    from uvit_cli.bench import run_bench, tasks
    from uvit_cli.config import load_preset

    built: list[weakref.ref] = []
    alive_at_build: list[int] = []
    compiled: list[str] = []
    real_uvit, real_for_device, real_compile = tasks.UViT, tasks.for_device, torch.compile

    def uvit(*args, **kwargs):
        model = real_uvit(*args, **kwargs)
        if next(model.parameters()).device.type != "meta":  # forward_flops counts on the meta device
            alive_at_build.append(sum(r() is not None for r in built))
            built.append(weakref.ref(model))
        return model

    def for_device(recipe, device):
        return dataclasses.replace(real_for_device(recipe, device), compile=recipe.compile)

    def compile_(module, mode=None, **kw):
        compiled.append(type(module).__name__)
        return real_compile(module, backend="aot_eager", **kw)

    monkeypatch.setattr(tasks, "UViT", uvit)
    monkeypatch.setattr(tasks, "for_device", for_device)
    monkeypatch.setattr(torch, "compile", compile_)
    ladder = "TRAIN_LADDER" if task == "train" else "SAMPLE_LADDER"
    monkeypatch.setattr(bench, ladder, getattr(bench, ladder)[::-1])
    p = load_preset("shapes_uvit_tiny", ["sample.steps=2"])
    gc.collect()
    gc.disable()
    try:
        report = run_bench(task, p, batch=2, steps=1, compare=True)
        left = sum(r() is not None for r in built)
    finally:
        gc.enable()
    assert len(report.measurements) == len(built) >= 5, ([m.recipe for m in report.measurements], len(built))
    assert compiled[0] in ("DiffusionLoss", "UViT"), compiled  # a compiled recipe ran first
    assert alive_at_build == [0] * len(built), alive_at_build
    assert left == 0, "the last recipe's model outlived run_bench"
