"""Resolving what `uvit sample` and `uvit fid --ckpt` sample with: the checkpoint (`--ckpt`: a file, run dir,
exported folder or Hub model `org/name` / `hf://org/name/file`; `--preset`; or the run under runs/ that
fits), the preset and its `--set` overrides, the settings, and the encoders."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvit_cli import dist
from uvit_cli.checkpoint import (
    PRESET_FILE,
    RUNS_DIR,
    CheckpointInfo,
    default_run_dir,
    find_checkpoint,
    latest_checkpoint,
    load_model,
)
from uvit_cli.config import (
    Preset,
    TextEncoderConfig,
    apply_overrides,
    load_preset,
    preset_from_dict,
    preset_from_toml,
)
from uvit_cli.errors import CheckpointError, CheckpointMismatch, UvitError
from uvit_cli.hub import hub_ref
from uvit_cli.sample.settings import SampleOptions, SampleSettings

OFFICIAL_CKPTS = "https://github.com/baofff/U-ViT#pretrained-models"


def pick_run(text: bool | None = None, runs: Path = RUNS_DIR) -> tuple[Path, str]:
    """The run under `runs/` a request without --ckpt or --preset means, and why: the only run (of the
    text-to-image ones when `text`, of the others when `text` is False) with a checkpoint, else the most
    recently updated of them."""
    found = []
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        latest = latest_checkpoint(d) if d.is_dir() else None
        if latest is None:
            continue
        try:
            cond = preset_from_toml(
                (d / PRESET_FILE).read_text(), source=str(d / PRESET_FILE)
            ).model.conditioning
        except (OSError, UvitError):  # no readable preset.toml: its checkpoint still carries one
            cond = None
        found.append((latest.stat().st_mtime, d, cond))
    kind = {True: "text-to-image ", False: "class-conditional or unconditional ", None: ""}[text]
    fit = [f for f in found if text is None or (f[2] == "text") == text or f[2] is None]
    if not fit:
        have = f" (it holds {', '.join(str(d) for _, d, _ in found)})" if found else ""
        raise CheckpointError(
            f"no {kind}run with a checkpoint in {runs}/{have}: pass --ckpt FILE or RUN_DIR (e.g. --ckpt "
            "quickstart/run after `uvit quickstart`), the paper's nnet_ema.pth with --preset NAME, or --preset NAME"
        )
    if len(fit) == 1:
        return fit[0][1], f"the only {kind}run in {runs}/"
    newest = max(fit, key=lambda f: f[0])
    others = ", ".join(str(d) for _, d, _ in fit if d != newest[1])
    return newest[1], f"the most recently updated {kind}run in {runs}/ (others: {others}; --ckpt picks one)"


def _no_checkpoint(preset: Preset, run_dir: Path) -> CheckpointError:
    if preset.data.kind == "shapes":  # the quickstart's toy: no paper checkpoint exists for it
        return CheckpointError(
            f"no checkpoint in {run_dir}: run `uvit quickstart` and sample its run with `--ckpt quickstart/run`, "
            f"or train one with `uvit train {preset.name} --max-steps 3000`"
        )
    return CheckpointError(
        f"no checkpoint in {run_dir}: train one with `uvit train {preset.name}`, or download the paper's "
        f"(baofff/U-ViT README, {OFFICIAL_CKPTS}) and pass it with `--ckpt nnet_ema.pth --preset {preset.name}`"
    )


@dataclass
class ResolvedModel:
    """A model ready to sample: the network (eval mode), the preset it samples with, where its weights
    came from (`info`: path, step, ema/model, sha256, format) and that said in one line (`note`)."""

    model: Any
    preset: Preset
    info: CheckpointInfo
    note: str


def resolve_model(
    ckpt: str | os.PathLike[str] | None,
    preset: str | os.PathLike[str] | None,
    *,
    overrides: Sequence[str] = (),
    ema: bool = True,
    device: Any = None,
    say: Callable[[str], None] = lambda _msg: None,
    text: bool | None = None,
) -> ResolvedModel:
    """The model `--ckpt` / `--preset` / `--set` name, as `uvit sample` and `uvit fid` load it.

    `--set` applies to `--preset` before an official .pth is built from it (e.g. model.depth=16), and to the
    preset embedded in our checkpoints after loading (there only sampling keys can matter). With neither
    `ckpt` nor `preset`, the run under runs/ that fits the request (`text`: prompts given) is used, and
    `say` names it first."""
    base = load_preset(preset, list(overrides)) if preset is not None else None
    try:
        if ckpt is None and base is None:
            ckpt, why = pick_run(text)
            say(f"using {ckpt}: {why}")
        model, resolved, info, note = _load(ckpt, base, ema, device)
    except CheckpointMismatch as e:
        if base is None:
            raise
        raise CheckpointMismatch(
            f"{e}; pass the --preset this checkpoint was trained with (or --set model.KEY=VALUE)"
        ) from None
    if overrides:
        resolved = preset_from_dict(apply_overrides(resolved.model_dump(mode="json"), list(overrides)))
    if base is not None and base.name != resolved.name:
        say(f"note: the checkpoint's embedded preset '{resolved.name}' is used, not --preset '{base.name}'")
    return ResolvedModel(model, resolved, info, note)


def _load(
    ckpt: str | os.PathLike[str] | None, preset: Preset | None, ema: bool, device: Any
) -> tuple[Any, Preset, CheckpointInfo, str]:
    if ckpt is None:
        assert preset is not None, "resolve_model picks a run when neither is given"
        run_dir = default_run_dir(preset)
        if not run_dir.is_dir():
            raise _no_checkpoint(preset, run_dir)
        try:
            file = find_checkpoint(run_dir, ema=ema)
        except CheckpointError:
            raise _no_checkpoint(preset, run_dir) from None
    else:
        file = find_checkpoint(ckpt, ema=ema)
    # Our safetensors carry their preset; an official .pth takes --preset, else load_model recognises it.
    model, resolved, info = load_model(
        file, preset=None if file.suffix == ".safetensors" else preset, ema=ema, device=device
    )
    step = f", step {info.step}" if info.step is not None else ""
    where = f"{info.path}{step} ({info.format}, sha256 {info.sha256[:12]})"
    if ckpt is not None and (ref := hub_ref(ckpt)) is not None:
        where = f"Hub {ref}: {where}"
    if info.format == "official" and preset is None:
        where += f"; preset {resolved.name}, recognised from its shapes"
    if info.weights == "released" or (
        info.format == "official" and "ema" not in file.stem and file.stem != "nnet"
    ):
        # the README's released files (e.g. imagenet256_uvit_huge.pth, and their exports) do not say which
        # weights they hold
        return model, resolved, info, f"released weights: {where}"
    kind = "EMA" if info.weights == "ema" else "online (non-EMA)"
    note = f"{kind} weights: {where}"
    if ema != (info.weights == "ema"):
        note += f" [asked for {'EMA' if ema else 'non-EMA'} weights; this file holds {info.weights}]"
    return model, resolved, info, note


@dataclass
class ModelSampler:
    """A resolved model with the settings and device it samples with (`uvit sample`, `uvit fid --ckpt`)."""

    loaded: ResolvedModel
    settings: SampleSettings
    device: Any


@dataclass(frozen=True)
class SamplerSpec:
    """What `uvit sample` and `uvit fid --ckpt` generate with: the checkpoint and/or preset (our .safetensors
    or run dir; the paper's .pth with a preset; or the run of runs/ that fits), its `--set` overrides, EMA or
    online weights, the sampling options (`SampleOptions`: solver, steps, cfg_scale, ...; None keeps the
    preset's), the seed of image i's noise, and the autoencoder that decodes latents (None: $UVIT_VAE, the
    preset's)."""

    ckpt: str | os.PathLike[str] | None = None
    preset: str | os.PathLike[str] | None = None
    overrides: Sequence[str] = ()
    ema: bool = True
    settings: SampleOptions = SampleOptions()
    seed: int = 0
    vae: str | None = None


def load_sampler(
    spec: SamplerSpec, *, device: Any, say: Callable[[str], None], text: bool | None = None
) -> ModelSampler:
    """`resolve_model` of `spec` on `device` (default: this rank's) and the settings `spec.settings` asks of
    its preset (`SampleSettings.from_preset`: checked once, here). Call inside `dist.process_group()`."""
    device = dist.device(device)  # a --device that names no device here is one line, before the model loads
    loaded = resolve_model(
        spec.ckpt, spec.preset, overrides=spec.overrides, ema=spec.ema, device=device, say=say, text=text
    )
    settings = SampleSettings.from_preset(loaded.preset, spec.settings)
    dist.cuda_defaults(device, tf32=settings.precision != "fp32")  # --precision fp32 keeps fp32 matmuls
    return ModelSampler(loaded, settings, device)


def preset_autoencoder(preset: Preset, vae: str | None, device: Any) -> Any:
    """The autoencoder that decodes a latent preset's samples (--vae > $UVIT_VAE > the preset's pretrained >
    HF cache) at its scale factor; None for pixel presets."""
    if preset.data.space != "latent":
        return None
    from uvit_cli.encoders import load_autoencoder

    assert preset.autoencoder is not None
    return load_autoencoder(
        vae, scale_factor=preset.autoencoder.scale_factor, device=device, preset=preset.autoencoder.pretrained
    )


def text_encoder(config: TextEncoderConfig | None, clip: str | None, device: Any) -> Any:
    """The text encoder of a preset's [text_encoder] table: CLIP (--clip > $UVIT_CLIP > the table's
    pretrained > HF cache) or the toy."""
    assert config is not None, "a text model's preset has a [text_encoder] table"
    if config.kind == "toy":  # the shapes quickstart: seeded, frozen, no weights file
        from uvit_cli.shapes.text import toy_text_encoder

        return toy_text_encoder().to(device)
    from uvit_cli.encoders import load_text_encoder

    return load_text_encoder(clip, device=device, preset=config.pretrained)


# --------------------------------------------------------------------------------------------------
# The encoders' identity: what a sample folder records, by content


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a weights file, hashed once per (path, size, mtime) in a process (~1.8 GB/s here: CLIP-L's
    1.7 GB in about a second)."""
    from uvit_cli.fileio import sha256_file

    return sha256_file(path)


def _weights_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "sha256": _sha256(str(path), st.st_size, st.st_mtime_ns)}


def autoencoder_identity(preset: Preset, vae: str | None) -> dict[str, Any] | None:
    """The autoencoder `preset_autoencoder` would load (its file and sha256, by the same lookup) and the scale
    it decodes at; None for pixel presets. Nothing is loaded."""
    if preset.data.space != "latent":
        return None
    from uvit_cli.encoders.weights import resolve_weights

    assert preset.autoencoder is not None
    found = resolve_weights(vae, "vae", preset=preset.autoencoder.pretrained).path
    return {**_weights_identity(found), "scale_factor": preset.autoencoder.scale_factor}


def text_encoder_identity(preset: Preset, clip: str | None) -> dict[str, Any] | None:
    """The text encoder `text_encoder` would load (CLIP: its file and sha256; the toy: its seed); None for
    presets without text. Nothing is loaded."""
    if preset.model.conditioning != "text":
        return None
    assert preset.text_encoder is not None
    if preset.text_encoder.kind == "toy":
        from uvit_cli.shapes.text import SEED

        return {"kind": "toy", "seed": SEED}
    from uvit_cli.encoders.weights import resolve_weights

    found = resolve_weights(clip, "clip", preset=preset.text_encoder.pretrained).path
    return {"kind": "clip", **_weights_identity(found)}
