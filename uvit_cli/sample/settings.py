"""What to sample with: a command's choices (`SampleOptions`, None keeps the preset's) resolved once against a
preset into the validated `SampleSettings` that `generate` takes, and the one guidance rule.

    options = SampleOptions(steps=25, cfg_scale=0.4)          # typed: a misspelled field is a mypy error
    settings = SampleSettings.from_preset(preset, options)    # flag > preset [sample] > default; checked here
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, get_args

from uvit_cli.config import (
    SOLVER_NAMES,
    AttentionKernel,
    CompileMode,
    NetworkPrecision,
    ObjectiveName,
    Preset,
    StreamDtype,
    check_solver,
)
from uvit_cli.errors import ConfigError

T = TypeVar("T")

DECODE_BATCH_SIZE = 50  # latents per autoencoder call: the official decode_large_batch chunk


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """The sampling choices of a command line (`uvit sample`, `uvit fid --ckpt`) or a workflow (training's
    FID, grids, bench); each None keeps the preset's [sample] value, or the default where the preset has none."""

    solver: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    batch_size: int | None = None
    decode_batch_size: int | None = None
    precision: NetworkPrecision | None = None
    compile: bool | None = None
    cuda_graphs: bool = False
    stream_dtype: StreamDtype | None = None
    attention: AttentionKernel | None = None
    compile_mode: CompileMode | None = None
    vae_channels_last: bool | None = None


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How to sample, checked on construction. `from_preset` is the way to make one for a model: it fills what
    is not asked from the preset's [sample] table and refuses guidance the model cannot take."""

    solver: str = "dpm_solver_pp"
    steps: int = 50
    cfg_scale: float = 0.0  # official convention: eps = eps_c + s (eps_c - eps_u)
    guidance_interval: tuple[float, float] | None = None  # solver times t in [lo, hi] get guidance
    batch_size: int = 50  # images per network batch (per GPU)
    decode_batch_size: int = DECODE_BATCH_SIZE  # latents per autoencoder call
    precision: NetworkPrecision | None = None  # None: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool | None = None  # torch.compile the network; None: on CUDA only (on a CPU it only costs time)
    cuda_graphs: bool = False  # compile with mode="reduce-overhead" (CUDA graphs of the network call)
    # The speed levers (docs/sampling.md, *Speed switches*); the defaults are the official numerics.
    stream_dtype: StreamDtype = "fp32"  # "autocast": the residual stream in the autocast dtype
    attention: AttentionKernel = "auto"  # "cudnn": cuDNN attention first (CUDA)
    compile_mode: CompileMode = "default"  # torch.compile's mode when the network is compiled
    vae_channels_last: bool = False  # the VAE decoder in channels_last, compiled on CUDA
    # What the model predicts and the flow path's time shift: its preset's train.objective and
    # train.time_shift (`from_preset` copies them; `sample_latents` refuses settings of another objective).
    objective: ObjectiveName = "eps"
    time_shift: float | None = None  # flow models only; None: unshifted

    def __post_init__(self) -> None:
        if self.solver not in SOLVER_NAMES:
            raise ConfigError(f"unknown solver '{self.solver}' (choose one of {', '.join(SOLVER_NAMES)})")
        if self.objective not in get_args(ObjectiveName):
            choices = ", ".join(get_args(ObjectiveName))
            raise ConfigError(f"unknown objective '{self.objective}' (choose one of {choices})")
        if self.time_shift is not None and not (
            self.objective == "flow" and 0 < self.time_shift < float("inf")
        ):
            raise ConfigError(
                f"time shift {self.time_shift}: a flow model's time shift is a finite number > 0 "
                f"(objective '{self.objective}')"
            )
        check_solver(self.solver, self.objective)  # one line naming the objective and the solvers that apply
        if self.steps < 1 or self.batch_size < 1 or self.decode_batch_size < 1:
            raise ConfigError("steps, batch size and decode batch size must be >= 1")
        if not (0 <= self.cfg_scale < float("inf")):  # NaN fails every comparison
            raise ConfigError(
                f"cfg scale must be a finite number >= 0 (official convention), got {self.cfg_scale}"
            )
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ConfigError(f"guidance interval must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")

    @classmethod
    def from_preset(cls, preset: Preset, options: SampleOptions | None = None) -> SampleSettings:
        """The settings of `options` on `preset`'s model: explicit (non-None) option > preset [sample] >
        default, with the model's objective and time shift (train.objective, train.time_shift). A solver that
        does not apply to the objective (`config.check_solver`) and guidance the model cannot take
        (`guidance_refusal`) are refused here, once."""
        o, s = options or SampleOptions(), preset.sample
        interval = o.guidance_interval if o.guidance_interval is not None else s.guidance_interval
        settings = cls(
            solver=_pick(o.solver, s.solver),
            steps=_pick(o.steps, s.steps),
            cfg_scale=float(_pick(o.cfg_scale, s.cfg_scale)),
            guidance_interval=(float(interval[0]), float(interval[1])) if interval is not None else None,
            batch_size=_pick(o.batch_size, s.batch_size),
            decode_batch_size=_pick(o.decode_batch_size, DECODE_BATCH_SIZE),
            precision=o.precision,
            compile=o.compile,
            cuda_graphs=o.cuda_graphs,
            objective=preset.train.objective,
            time_shift=preset.train.time_shift if preset.train.objective == "flow" else None,
            stream_dtype=_pick(o.stream_dtype, s.stream_dtype),
            attention=_pick(o.attention, s.attention),
            compile_mode=_pick(o.compile_mode, s.compile_mode),
            vae_channels_last=_pick(o.vae_channels_last, s.vae_channels_last),
        )
        why = guidance_refusal(preset) if settings.cfg_scale > 0 else None
        if why is not None:
            raise ConfigError(f"--cfg-scale {settings.cfg_scale:g}: {why}; use --cfg-scale 0")
        return settings

    def to_dict(self) -> dict[str, Any]:
        """What determines the images (for samples.jsonl and FID stamps); batch sizes do not. The objective
        and time shift are recorded for v and flow models only, so an eps model's record is what it always
        was (its sample folders resume, its stamps compare); so is the stream dtype, when it is not the
        official fp32. Kernel choices (compiling, its mode, the attention kernel, the decoder's memory layout)
        are not recorded: they move pixels by round-off only."""
        d = dataclasses.asdict(self)
        for k in ("batch_size", "decode_batch_size", "compile", "cuda_graphs", "attention", "compile_mode",
                  "vae_channels_last"):  # fmt: skip
            d.pop(k)
        if self.stream_dtype == "fp32":
            del d["stream_dtype"]
        d["guidance_interval"] = list(self.guidance_interval) if self.guidance_interval else None
        if self.objective == "eps":
            del d["objective"], d["time_shift"]
        return d


def _pick(explicit: T | None, preset: T) -> T:
    return preset if explicit is None else explicit


def guidance_refusal(preset: Preset) -> str | None:
    """Why classifier-free guidance cannot apply to `preset`'s model (it needs a conditional model trained with
    condition dropout, so that the null condition means "no condition"); None when it can.

    The one guidance rule: `SampleSettings.from_preset` refuses cfg_scale > 0 on such a model (`uvit sample`,
    `uvit fid --ckpt`, training's FID, `uvit bench sample`); training's sample grids, which must not stop a
    run, sample it unguided and say why (`train.grid`)."""
    if preset.model.conditioning == "none":
        return f"preset '{preset.name}' is unconditional, and guidance needs a conditional model"
    if preset.train.p_uncond <= 0:
        return (
            f"preset '{preset.name}' was trained without condition dropout (train.p_uncond = 0), so it has no "
            "unconditional model to guide with"
        )
    return None
