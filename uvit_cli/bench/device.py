"""What the device itself does: `uvit bench device` (the matmul and copy ceilings that MFU and bandwidth are
judged against) and `uvit bench attention` (which scaled-dot-product-attention kernel runs a preset's
attention, forward and backward, and how fast each backend is alone).

The kernel is read from the ATen op the call dispatched to (`aten._scaled_dot_product_flash_attention`,
`..._cudnn_attention`, `..._efficient_attention`, or the math path's matmuls), so the probe runs the same way
on a CPU; on CUDA the profiler names the longest-running GPU kernels too.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from uvit_cli import dist
from uvit_cli.bench.measure import Measurement, Timing, synchronize
from uvit_cli.config import ModelConfig, Preset

# The backends `sdpa_kernel` can pin, by the names the report uses.
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# ATen op name fragment -> kernel family; the first match wins (cuDNN's own kernels say "flash" too).
_FAMILIES = [
    ("cudnn_attention", "cudnn"),
    ("flash_attention", "flash"),
    ("efficient_attention", "efficient"),
    ("fused_attention_overrideable", "overrideable"),
    ("attention_math", "math"),
    ("bmm", "math"),
]


# --------------------------------------------------------------------------------------------------
# Ceilings


def bench_device(timing: Timing | None = None) -> list[Measurement]:
    """A large matmul in bf16 and in fp32 (TF32, as `dist.cuda_defaults` sets), and copies device to device
    and pinned host to device: the ceilings. CUDA: 8192³ and 1 GiB; CPU: fp32 512³ and 32 MiB only."""
    t = timing or Timing.of("device")
    device = t.device
    cuda = device.type == "cuda"
    settings = dist.cuda_defaults(device)
    n, nbytes = (8192, 1 << 30) if cuda else (512, 32 << 20)
    rows: list[Measurement] = []

    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        what = f"matmul {name} {n}³"
        if dtype != torch.float32 and not cuda:
            t.skipped(what, "no CUDA")
            continue
        t.say(what)
        g = torch.Generator(device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        note = "random data" + (f", {settings}" if dtype == torch.float32 and settings else "")
        t.add(
            rows,
            t.measure("device", what, functools.partial(torch.mm, a, b), batch=1, flops=2 * n**3, note=note),
        )
        del a, b

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    what = f"copy device→device {nbytes >> 20} MiB"
    t.say(what)
    t.add(rows, _copy_row(t, what, dst, src, 2 * nbytes, "bytes read + written"))
    what = f"copy host→device {nbytes >> 20} MiB (pinned)"
    if cuda:
        t.say(what)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        t.add(rows, _copy_row(t, what, dst, host, nbytes, "what the loader's batches cross"))
        del host
    else:
        t.skipped(what, "no CUDA")
    del src, dst
    return rows


def _copy_row(
    t: Timing, what: str, dst: torch.Tensor, src: torch.Tensor, moved: int, note: str
) -> Measurement:
    row = t.measure("device", what, lambda: dst.copy_(src, non_blocking=True), batch=1, flops=None, note=note)
    row.gb_per_s = moved / (row.ms_per_step / 1e3) / 1e9
    return row


# --------------------------------------------------------------------------------------------------
# Attention


def attention_shape(m: ModelConfig, batch: int) -> tuple[int, int, int, int]:
    """(B, H, T, Dh) of the network's attention: T = patch tokens + the time token + the condition's tokens."""
    extras = 1 + {"text": m.num_clip_token or 0, "class": 1}.get(m.conditioning, 0)
    return batch, m.num_heads, (m.img_size // m.patch_size) ** 2 + extras, m.embed_dim // m.num_heads


def kernel_family(op_names: set[str]) -> str:
    """The SDPA kernel family that the profiled ATen ops show, or '?' when none matches."""
    for fragment, family in _FAMILIES:
        if any(fragment in name for name in op_names):
            return family
    return "?"


class _OpNames(TorchDispatchMode):
    """Records the name of every ATen op dispatched inside it (the backward's too)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def op_families(call: Callable[[], torch.Tensor]) -> tuple[str, str]:
    """(forward, backward) kernel families of one attention `call` (its inputs require grad) and its backward,
    read from the ATen ops they dispatch to."""
    with _OpNames() as fwd:
        out = call()
    with _OpNames() as bwd:
        out.backward(torch.ones_like(out))
    return kernel_family(fwd.names), kernel_family(bwd.names)


def sdpa_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, str, list[str]]:
    """(forward family, backward family, the two longest-running CUDA kernels of each) of one SDPA call
    with the backend torch picks for these tensors."""
    fwd, bwd = op_families(lambda: F.scaled_dot_product_attention(q, k, v))
    q.grad = k.grad = v.grad = None
    kernels: list[str] = []
    if q.is_cuda:  # the GPU kernels themselves, from the profiler
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = F.scaled_dot_product_attention(q, k, v)
            out.backward(torch.ones_like(out))
            synchronize(q.device)
        q.grad = k.grad = v.grad = None
        gpu = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
        gpu.sort(key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
        kernels = [e.key[:90] for e in gpu[:3]]
    return fwd, bwd, kernels


def bench_attention(preset: Preset, *, batch: int, timing: Timing | None = None) -> list[Measurement]:
    """Forward + backward of the preset's attention at `batch`: the backend torch picks (bf16 on CUDA, as
    the uvit recipe runs it; fp32 on the CPU), each backend alone, and on CUDA the official recipe's fp32
    q, k, v. A backend that cannot run these tensors is reported through `timing.skip` with torch's reason."""
    t = timing or Timing.of("attention")
    device = t.device
    cuda = device.type == "cuda"
    B, H, T, Dh = attention_shape(preset.model, batch)
    flops = 3 * 4 * B * H * T * T * Dh  # q k^T and attn v, 2 FLOPs a multiply-add; backward = 2x forward
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = f"{B}x{H}x{T}x{Dh}"
    rows: list[Measurement] = []

    def tensors(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device).manual_seed(0)
        return tuple(
            torch.randn(B, H, T, Dh, device=device, dtype=dt, generator=g).requires_grad_() for _ in range(3)
        )

    def step_fn(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend | None
    ) -> Callable[[], None]:
        def step() -> None:
            q.grad = k.grad = v.grad = None
            if backend is None:
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
            out.backward(torch.ones_like(out))

        return step

    def run(recipe: str, dt: torch.dtype, backend: SDPBackend | None, tuned: bool = True) -> None:
        t.say(f"attention / {recipe}")
        settings = dist.cuda_defaults(device, tf32=tuned, autotune=tuned)  # the official: torch's defaults
        q, k, v = tensors(dt)
        step = step_fn(q, k, v, backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                step()
            except RuntimeError as e:  # this backend cannot run these tensors (dtype, head width, device)
                why = "; ".join(" ".join(str(w.message).split()) for w in caught) or " ".join(str(e).split())
                t.skipped(f"{recipe} {shape}", why[:300])  # torch's warnings say why each kernel refused
                return
        if backend is None:
            fwd, bwd, kernels = sdpa_kernels(q, k, v)
            picked = f"forward {fwd}, backward {bwd}" + (
                f"; kernels: {', '.join(kernels)}" if kernels else ""
            )
        else:
            picked = "alone"
        note = f"{shape} {'bf16' if dt == torch.bfloat16 else 'fp32'}, {picked}"
        if settings and dt == torch.float32:
            note += f"; {settings}"
        t.add(rows, t.measure("attention", recipe, step, batch=B, flops=flops, note=note))
        del q, k, v, step

    run("default", dtype, None)
    for name, backend in SDPA_BACKENDS.items():
        run(name, dtype, backend)
    if cuda:
        run("official (fp32 q, k, v)", torch.float32, None, tuned=False)
    else:
        t.skipped("official (fp32 q, k, v)", "no CUDA (on the CPU the default already runs fp32)")
    return rows
