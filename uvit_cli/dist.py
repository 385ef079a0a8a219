"""Where a process computes: torch.distributed helpers (rank, world size, barrier, gathering, the process
group's lifetime), the `--device` a command runs on, and how many CPU threads torch uses.

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
