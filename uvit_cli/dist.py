"""Where a process computes: torch.distributed helpers (rank, world size, barrier, gathering, the process
group's lifetime), the `--device` a command runs on, how many CPU threads torch uses, and the CUDA backend
settings (TF32, cuDNN autotuning) every command that runs a network applies (`cuda_defaults`).

Every helper works without an initialised process group (one process: rank 0 of 1), so workflows call
them unconditionally. `init_from_env` reads the variables `torchrun` sets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td

from uvit_cli.errors import ConfigError


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return td.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and td.get_world_size() > 1:
        td.barrier()


def device(name: str | torch.device | None = None) -> torch.device:
    """The device a `--device` value names, checked to exist here; None: cuda:LOCAL_RANK when CUDA is
    available, else the CPU. A name that is not a device, or a GPU this machine lacks, is a ConfigError."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"--device {name}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: uvit runs on cpu, cuda or cuda:N")
    return dev


def init_from_env() -> bool:
    """Join the process group described by torchrun's env vars (nccl on CUDA, gloo on CPU).

    Returns True when running distributed. A single process (no WORLD_SIZE, or 1) is left alone.
    Idempotent: a second call is a no-op.
    """
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        td.init_process_group("nccl", device_id=device())
    else:
        td.init_process_group("gloo")
    return True


def destroy() -> None:
    if is_initialized():
        td.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[bool]:
    """Join torchrun's process group for the block (`init_from_env`) and leave it after, if the block was
    the one that joined; yields whether the run is distributed."""
    joined = not is_initialized() and init_from_env()
    try:
        yield is_initialized()
    finally:
        if joined:
            destroy()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` when not distributed)."""
    if not is_initialized() or td.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# CPU threads

# Below this many parameters every op of a U-ViT is too small to split across cores: one intra-op thread is
# as fast on a quiet machine (shapes_uvit_tiny, 0.28M parameters: 27.2 ms/step on one thread, 27.7 on two)
# and keeps its speed when another process uses the cores, where torch's default of one thread per core
# waits on the busy ones (the quickstart fell from ~800 to ~30 img/s beside another torch process).
SMALL_MODEL_PARAMS = 2_000_000


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads torch should use (None: leave torch's own choice) and why, in words."""

    threads: int | None
    why: str


def choose_cpu_threads(
    params: int, requested: int | None = None, env: Mapping[str, str] | None = None
) -> ThreadChoice:
    """The one rule: `requested` (--threads) > $OMP_NUM_THREADS (torch read it at start) > one thread for
    a model under SMALL_MODEL_PARAMS > torch's default (one per core)."""
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads {requested}: must be 1 or more")
        return ThreadChoice(requested, "--threads")
    if env.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS'].strip()}")
    if params < SMALL_MODEL_PARAMS:
        return ThreadChoice(
            1,
            f"a {params / 1e6:.2f}M-parameter model runs as fast on one and keeps its speed on a busy "
            "machine; --threads N to change",
        )
    return ThreadChoice(None, "torch's default, one per core")


def use_cpu_threads(params: int, requested: int | None = None) -> str:
    """Apply `choose_cpu_threads` to this process; return one line: how many threads torch uses, and why."""
    choice = choose_cpu_threads(params, requested)
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' if n != 1 else ''} for torch ({choice.why})"


# --------------------------------------------------------------------------------------------------
# CUDA set-up


def cuda_defaults(device: torch.device, *, tf32: bool = True, autotune: bool = True) -> str:
    """The one CUDA set-up of every command that runs a network on `device` (process-wide; a no-op off CUDA).

    `tf32`: fp32 matmuls on TF32 tensor cores (inputs rounded to 10 mantissa bits); False keeps them in full
    fp32, torch's default. Convolutions use TF32 either way, cuDNN's default and the official code's.
    `autotune`: `cudnn.benchmark`, the fastest convolution algorithm per shape, picked by timing, so the
    last bits can differ from run to run. Who passes what (docs/benchmarks.md, *CUDA settings*):

        train, sample, bench's uvit recipes   tf32, autotune: the network runs under bf16 autocast;
                                              TF32 reaches only what autocast leaves in fp32
                                              (`sample --precision fp32`: no tf32)
        fid                                   autotune, no tf32: features and metrics in fp32 (and
                                              in `exact_fp32()`); `--ckpt` generates as sample does
        prepare, bench's official recipes     neither: stored features within fp16 storage rounding of
                                              fp32 (CLIP under TF32 measured 2.4e-4 relative RMS, the
                                              storage 2.1e-4) and the same kernels on a rerun;
                                              torch's defaults are what the official code ran

    Returns one line saying what is set ("" off CUDA).
    """
    if device.type != "cuda":
        return ""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = autotune
    matmul = "TF32 matmuls" if tf32 else "fp32 matmuls"
    return f"{matmul}, TF32 convolutions, cuDNN {'autotuning' if autotune else 'heuristics'}"
