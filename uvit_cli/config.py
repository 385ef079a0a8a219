"""Presets: pydantic models of a run's configuration, loaded from TOML with command-line overrides.

Imports no torch, so `uvit --help` and preset validation stay fast. The precedence is written down
once, here: explicit `--set key=value` > preset file > field default. The choices the models take live in
`choices`, reading preset files and `--set` in `preset_files`; both are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# `name as name`: re-exported, so `from uvit_cli.config import NAME` keeps working for every name.
from uvit_cli.choices import FLOW_SOLVER_NAMES as FLOW_SOLVER_NAMES
from uvit_cli.choices import SEED_MAX as SEED_MAX
from uvit_cli.choices import SOLVER_NAMES as SOLVER_NAMES
from uvit_cli.choices import (
    AttentionField,
    CompileModeField,
    FidMetric,
    FidMode,
    LabelProtocol,
    ObjectiveName,
    Seed,
    SolverName,
    Space,
    StreamField,
    TimeSampling,
    solver_mismatch,
)
from uvit_cli.choices import AttentionKernel as AttentionKernel
from uvit_cli.choices import CompileMode as CompileMode
from uvit_cli.choices import Crop as Crop
from uvit_cli.choices import EncoderPrecision as EncoderPrecision
from uvit_cli.choices import FolderCaptions as FolderCaptions
from uvit_cli.choices import FolderLabels as FolderLabels
from uvit_cli.choices import ModelWeights as ModelWeights
from uvit_cli.choices import NetworkPrecision as NetworkPrecision
from uvit_cli.choices import OfficialKind as OfficialKind
from uvit_cli.choices import PrepareSplit as PrepareSplit
from uvit_cli.choices import StorageDtype as StorageDtype
from uvit_cli.choices import StreamDtype as StreamDtype
from uvit_cli.choices import check_solver as check_solver
from uvit_cli.errors import ConfigError
from uvit_cli.preset_files import PRESETS_ENV as PRESETS_ENV
from uvit_cli.preset_files import apply_overrides as apply_overrides
from uvit_cli.preset_files import list_presets as list_presets
from uvit_cli.preset_files import load_preset as load_preset
from uvit_cli.preset_files import parse_override as parse_override
from uvit_cli.preset_files import preset_from_dict as preset_from_dict
from uvit_cli.preset_files import preset_from_toml as preset_from_toml
from uvit_cli.preset_files import presets_dir as presets_dir
from uvit_cli.preset_files import resolve_preset_path as resolve_preset_path
from uvit_cli.toml_writer import dumps_toml


class _Strict(BaseModel):
    # allow_inf_nan: `lr = inf` or `nan` (TOML has both) is never a setting anyone means.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Constructor keywords of `uvit_cli.model.UViT`, named as the official nnet configs."""

    img_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    in_chans: int = Field(3, gt=0)
    embed_dim: int = Field(768, gt=0)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = False
    qk_scale: float | None = None
    mlp_time_embed: bool = False
    num_classes: int = -1
    clip_dim: int | None = Field(None, gt=0)
    num_clip_token: int = Field(77, gt=0)
    use_checkpoint: bool = False
    conv: bool = True
    skip: bool = True

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.clip_dim is not None and self.num_classes > 0:
            raise ValueError(
                "a model is either class-conditional (num_classes > 0) or text-conditional (clip_dim)"
            )
        return self

    # The mapping protocol, so `UViT(**preset.model)` builds the model as the design promises.
    def keys(self) -> list[str]:
        return list(type(self).model_fields)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    @property
    def conditioning(self) -> Literal["none", "class", "text"]:
        if self.clip_dim is not None:
            return "text"
        return "class" if self.num_classes > 0 else "none"


MANIFEST = "manifest.json"  # every prepared set's description (data.format reads and writes it)
DATA_ROOT = "feats"  # where `uvit prepare` writes and the packaged presets read: one folder per set
# Where each data set's originals are looked for when no root is given: an environment variable, then a
# conventional folder under the current directory (`prepare.data_root`).
DATA_ROOTS: dict[str, tuple[str, str]] = {
    "coco": ("UVIT_COCO", "data/coco"),
    "imagenet": ("UVIT_IMAGENET", "data/imagenet"),
    "cifar10": ("UVIT_CIFAR10", "data/cifar10"),
    "celeba": ("UVIT_CELEBA", "data/celeba"),
}


