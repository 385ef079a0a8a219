"""What every subcommand shares: the console, error rendering, the options several commands take (`Annotated`
aliases, declared once) and `sampler_spec`."""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from uvit_cli.config import SOLVER_NAMES, LabelProtocol, ModelWeights, NetworkPrecision
from uvit_cli.errors import UvitError

if TYPE_CHECKING:
    from uvit_cli.prepare import PrepareResult, Progress
    from uvit_cli.sample.resolve import SamplerSpec

console = Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line in logs too
out = Console(highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def option(*names: str, **kw: Any) -> Any:
    """A `typer.Option` whose help states its default itself (or that has none worth showing)."""
    return typer.Option(*names, show_default=False, **kw)


SetOption = Annotated[
    list[str] | None,
    option("--set", help="Override a preset value, e.g. --set train.lr=1e-4 (repeatable)."),
]


def is_rank0() -> bool:
    """Under torchrun only rank 0 draws bars and prints (read from the environment: no torch import)."""
    return int(os.environ.get("RANK", "0")) == 0


def log_rank0(msg: str) -> None:
    """A status line on stderr from rank 0 (which run, which weights): the `log=` of the workflows."""
    if is_rank0():
        console.print(msg, soft_wrap=True, markup=False)


def image_progress(*, note: bool = False, transient: bool = False) -> Any:
    """The rich progress bar of image work (prepare, sample, fid): count, images/s, ETA; rank 0 only.

    Each task shows its description; with `note=True` it also takes a `note` field shown after the ETA.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:7.2f} img/s" if speed else "    -- img/s")

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
    ]
    if note:
        columns.append(TextColumn("{task.fields[note]}"))
    return Progress(*columns, console=console, transient=transient, disable=not is_rank0())


class PrepareReport:
    """The progress bar of a prepare workflow (it reports to `report.update`), then its summary: rank 0 only."""

    def __init__(self, precision: str = "fp32") -> None:
        from uvit_cli.prepare.check import precision_warning

        if (note := precision_warning(precision)) and is_rank0():
            warn(note)
        self.t0, self.bar, self.tasks = time.perf_counter(), image_progress(note=True), dict[str, Any]()

    def __enter__(self) -> PrepareReport:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, p: Progress) -> None:
        if p.split not in self.tasks:
            self.tasks[p.split] = self.bar.add_task(p.split, total=p.total, note="")
        self.bar.update(self.tasks[p.split], completed=p.done, total=p.total, note=p.note())

    def done(self, result: PrepareResult) -> None:
        """Close the bar and print the summary of `result`."""
        self.bar.stop()
        if is_rank0():
            out.print("\n".join(result.summary(time.perf_counter() - self.t0)))
            for line in result.skipped_warnings():
                warn(line)


def warn(message: str) -> None:
    """Print one yellow warning line (the message's own "[...]" stays text)."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one red line and return the Exit to raise."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # "[...]" in a message stays text
    return typer.Exit(code)


# What to do about an operating-system error, by errno; the rest get the system's own words.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space and rerun the same command (finished work is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun the same command (finished work is kept)",
    errno.ENAMETOOLONG: "a name is longer than 255 bytes or the path longer than the system allows: use a shorter one",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path",
    errno.EISDIR: "this is a directory, but a file is needed here",
    errno.EEXIST: "a file exists under this name where a directory is needed: choose another path",
    errno.EACCES: "permission denied: choose a path you can write to",
    errno.EPERM: "operation not permitted: choose a path you can write to",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOENT: "no such file or directory",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path(s), what happened, what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = _OS_ADVICE.get(e.errno or -1) or e.strerror or str(e) or type(e).__name__
    return f"{where}: {what}" if where else f"{what} ({e.strerror or type(e).__name__})"


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit code: no tracebacks for users."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UvitError as e:
            raise fail(str(e), e.exit_code) from None
        except OSError as e:
            raise fail(describe_os_error(e), 1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Options shared by several commands, defined once (same flag, same meaning everywhere).

DeviceOpt = Annotated[str | None, option("--device", help="cpu, cuda, cuda:1 (default: cuda if available).")]
VaeOpt = Annotated[
    str | None,
    option(
        "--vae",
        help="Autoencoder weights: file, directory or hub id (default: $UVIT_VAE, the preset's pretrained, HF cache).",
    ),
]
ClipOpt = Annotated[
    str | None,
    option(
        "--clip",
        help="CLIP text encoder: file, directory or hub id (default: $UVIT_CLIP, the preset's pretrained, HF cache).",
    ),
]
# Sampling (uvit sample, uvit fid --ckpt): the same flags for the same settings.
CkptOpt = Annotated[
    str | None,
    option(
        "--ckpt",
        help="Our .safetensors / run dir / exported folder, a Hub model ORG/NAME or hf://ORG/NAME/FILE, or the "
        "paper's nnet_ema.pth (+ --preset).",
    ),
]
PresetOpt = Annotated[
    str | None, option("--preset", help="Preset name or .toml: for an official .pth, or to find runs/NAME.")
]
SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, help="Image i draws from a generator seeded by (seed, i).")
]
StepsOpt = Annotated[int | None, option("--steps", min=1, help="Solver steps (default: the preset's).")]
CfgScaleOpt = Annotated[
    float | None,
    option(
        "--cfg-scale",
        min=0.0,
        help="Guidance s: eps_c + s (eps_c - eps_u); 0 = none (default: the preset's).",
    ),
]
SolverOpt = Annotated[
    str | None, option("--solver", help=f"One of {', '.join(SOLVER_NAMES)} (default: the preset's).")
]
GuidanceIntervalOpt = Annotated[
    tuple[float, float] | None,
    option("--guidance-interval", help="Guide only for solver times t in [LO, HI] (t in (0, 1])."),
]
SampleBatchOpt = Annotated[
    int | None,
    option(
        "--batch-size", min=1, help="Images per batch per GPU (default: the preset's); results do not change."
    ),
]
ModelWeightsOpt = Annotated[
    ModelWeights, typer.Option("--model-weights", help="EMA or online weights of our checkpoints.")
]
PrecisionOpt = Annotated[
    NetworkPrecision | None,
    option("--precision", help="Network autocast (default: bf16 on CUDA, fp32 on CPU)."),
]
NoCompileOpt = Annotated[bool, typer.Option("--no-compile", help="Do not torch.compile the network.")]
LabelProtocolName = LabelProtocol  # the label protocols of class-conditional sampling (config.LabelProtocol)
CLASSES_HELP = (
    "Label every image by its index: balanced (class = index % K, N/K of each class: RAE/REPA-E's FID-50K, "
    "about 0.1 FID lower on strong models) or random (uniform from (seed, index): U-ViT's ImageNet FID)"
)
# uvit fid --ckpt (and any command whose default is the paper's random labels)
ClassesOpt = Annotated[
    LabelProtocolName, option("--classes", help=f"{CLASSES_HELP}. Default: random, as U-ViT's paper.")
]


def sampler_spec(
    *,
    ckpt: str | None,
    preset: str | None,
    seed: int,
    steps: int | None,
    cfg_scale: float | None,
    solver: str | None,
    guidance_interval: tuple[float, float] | None,
    batch_size: int | None,
    precision: NetworkPrecision | None,
    no_compile: bool,
    model_weights: ModelWeights,
    vae: str | None,
    set_: list[str] | None,
    decode_batch_size: int | None = None,
    cuda_graphs: bool = False,
) -> SamplerSpec:
    """The core's `SamplerSpec` of the sampling options, its settings the typed `SampleOptions` (None keeps
    the preset's value or the core's default; compiling is the core's choice unless --no-compile), checked
    against the preset once, when the workflow has loaded it."""
    from uvit_cli.hub import hub_ref  # torch-free

    # Fails in a second, before torch loads; a Hub model (org/name, hf://...) is looked up when loading.
    if ckpt is not None and not os.path.exists(ckpt) and hub_ref(ckpt) is None:
        raise fail(
            f"--ckpt {ckpt}: no such file or directory (pass a .safetensors/.pth file, a run dir or a Hub "
            "model ORG/NAME)",
            2,
        )
    from uvit_cli.sample import SampleOptions, SamplerSpec

    options = SampleOptions(
        solver=solver,
        steps=steps,
        cfg_scale=cfg_scale,
        guidance_interval=guidance_interval,
        batch_size=batch_size,
        decode_batch_size=decode_batch_size,
        precision=precision,
        compile=False if no_compile else None,
        cuda_graphs=cuda_graphs,
    )
    return SamplerSpec(
        ckpt=ckpt,
        preset=preset,
        overrides=list(set_ or []),
        ema=model_weights == "ema",
        settings=options,
        seed=seed,
        vae=vae,
    )
