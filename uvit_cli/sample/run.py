"""The `uvit sample` workflow: resolve the model and encoders, plan the images, generate, write, resume.

Reports through callbacks (`progress`, `log`); prints nothing. Under torchrun every rank takes the indices
`rank::world_size` of the plan; rank 0 writes samples.jsonl, the grid and the npz.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uvit_cli.config import Preset, apply_overrides, load_preset, preset_from_dict
from uvit_cli.errors import CheckpointError, CheckpointMismatch, ConfigError, DataError, UvitError
from uvit_cli.sample import outputs
from uvit_cli.sample.generate import SampleSettings, check_guidance, image_seed, valid_classes

if TYPE_CHECKING:
    from uvit_cli.checkpoint import CheckpointInfo

GRID_MAX_IMAGES = 256
OFFICIAL_CKPTS = "https://github.com/baofff/U-ViT#pretrained-models"


@dataclass
class SampleProgress:
    """This rank's progress: `done` of `total` images generated now; `skipped` already on disk (all ranks)."""

    done: int
    total: int
    skipped: int


@dataclass
class SampleResult:
    out: Path
    total: int  # images in the plan
    written: int  # written in this run (all ranks)
    skipped: int  # already on disk before this run
    weights: str  # one line: which weights were used (EMA or not, file, step)
    settings: dict[str, Any]
    seconds: float
    files: list[Path] = field(default_factory=list)  # grid / npz / samples.jsonl (rank 0)
    is_main: bool = True


# --------------------------------------------------------------------------------------------------
# Model resolution


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
            from uvit_cli.checkpoint import pick_run

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
    from uvit_cli.checkpoint import default_run_dir, find_checkpoint, load_model

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
    if info.format == "official" and preset is None:
        where += f"; preset {resolved.name}, recognised from its shapes"
    if info.format == "official" and "ema" not in file.stem and file.stem != "nnet":
        # the README's released files (e.g. imagenet256_uvit_huge.pth) do not say which weights they hold
        return model, resolved, info, f"released weights: {where}"
    kind = "EMA" if info.weights == "ema" else "online (non-EMA)"
    note = f"{kind} weights: {where}"
    if ema != (info.weights == "ema"):
        note += f" [asked for {'EMA' if ema else 'non-EMA'} weights; this file holds {info.weights}]"
    return model, resolved, info, note


# --------------------------------------------------------------------------------------------------
# The plan: one record per image index


def _plan(preset: Preset, prompts: Sequence[str], classes: Sequence[int], n: int) -> list[dict[str, Any]]:
    """Condition-major: image c * n + j is the j-th image of condition c."""
    cond = preset.model.conditioning
    if cond == "text":
        if classes:
            raise ConfigError(f"preset '{preset.name}' is text-conditional: use --prompt, not --class")
        if not prompts:
            raise ConfigError(
                f"preset '{preset.name}' is text-conditional: pass --prompt TEXT or --prompts-file"
            )
        return [{"prompt": p} for p in prompts for _ in range(n)]
    if cond == "class":
        if prompts:
            raise ConfigError(f"preset '{preset.name}' is class-conditional: use --class N, not --prompt")
        if not classes:
            raise ConfigError(f"preset '{preset.name}' is class-conditional: pass --class N (repeatable)")
        ok = valid_classes(preset)
        for c in classes:
            if c not in ok:
                null = (
                    f"; {preset.model.num_classes - 1} is the null class used for guidance"
                    if preset.train.p_uncond > 0
                    else ""
                )
                raise ConfigError(f"unknown class {c} for '{preset.name}' (valid: 0..{ok[-1]}{null})")
        return [{"class": int(c)} for c in classes for _ in range(n)]
    if prompts or classes:
        raise ConfigError(f"preset '{preset.name}' is unconditional: drop --prompt/--class")
    return [{} for _ in range(n)]


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"--prompts-file {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"--prompts-file {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save it as UTF-8, one prompt per line"
        ) from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise DataError(f"--prompts-file {path}: no prompts in it")
    return prompts


# --------------------------------------------------------------------------------------------------
# The workflow