def dataset_name(kind: str, resolution: int, source: str | os.PathLike[str] | None = None) -> str:
    """The folder name of a prepared set under the data root: coco256, imagenet64, cifar10, celeba64, shapes,
    or `<images folder><resolution>` for `uvit prepare folder`."""
    if kind in ("cifar10", "shapes"):
        return kind
    if kind == "folder":
        base = Path(source).resolve().name if source is not None else "folder"
        return f"{base}{resolution}"
    return f"{'imagenet' if kind == 'imagenet64' else kind}{resolution}"


def set_dir(out: str | os.PathLike[str], name: str) -> Path:
    """Where `uvit prepare --out OUT` writes the set `name`: OUT/name, unless OUT already is that set
    (it is called `name`, or it holds a prepared set's manifest.json)."""
    try:
        check_run_name(name, under=f"{out}/")
    except ValueError as e:
        raise ConfigError(f"--name: {e}") from None
    out = Path(out)
    if out.name == name or (out / "manifest.json").is_file():
        return out
    return out / name


class DataConfig(_Strict):
    """Where the training data lives and what it is."""

    kind: Literal["coco", "imagenet", "folder", "cifar10", "celeba", "imagenet64", "shapes"]
    path: str = Field(description="a prepared set, or the data root holding it (`uvit prepare ... --out`)")
    space: Space = "latent"
    resolution: int = Field(gt=0, description="image resolution in pixels")
    random_flip: bool = False

    def set_path(self) -> Path:
        """The prepared set `path` names: `path` itself when it holds a manifest.json, else the set under the
        data root `path` that `uvit prepare --out path` writes for this section (coco256, imagenet64, ...),
        else the only prepared set in `path` (a folder set is named after its images); `path` otherwise."""
        path = Path(self.path)
        if (path / MANIFEST).is_file():
            return path
        named = path / dataset_name(self.kind, self.resolution)
        if self.kind != "folder" and (named / MANIFEST).is_file():
            return named
        sets = sorted(d for d in path.iterdir() if (d / MANIFEST).is_file()) if path.is_dir() else []
        return sets[0] if self.kind == "folder" and len(sets) == 1 else path

    def prepare_command(self) -> str:
        """The `uvit prepare` line that makes the shards this data section reads (docs/data.md)."""
        path = Path(self.path)
        default = dataset_name(self.kind, self.resolution, "IMAGES")
        out = f"--out {path.parent.as_posix()}" + ("" if path.name == default else f" --name {path.name}")
        if self.kind in ("imagenet", "imagenet64"):
            space = " --space pixel" if self.space == "pixel" or self.kind == "imagenet64" else ""
            return f"uvit prepare imagenet{space} --resolution {self.resolution} {out}"
        if self.kind == "folder":
            return f"uvit prepare folder IMAGES --resolution {self.resolution} {out}"
        if self.kind in ("celeba", "shapes"):
            return f"uvit prepare {self.kind} --resolution {self.resolution} {out}"
        return f"uvit prepare {self.kind} {out}"


class ScheduleConfig(_Strict):
    """Noise schedule: discrete SD scaled-linear (integer steps) or the continuous VP-SDE."""

    kind: Literal["discrete", "continuous"] = "discrete"
    num_steps: int = Field(1000, gt=0, description="N of the discrete schedule")
    beta_min: float = 0.1
    beta_max: float = 20.0


