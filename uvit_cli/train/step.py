"""One optimiser step of U-ViT training (spec §3.5) and its one setup, shared by `uvit train`, `uvit bench`
and the tests.

Order, as the official `train_step`: loss, backward, (grad clip), optimizer.step at the scheduler's current
lr (so the first step runs at lr 0), lr_scheduler.step, EMA update. The official code zeroes the gradients
before the loss; we do it right after the optimizer step (set_to_none), which is the same arithmetic.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from uvit_cli.config import AttentionKernel, CompileMode, StreamDtype, TrainConfig
from uvit_cli.model import attention_kernels, set_autocast_stream
from uvit_cli.train.objective import DiffusionLoss, Objective, StepDraws

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

EmaFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], float], None]


# --------------------------------------------------------------------------------------------------
# Optimiser, learning rate, EMA


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LambdaLR factor min(step / warmup, 1): the first optimizer step runs at lr 0, as the official code."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


def build_optimizer(
    params: Sequence[nn.Parameter],
    *,
    lr: float,
    betas: Sequence[float],
    weight_decay: float,
    warmup_steps: int,
    fused: bool = False,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on every parameter (decay on all, as official), eps 1e-8, with the linear warm-up.

    Unfused, it takes the multi-tensor (foreach) path on every device, as torch does by default on CUDA: on
    the CPU it gives the per-parameter loop's result bit for bit, in 2/3 of its time."""
    opt = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        weight_decay=weight_decay,
        eps=1e-8,
        fused=True if fused else None,
        foreach=None if fused else True,
    )

    def factor(step: int) -> float:
        return warmup_factor(step, warmup_steps)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def ema_update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], rate: float) -> None:
    """p_ema <- rate * p_ema + (1 - rate) * p, in place (spec §3.5; fp32, no warm-up or bias correction)."""
    # The official utils.ema's arithmetic, rounding for rounding: mul_(rate), then add_ a separately rounded
    # (1 - rate) * p. Our EMA then equals the official one bit for bit (measured on CPU). A lerp would be
    # slightly more exact (float32(rate) + float32(1 - rate) = 1 - 1.7e-9 at 0.9999, so this EMA settles
    # 1.7e-5 relative below its target) but drifts from the official weights by ~1e-5 in 30 steps.
    # The temporary product reuses the memory the gradients just freed (zero_grad runs first).
    ema_params = list(ema_params)
    torch._foreach_mul_(ema_params, rate)
    torch._foreach_add_(ema_params, torch._foreach_mul([p.detach().float() for p in params], 1.0 - rate))


# --------------------------------------------------------------------------------------------------
# The speed levers


@dataclass(frozen=True)
class Levers:
    """The speed switches of a training run (docs/training.md, *Speed switches*); the defaults are the
    official numerics. `uvit train` takes them from the preset's [train]; `uvit bench` from its recipes."""

    stream_dtype: StreamDtype = "fp32"  # "autocast": the residual stream in the autocast dtype
    attention: AttentionKernel = "auto"  # "cudnn": cuDNN attention first in SDPA's kernel order (CUDA)
    compile_mode: CompileMode = "default"  # torch.compile's mode, e.g. "max-autotune-no-cudagraphs"
    fp8: bool = False  # the blocks' linears as float8 matmuls (uvit_cli.fp8)

    @classmethod
    def of(cls, tc: TrainConfig) -> Levers:
        """The levers a preset's [train] table sets."""
        return cls(tc.stream_dtype, tc.attention, tc.compile_mode, tc.fp8)


