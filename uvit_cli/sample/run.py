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
from typing import Any

from uvit_cli import dist
from uvit_cli.config import Preset
from uvit_cli.errors import ConfigError, DataError, UvitError
from uvit_cli.sample import outputs
from uvit_cli.sample.generate import check_guidance, image_seed, valid_classes
from uvit_cli.sample.resolve import SamplerSpec, load_sampler, preset_autoencoder, text_encoder

GRID_MAX_IMAGES = 256


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
    seed: int
    seconds: float
    files: list[Path] = field(default_factory=list)  # grid / npz / samples.jsonl (rank 0)
    is_main: bool = True

    def summary(self) -> str:
        """The one result line: images, where, new and kept, time and rate, solver, guidance, seed."""
        st = self.settings
        gi = f", guidance interval {st['guidance_interval']}" if st["guidance_interval"] else ""
        rate = f", {self.written / self.seconds:.2f} img/s overall" if self.written else ""
        return (
            f"{self.total} images in {self.out} ({self.written} new, {self.skipped} already there) "
            f"in {self.seconds:.1f} s{rate}; {st['solver']} {st['steps']} steps, cfg {st['cfg_scale']:g}{gi}, "
            f"seed {self.seed}"
        )


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
    out: str | os.PathLike[str],
    spec: SamplerSpec,
    *,
    prompts: Sequence[str] = (),
    classes: Sequence[int] = (),
    n: int = 4,
    clip: str | None = None,
    grid: bool = False,
    npz: bool = False,
    device: Any = None,
    progress: Callable[[SampleProgress], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SampleResult:
    """Generate `n` images per prompt or class (in total if unconditional) with `spec` into `out` as
    <index>.png (skipping those already there), samples.jsonl, and optionally grid.png and samples.npz.
    `clip`: the text encoder of the prompts (None: $UVIT_CLIP, the preset's pretrained, HF cache)."""
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    seed = spec.seed
    with dist.process_group():
        text = True if prompts else (False if classes else None)
        sampler = load_sampler(spec, device=device, say=say, text=text)
        loaded, s = sampler.loaded, sampler.settings
        resolved, weights_note = loaded.preset, loaded.note
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
            conditions, uncond, autoencoder = _encoders(
                resolved, plan, mine, spec.vae, clip, sampler.device, say
            )
        say(weights_note)
        written = 0
        if mine:
            with ThreadPoolExecutor(max_workers=4) as pool:
                pending: list[Future[None]] = []
                if progress:
                    progress(SampleProgress(0, len(mine), len(done)))
                for batch, images in sampler.generate(mine, conditions, uncond, autoencoder):
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
            seed=seed,
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