class TrainConfig(_Strict):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="global batch over all GPUs")
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.99, 0.999)
    weight_decay: float = Field(0.03, ge=0)
    warmup_steps: int = Field(5000, ge=0)
    ema_rate: float = Field(0.9999, ge=0, le=1)
    p_uncond: float = Field(0.0, ge=0, le=1, description="probability of dropping the condition (CFG)")
    grad_clip: float = Field(0.0, ge=0, description="max grad norm; 0 disables clipping")
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="weight each sample's loss by min(SNR, gamma) / SNR (Min-SNR, Hang et al. 2023); "
        "unset: the paper's unweighted loss",
    )
    objective: ObjectiveName = Field(
        "eps",
        description="what the network predicts: eps (the paper's), v (Salimans & Ho 2022, on [schedule]) or "
        "flow (velocity of the linear path, SiT / SD3; [schedule] unused)",
    )
    t_sampling: TimeSampling = Field(
        "uniform", description="training times: uniform (the paper's) or logit_normal (SD3: sigmoid(N(m, s)))"
    )
    t_mean: float | None = Field(None, description="logit_normal location m (unset: 0)")
    t_std: float | None = Field(None, gt=0, description="logit_normal scale s (unset: 1)")
    time_shift: float | None = Field(
        None,
        gt=0,
        description="flow only: t -> s t / (1 + (s - 1) t) for training and sampling times (SD3 §5.3.2, RAE); "
        "unset: no shift",
    )
    seed: Seed = 1234
    log_interval: int = Field(10, gt=0)
    sample_interval: int = Field(5000, gt=0)
    save_interval: int = Field(50000, gt=0)
    keep_last: int = Field(3, gt=0, description="checkpoints kept on disk")
    compile: bool = True
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes; 0 reads whole batches in the training process"
    )
    # The speed levers (docs/training.md, *Speed switches*); each default keeps the official numerics.
    stream_dtype: StreamField = "fp32"
    attention: AttentionField = "auto"
    compile_mode: CompileModeField = "default"
    fp8: bool = Field(False, description="the blocks' linears as scaled float8 matmuls (CUDA sm 8.9+)")

    @model_validator(mode="after")
    def _objective(self) -> TrainConfig:
        if self.t_sampling != "logit_normal" and (self.t_mean is not None or self.t_std is not None):
            raise ValueError("t_mean and t_std shape t_sampling = 'logit_normal'; set it, or remove them")
        if self.time_shift is not None and self.objective != "flow":
            raise ValueError(
                f"time_shift shifts the flow path's times; objective is '{self.objective}': "
                "set objective = 'flow', or remove time_shift"
            )
        if self.min_snr_gamma is not None and self.objective == "flow":
            raise ValueError(
                "min_snr_gamma weights the eps and v losses (Min-SNR); the flow loss is weighted through its "
                "time density (t_sampling, time_shift): remove min_snr_gamma"
            )
        return self


class SampleConfig(_Strict):
    solver: SolverName = "dpm_solver_pp"
    steps: int = Field(50, gt=0)
    cfg_scale: float = Field(0.0, ge=0, description="official convention: eps_c + s * (eps_c - eps_u)")
    guidance_interval: tuple[float, float] | None = None
    n_samples: int = Field(50000, gt=0, description="samples for the final FID evaluation")
    batch_size: int = Field(50, gt=0)
    # The speed levers (docs/sampling.md, *Speed switches*); each default keeps the official numerics.
    stream_dtype: StreamField = "fp32"
    attention: AttentionField = "auto"
    compile_mode: CompileModeField = "default"
    vae_channels_last: bool = Field(False, description="a channels_last VAE decoder (compiled on CUDA)")