# --------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepState:
    """What every step of one run uses: built once by the caller, then passed to `train_step`."""

    objective: Objective
    loss_fn: nn.Module  # DiffusionLoss(model), possibly wrapped by DDP and torch.compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]  # the online model's parameters, in `parameters()` order
    ema_params: list[torch.Tensor]  # the EMA model's, in the same order (named parameters only, no buffers)
    ema_rate: float
    grad_clip: float = 0.0  # max grad norm; 0 disables clipping
    amp_dtype: torch.dtype | None = None  # autocast dtype; None runs fp32
    ddp: DistributedDataParallel | None = None  # the wrapper inside loss_fn, for no_sync
    # The null condition on the device (`sample.null_condition`: the null label, or the set's CLIP('')); its
    # keys are the network's condition keywords. Empty for unconditional models.
    uncond: dict[str, torch.Tensor] = field(default_factory=dict)
    ema_fn: EmaFn = ema_update  # bench's official recipe swaps in the per-parameter loop
    attention: AttentionKernel = "auto"  # SDPA's kernel order around the network call (train.attention)
    # Sum of per-sample losses since the caller last read it: on the device, so no host sync per step.
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


def train_step(
    s: StepState,
    micro_batches: Iterable[tuple[dict[str, torch.Tensor], StepDraws]],
    n_micro: int,
    share: int,
) -> float:
    """One optimiser step over `n_micro` micro-batches (batch on the device, its rows of the step's draws).

    `share` is this rank's number of samples in the step; returns the lr the step ran at.
    """
    device_type = s.params[0].device.type
    autocast = torch.autocast(
        device_type, dtype=s.amp_dtype or torch.float32, enabled=s.amp_dtype is not None
    )
    device = s.params[0].device

    # ---- Forward and backward, micro-batch by micro-batch (gradients accumulate) --------------------
    for m, (batch, d) in enumerate(micro_batches):
        x0 = s.objective.clean_data(batch["x"], d)
        cond = s.objective.condition(batch, d, s.uncond)
        sqrt_ab, sqrt_1m_ab, timesteps = s.objective.coefficients(d.timesteps)
        weight = s.objective.loss_weight(sqrt_ab, sqrt_1m_ab)  # None: the paper's unweighted loss
        # DDP all-reduces the gradients once, on the last micro-batch.
        no_sync = s.ddp.no_sync() if s.ddp is not None and m < n_micro - 1 else contextlib.nullcontext()
        with no_sync:
            with autocast, attention_kernels(s.attention, device):
                per_sample = s.loss_fn(x0, d.eps, sqrt_ab, sqrt_1m_ab, timesteps, **cond)  # (micro,)
            # Sum / share: DDP's mean over ranks then makes it the global-batch mean. The logged loss is the
            # unweighted one, so runs with and without a weighting compare.
            optimised = per_sample if weight is None else per_sample * weight
            s.scaler.scale(optimised.sum() / share).backward()
        s.loss_sum += per_sample.detach().sum()

    # ---- Optimiser: clip, step at the scheduler's current lr, then advance the schedule --------------
    if s.grad_clip > 0:
        s.scaler.unscale_(s.opt)
        torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
    lr = s.opt.param_groups[0]["lr"]
    s.scaler.step(s.opt)
    s.scaler.update()
    s.opt.zero_grad(set_to_none=True)
    s.sched.step()

    # ---- EMA of the weights --------------------------------------------------------------------------
    s.ema_fn(s.ema_params, s.params, s.ema_rate)
    return lr