def sample_to_dir(
    *,
    out: str | os.PathLike[str],
    preset: str | os.PathLike[str] | None = None,
    ckpt: str | os.PathLike[str] | None = None,
    prompts: Sequence[str] = (),
    classes: Sequence[int] = (),
    n: int = 4,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    ema: bool = True,
    vae: str | None = None,
    clip: str | None = None,
    grid: bool = False,
    npz: bool = False,
    device: Any = None,
    progress: Callable[[SampleProgress], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SampleResult:
    """Generate the planned images into `out` as <index>.png (skipping those already there), samples.jsonl,
    and optionally grid.png and samples.npz. `settings` are SampleSettings overrides (None = preset's)."""
    import torch

    from uvit_cli import dist
    from uvit_cli.sample.generate import generate

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    with dist.process_group():
        device = torch.device(device) if device is not None else dist.device()
        text = True if prompts else (False if classes else None)
        loaded = resolve_model(ckpt, preset, overrides=overrides, ema=ema, device=device, say=say, text=text)
        model, resolved, weights_note = loaded.model, loaded.preset, loaded.note
        s = SampleSettings.from_preset(resolved, **(settings or {}))
        plan = _plan(resolved, list(prompts), list(classes), n)
        check_guidance(resolved, s)

        out_dir = Path(out)
        outputs.check_writable(out_dir)
        records = [
            {
                "index": i,
                "file": outputs.png_name(i),
                **cond,
                "seed": seed,
                "noise_seed": image_seed(seed, i),
                "preset": resolved.name,
                "checkpoint": weights_note,
                "checkpoint_sha256": loaded.info.sha256,
                "weights": loaded.info.weights,
                "settings": s.to_dict(),
            }
            for i, cond in enumerate(plan)
        ]
        _check_same_run(out_dir, records)
        all_indices = list(range(len(plan)))
        done = outputs.done_indices(out_dir, all_indices)
        mine = [i for i in all_indices[dist.rank() :: dist.world_size()] if i not in done]
        if dist.is_main():
            outputs.write_jsonl(out_dir, records)

        conditions = uncond = autoencoder = None
        if mine:  # encoders load only when there is work (a finished run just rewrites grid/npz)
            conditions, uncond, autoencoder = _encoders(resolved, plan, mine, vae, clip, device, say)
        say(weights_note)
        written = 0
        if mine:
            with ThreadPoolExecutor(max_workers=4) as pool:
                pending: list[Future[None]] = []
                if progress:
                    progress(SampleProgress(0, len(mine), len(done)))
                for batch, images in generate(
                    model,
                    resolved,
                    mine,
                    conditions,
                    uncond,
                    seed=seed,
                    autoencoder=autoencoder,
                    settings=s,
                    device=device,
                ):
                    pending += [
                        pool.submit(outputs.write_png, out_dir, i, img)
                        for i, img in zip(batch, images, strict=True)
                    ]
                    # keep at most ~2 batches of PNGs in flight; surface write errors as they happen
                    while len(pending) > 2 * s.batch_size:
                        pending.pop(0).result()
                    written += len(batch)
                    if progress:
                        progress(SampleProgress(written, len(mine), len(done)))
                for f in pending:
                    f.result()

        dist.barrier()
        written_all = sum(dist.all_gather_object(written))
        files: list[Path] = []
        if dist.is_main():
            files.append(out_dir / outputs.JSONL)
            if grid:
                shown = all_indices[:GRID_MAX_IMAGES]
                files.append(outputs.write_grid(out_dir, shown, out_dir / "grid.png"))
                if len(shown) < len(all_indices):
                    say(f"grid.png shows the first {len(shown)} of {len(all_indices)} images")
            if npz:
                files.append(outputs.write_npz(out_dir, all_indices, out_dir / "samples.npz"))
        return SampleResult(
            out=out_dir,
            total=len(plan),
            written=written_all,
            skipped=len(done),
            weights=weights_note,
            settings=s.to_dict(),
            seconds=time.perf_counter() - t0,
            files=files,
            is_main=dist.is_main(),
        )


def _check_same_run(out_dir: Path, records: list[dict[str, Any]]) -> None:
    """Resuming into a folder made with other settings would mix images: refuse, naming the difference."""
    old = outputs.read_jsonl(out_dir)
    keys = ("prompt", "class", "seed", "preset", "checkpoint_sha256", "weights", "settings")
    for r in records:
        prev = old.get(r["index"])
        if prev is None:
            continue
        diff = [k for k in keys if prev.get(k) != r.get(k)]
        if diff:
            raise UvitError(
                f"--out {out_dir} holds image {r['file']} made with different {', '.join(diff)} "
                f"(see {outputs.JSONL}); use another --out or delete the folder"
            )


def _encoders(
    preset: Preset,
    plan: list[dict[str, Any]],
    mine: list[int],
    vae: str | None,
    clip: str | None,
    device: Any,
    say: Callable[[str], None],
) -> tuple[Any, Any, Any]:
    """(conditions, uncond, autoencoder) for this rank's images; CLIP is freed after encoding."""
    import torch

    from uvit_cli.sample.generate import class_conditions, context_conditions, null_condition

    conditions = uncond = None
    cond = preset.model.conditioning
    if cond == "class":
        conditions = class_conditions({i: plan[i]["class"] for i in mine})
        uncond = null_condition(preset)
    elif cond == "text":
        encoder = text_encoder(preset, clip, device)
        prompts = list(dict.fromkeys(plan[i]["prompt"] for i in mine))  # unique, in order
        for p, cut in zip(prompts, encoder.tokenizer(prompts).truncated, strict=True):
            if cut:
                say(f"warning: prompt longer than 77 CLIP tokens, truncated: {p[:60]!r}...")
        row = {p: k for k, p in enumerate(prompts)}
        contexts = torch.cat([encoder.encode(prompts[k : k + 64]) for k in range(0, len(prompts), 64)])
        conditions = context_conditions(contexts, {i: row[plan[i]["prompt"]] for i in mine})
        uncond = null_condition(preset, encoder.encode([""]))  # CLIP('') as the official empty_context
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return conditions, uncond, preset_autoencoder(preset, vae, device)


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


def text_encoder(preset: Preset, clip: str | None, device: Any) -> Any:
    """The preset's text encoder: CLIP (--clip > $UVIT_CLIP > the preset's pretrained > HF cache) or the toy."""
    assert preset.text_encoder is not None
    if preset.text_encoder.kind == "toy":  # the shapes quickstart: seeded, frozen, no weights file
        from uvit_cli.shapes.text import toy_text_encoder

        return toy_text_encoder().to(device)
    from uvit_cli.encoders import load_text_encoder

    return load_text_encoder(clip, device=device, preset=preset.text_encoder.pretrained)