class EvalConfig(_Strict):
    """FID while training: every `interval` steps (and at the last), `n` images of the EMA weights with the
    [sample] solver and guidance (`steps` solver steps) against `ref`, on every rank; off while `ref` is unset.
    The paper presets carry the official scripts' in-training settings (10,000 images, 50 steps, every
    50,000 steps, pytorch-fid's protocol)."""

    ref: str | None = Field(None, description="reference statistics (.npz with mu, sigma); unset: no FID")
    interval: int = Field(50000, gt=0, description="steps between evaluations")
    n: int = Field(10000, ge=2, description="images per evaluation")
    steps: int | None = Field(None, gt=0, description="solver steps (unset: [sample].steps)")
    mode: FidMode = "clean"
    seed: Seed = 0
    keep_best: bool = True  # the EMA weights of the best FID so far in RUN/best/
    metrics: list[FidMetric] = Field(
        ["fid"],
        description="numbers measured in the one Inception pass, logged beside fid: sfid, is, pr need mode "
        "legacy_tensorflow, clip a text model; fid is always one (it picks RUN/best)",
    )
    classes: LabelProtocol = Field(
        "random", description="labels of a class model's images: random (the paper's) or balanced (index % K)"
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """`--set eval.metrics=fid,is` (a string on the command line) as the list it names."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("metrics")
    @classmethod
    def _fid_first(cls, value: list[FidMetric]) -> list[FidMetric]:
        if "fid" not in value:
            raise ValueError(
                "must include 'fid': FID picks the best checkpoint (RUN/best); list the others beside it, "
                'e.g. ["fid", "is"]'
            )
        return [m for m in get_args(FidMetric) if m in value]  # canonical order, each once


class AutoencoderConfig(_Strict):
    pretrained: str = Field(
        "autoencoder_kl.pth",
        description="SD KL-f8 weights: a file name (taken from the --vae / $UVIT_VAE directory or the cache), "
        "a path, a directory or a hub id; see docs/encoders.md",
    )
    scale_factor: float = Field(0.18215, gt=0)


class TextEncoderConfig(_Strict):
    kind: Literal["clip", "toy"] = "clip"
    pretrained: str = Field(
        "openai/clip-vit-large-patch14",
        description="CLIP weights after --clip / $UVIT_CLIP: a path, a directory or a hub id",
    )


def check_run_name(name: str, under: str = "runs/") -> str:
    """`name` if it can be one directory under `under` (runs/<name>, a data root's set), else ValueError.

    The one rule for a name that becomes a folder: a single path component, so it is always a child."""
    if not name or name.strip() != name:
        raise ValueError(f"name {name!r} must be a non-empty word without leading or trailing spaces")
    if name in (".", ".."):
        raise ValueError(f"name {name!r} is not a directory name")
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"name {name!r} holds {shown}: it names one directory under {under}, so no path")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError("name is longer than 255 bytes, the most a directory name can be")
    return name


class LogConfig(_Strict):
    """Where a training run's numbers go besides RUN/metrics.jsonl and RUN/report.html (always written):
    TensorBoard event files in RUN/tensorboard/ and a Weights & Biases run (offline without an API key),
    written by rank 0. Each needs its optional extra (`pip install "uvit[tensorboard]"`, `"uvit[wandb]"`)."""

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = Field("uvit", min_length=1, description="W&B project")
    wandb_entity: str | None = Field(None, description="W&B team or user; unset: the account's default")


class Preset(_Strict):
    """A complete, validated configuration: what `uvit train/sample/bench` run from."""

    name: str
    description: str = ""
    model: ModelConfig
    data: DataConfig
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    autoencoder: AutoencoderConfig | None = None
    text_encoder: TextEncoderConfig | None = None

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        return check_run_name(name)

    @model_validator(mode="after")
    def _check(self) -> Preset:
        if self.data.space == "latent" and self.autoencoder is None:
            raise ValueError("a latent-space preset needs an [autoencoder] table")
        if self.model.conditioning == "text" and self.text_encoder is None:
            raise ValueError("a text-conditional model needs a [text_encoder] table")
        kind = {"none": "unconditional", "class": "class-conditional", "text": "text-conditional"}
        cond = kind[self.model.conditioning]
        if self.eval.classes == "balanced" and cond != kind["class"]:
            raise ValueError(
                f"eval.classes = 'balanced' labels a class-conditional model's images; this one is {cond}"
            )
        if "clip" in self.eval.metrics and cond != kind["text"]:
            raise ValueError(f"eval.metrics: clip scores images against their captions; this model is {cond}")
        why = solver_mismatch(self.sample.solver, self.train.objective)
        if why is not None:
            raise ValueError(f"sample.solver: {why}")
        return self

    def to_toml(self) -> str:
        return dumps_toml(self.model_dump(mode="json", exclude_none=True))