def setup_step(
    preset: Any,
    model: nn.Module,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    compile: bool | str | Callable[..., Any] = False,
    fused: bool = False,
    ddp: bool = False,
    warmup_steps: int | None = None,
    uncond: Mapping[str, torch.Tensor] | None = None,
    ema_fn: EmaFn = ema_update,
    levers: Levers | None = None,
) -> tuple[StepState, nn.Module]:
    """The step state for training `model` (on `device`) with `preset.train`, and its EMA model.

    The EMA is an fp32 copy of the online weights (the official `ema_update(0)`); AdamW with the linear
    warm-up (`warmup_steps`, default the preset's); a grad scaler for fp16; the loss wrapped by DDP when
    `ddp`, then by `torch.compile` when `compile` (True, or a backend: "aot_eager", a test's counter).
    The speed levers are `levers`, default the preset's (train.stream_dtype, attention, compile_mode, fp8):
    the stream dtype and FP8 linears change the online model in place, after the EMA copy is made.
    """
    tc = preset.train
    lv = levers or Levers.of(tc)
    ema = copy.deepcopy(model).requires_grad_(False)
    set_autocast_stream(model, lv.stream_dtype == "autocast")
    if lv.fp8:
        from uvit_cli.fp8 import convert_to_float8, fp8_refusal

        why = fp8_refusal(device)
        if why is not None:
            from uvit_cli.errors import ConfigError

            raise ConfigError(f"train.fp8 = true: {why}; set train.fp8 = false")
        convert_to_float8(model)
    params = list(model.parameters())
    opt, sched = build_optimizer(
        params,
        lr=tc.lr,
        betas=tc.betas,
        weight_decay=tc.weight_decay,
        warmup_steps=tc.warmup_steps if warmup_steps is None else warmup_steps,
        fused=fused,
    )
    loss_module: nn.Module = DiffusionLoss(model, objective=tc.objective)
    wrapper = None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        wrapper = DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)
        loss_module = wrapper
    if compile:
        # The mode is inductor's; another backend (a test's aot_eager) takes none.
        mode = None if lv.compile_mode == "default" else lv.compile_mode
        compiled = (
            torch.compile(loss_module, mode=mode)
            if compile is True
            else torch.compile(loss_module, backend=compile)
        )
        loss_module = cast(nn.Module, compiled)  # an OptimizedModule
    state = StepState(
        objective=Objective.for_preset(preset, device),
        loss_fn=loss_module,
        opt=opt,
        sched=sched,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        params=params,
        ema_params=list(ema.parameters()),
        ema_rate=tc.ema_rate,
        grad_clip=tc.grad_clip,
        amp_dtype=amp_dtype,
        ddp=wrapper,
        uncond={k: v.to(device) for k, v in (uncond or {}).items()},
        ema_fn=ema_fn,
        attention=lv.attention,
        loss_sum=torch.zeros((), device=device),  # on the device: no host sync until it is read
    )
    return state, ema


# --------------------------------------------------------------------------------------------------
# What a run needs

# Bytes per parameter that training holds whatever the batch: fp32 weights, their fp32 EMA copy, fp32
# gradients and AdamW's two fp32 moments. Activations come on top, so this is a lower bound.
TRAIN_BYTES_PER_PARAM = 4 + 4 + 4 + 8


def require_training_memory(preset: Any, device: torch.device) -> int:
    """Refuse, before anything is allocated, a model whose training state cannot fit (`resources`, the one
    estimate; ResourceError, one line with the numbers). Returns the number of parameters."""
    from uvit_cli.errors import ResourceError
    from uvit_cli.model import UViT
    from uvit_cli.resources import MEMORY_SHARE, fmt_bytes, require_memory

    with torch.device("meta"):  # shapes only: no memory, no init cost
        n = sum(p.numel() for p in UViT(**preset.model).parameters())
    m = preset.model
    what = f"training a U-ViT of {n / 1e6:,.1f}M parameters (model.embed_dim {m.embed_dim}, depth {m.depth})"
    fix = "choose a smaller model (model.embed_dim, model.depth)"
    on_gpu = device.type == "cuda"
    # A GPU run builds the weights on the host first, then keeps everything on the GPU.
    require_memory(what, n * (4 if on_gpu else TRAIN_BYTES_PER_PARAM), fix=fix)
    if on_gpu:
        free, _ = torch.cuda.mem_get_info(device)
        need = n * TRAIN_BYTES_PER_PARAM
        if need > MEMORY_SHARE * free:
            raise ResourceError(
                f"{what} needs about {fmt_bytes(need)} of GPU memory, and {fmt_bytes(free)} is free on "
                f"{device}: {fix}"
            )
    return n
