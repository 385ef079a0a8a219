"""The closed choices of presets and commands as `Literal` types, and which solver samples which objective.

Imports no torch (prepare/*.py, cli/*.py and config.py take these types); `config` re-exports every name.
The speed levers' choices come with their field descriptions too, as [train] and [sample] share them.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from uvit_cli.errors import ConfigError

# What the network predicts (docs/training.md, *Objectives*): "eps" the paper's noise; "v" = alpha eps - sigma x0
# on the same [schedule] (Salimans & Ho 2022); "flow" the velocity eps - x0 of the linear path
# x_t = (1 - t) x0 + t eps (SiT, SD3), which reads no [schedule].
ObjectiveName = Literal["eps", "v", "flow"]
# How training draws t: "uniform" (the paper's: n in {1..N}, t ~ U(0, 1)) or "logit_normal" (SD3 eq. 19).
TimeSampling = Literal["uniform", "logit_normal"]

# The choices of `uvit prepare` (prepare/*.py and cli/prepare.py take these types; torch-free here).
PrepareSplit = Literal["train", "val", "both"]
Space = Literal["latent", "pixel"]
Crop = Literal["adm", "lanczos"]
FolderLabels = Literal["auto", "folders", "none"]
FolderCaptions = Literal["auto", "none"]
OfficialKind = Literal["auto", "coco", "imagenet"]
StorageDtype = Literal["float16", "float32"]
EncoderPrecision = Literal["fp32", "bf16"]
NetworkPrecision = Literal["bf16", "fp16", "fp32"]  # autocast of the network when sampling
ModelWeights = Literal["ema", "model"]  # which weights of a checkpoint
# The speed levers ([train] and [sample]; docs/benchmarks.md, *The levers*). Each default is the official numerics.
# The residual stream under autocast: "fp32" (official: the fp32 time token promotes the stream to fp32) or
# "autocast" (time and label tokens in the autocast dtype, so the stream stays bf16).
StreamDtype = Literal["fp32", "autocast"]
# SDPA's kernel order on CUDA: torch's own, or cuDNN attention first.
AttentionKernel = Literal["auto", "cudnn"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]  # torch.compile's mode for the network
# ... as the fields [train] and [sample] share
StreamField = Annotated[
    StreamDtype,
    Field(description="the residual stream under autocast: fp32 (official) or autocast (bf16 throughout)"),
]
AttentionField = Annotated[
    AttentionKernel, Field(description="SDPA's kernel order on CUDA: auto (torch's) or cudnn (cuDNN first)")
]
CompileModeField = Annotated[
    CompileMode, Field(description="torch.compile's mode: default or max-autotune-no-cudagraphs")
]
# Seeds reach torch.Generator.manual_seed (which takes [-2**63, 2**64)) and numpy's SeedSequence (which takes
# non-negative integers); [0, 2**63) fits both and an int64.
SEED_MAX = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="a seed in 0 .. 2**63 - 1")]
# clean-fid's protocols (fid.features.MODES)
FidMode = Literal["clean", "legacy_pytorch", "legacy_tensorflow"]
# How a class-conditional FID set labels its images: "random" (uniform from (seed, index), the paper's) or
# "balanced" (index % K: N/K of each class, as RAE / REPA-E sample FID-50K).
LabelProtocol = Literal["random", "balanced"]
# The numbers `uvit fid --metrics` and [eval] metrics report (fid.metrics.METRICS is this list): FID, sFID,
# Inception Score, precision and recall (ADM's evaluator), CLIP score (text-to-image).
FidMetric = Literal["fid", "sfid", "is", "pr", "clip"]

SolverName = Literal[
    "dpm_solver_pp",
    "dpm_solver_pp_2m",
    "ddim",
    "dpm_solver",
    "euler_maruyama",
    "euler_ode",
    "flow_euler",
    "flow_heun",
    "flow_euler_maruyama",
]
SOLVER_NAMES: tuple[str, ...] = get_args(SolverName)  # = uvit_cli.solvers.SOLVERS, without importing torch
FLOW_SOLVER_NAMES: tuple[str, ...] = (
    "flow_euler",
    "flow_heun",
    "flow_euler_maruyama",
)  # = solvers.FLOW_SOLVERS


def solver_mismatch(solver: str, objective: str) -> str | None:
    """Why `solver` cannot sample a model trained with `objective`, in one line; None when it can."""
    if objective == "flow" and solver not in FLOW_SOLVER_NAMES:
        return (
            f"solver '{solver}' integrates a noise prediction; a flow model (train.objective = 'flow') samples "
            f"with {', '.join(FLOW_SOLVER_NAMES)}"
        )
    if objective != "flow" and solver in FLOW_SOLVER_NAMES:
        others = ", ".join(n for n in SOLVER_NAMES if n not in FLOW_SOLVER_NAMES)
        return (
            f"solver '{solver}' integrates a flow model's velocity; this model predicts {objective} "
            f"(train.objective = '{objective}'): choose one of {others}"
        )
    return None


def check_solver(solver: str, objective: str) -> None:
    """ConfigError (one line) when `solver` does not apply to a model trained with `objective`."""
    why = solver_mismatch(solver, objective)
    if why is not None:
        raise ConfigError(why)
