"""The `uvit sample` workflow: resolve the model and encoders, plan the images, generate, write, resume.

Reports through callbacks (`progress`, `log`); prints nothing. Under torchrun every rank takes the indices
`rank::world_size` of the plan; rank 0 writes samples.jsonl, the grid and the npz.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvit_cli import dist
from uvit_cli.config import LabelProtocol, Preset
from uvit_cli.errors import UvitError
from uvit_cli.resources import require_disk, require_memory
from uvit_cli.sample import outputs
from uvit_cli.sample.conditions import class_conditions, context_conditions, label_conditions, null_condition
from uvit_cli.sample.generate import check_batch_memory, effective_precision, generate, image_seed, image_side
from uvit_cli.sample.plan import ByCondition, Plan, check_labels, make_plan
from uvit_cli.sample.resolve import (
    SamplerSpec,
    autoencoder_identity,
    load_sampler,
    preset_autoencoder,
    text_encoder,
    text_encoder_identity,
)
from uvit_cli.sample.settings import SampleSettings

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
    label_protocol: LabelProtocol | None = None  # --classes: how each image's class follows from its index

    def summary(self) -> str:
        """The one result line: images, where, new and kept, time and rate, solver, guidance, seed, labels."""
        st = self.settings
        gi = f", guidance interval {st['guidance_interval']}" if st["guidance_interval"] else ""
        rate = f", {self.written / self.seconds:.2f} img/s overall" if self.written else ""
        labels = f", {self.label_protocol} labels" if self.label_protocol else ""
        model = f" of a {st['objective']} model" if "objective" in st else ""  # v, flow: not the paper's eps
        return (
            f"{self.total} images in {self.out} ({self.written} new, {self.skipped} already there) "
            f"in {self.seconds:.1f} s{rate}; {st['solver']} {st['steps']} steps{model}, "
            f"cfg {st['cfg_scale']:g}{gi}, seed {self.seed}{labels}"
        )


# --------------------------------------------------------------------------------------------------
# The workflow


def sample_to_dir(
    out: str | os.PathLike[str],
    spec: SamplerSpec,
    *,
    prompts: Sequence[str] = (),
    classes: Sequence[int] = (),
    label_protocol: LabelProtocol | None = None,
    n: int = 4,
    clip: str | None = None,
    grid: bool = False,
    npz: bool = False,
    device: Any = None,
    progress: Callable[[SampleProgress], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SampleResult:
    """Generate `n` images per prompt or class (in total if unconditional or with `label_protocol`) with
    `spec` into `out` as <index>.png (skipping those already there), samples.jsonl, and optionally grid.png and
    samples.npz. `label_protocol` ("random" | "balanced", exclusive with `classes`): image i of a
    class-conditional model takes the class `class_label` gives i, recorded as `label_protocol`.
    `clip`: the text encoder of the prompts (None: $UVIT_CLIP, the preset's pretrained, HF cache).
    Memory does not grow with `n`: the plan, the records and the indices are streamed, a batch at a time."""
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    seed = spec.seed
    out_dir = Path(out)
    check_labels(classes, label_protocol)  # before the model loads
    outputs.check_not_in_checkpoints(out_dir)
    with dist.process_group():
        text = True if prompts else (False if classes or label_protocol else None)
        sampler = load_sampler(spec, device=device, say=say, text=text)
        loaded, s = sampler.loaded, sampler.settings
        resolved, weights_note = loaded.preset, loaded.note
        plan = make_plan(resolved, list(prompts), list(classes), n, label_protocol, seed)
        identity = {
            "preset": resolved.name,
            "checkpoint": weights_note,
            "checkpoint_sha256": loaded.info.sha256,
            "weights": loaded.info.weights,
            "settings": _settings_record(s, sampler.device),
            # a flow model reads no [schedule]: its path is named here, its time shift is in the settings
            "schedule": {"kind": "flow"}
            if s.objective == "flow"
            else resolved.schedule.model_dump(mode="json"),
            "vae": autoencoder_identity(resolved, spec.vae),
            "clip": text_encoder_identity(resolved, clip),
        }
        _check_disk(out_dir, resolved, plan, seed, identity, npz=npz)  # before anything is written
        check_batch_memory(resolved, s, sampler.device)
        outputs.check_writable(out_dir)
        _check_same_run(out_dir, plan, seed, identity)

        # This rank's indices; the finished ones are counted now and skipped as they come up.
        total = len(plan)
        ours = range(dist.rank(), total, dist.world_size())
        todo, needed = 0, set()
        for i in ours:
            if not outputs.png_done(out_dir, i):
                todo += 1
                needed.add(i // plan.n)
        skipped = sum(dist.all_gather_object(len(ours) - todo))
        if dist.is_main():
            outputs.write_jsonl(out_dir, _records(plan, seed, identity))

        conditions = uncond = autoencoder = None
        if todo:  # encoders load only when there is work (a finished run just rewrites grid/npz)
            conditions, uncond, autoencoder = _encoders(
                resolved, plan, needed, spec.vae, clip, sampler.device, say
            )
        say(weights_note)
        written = 0
        if todo:
            mine = (i for i in ours if not outputs.png_done(out_dir, i))
            with ThreadPoolExecutor(max_workers=4) as pool:
                pending: deque[Future[None]] = deque()
                if progress:
                    progress(SampleProgress(0, todo, skipped))
                batches = generate(loaded.model, resolved, mine, conditions, uncond, seed=seed,
                                   autoencoder=autoencoder, settings=s, device=sampler.device)  # fmt: skip
                for batch, images in batches:
                    pending += [
                        pool.submit(outputs.write_png, out_dir, i, img)
                        for i, img in zip(batch, images, strict=True)
                    ]
                    # keep at most ~2 batches of PNGs in flight; surface write errors as they happen
                    while len(pending) > 2 * s.batch_size:
                        pending.popleft().result()
                    written += len(batch)
                    if progress:
                        progress(SampleProgress(written, todo, skipped))
                for f in pending:
                    f.result()

        dist.barrier()
        written_all = sum(dist.all_gather_object(written))
        files: list[Path] = []
        if dist.is_main():
            files.append(out_dir / outputs.JSONL)
            if grid:
                shown = range(min(total, GRID_MAX_IMAGES))
                files.append(outputs.write_grid(out_dir, shown, out_dir / "grid.png"))
                if len(shown) < total:
                    say(f"grid.png shows the first {len(shown)} of {total} images")
            if npz:
                files.append(outputs.write_npz(out_dir, range(total), out_dir / "samples.npz"))
        return SampleResult(
            out=out_dir,
            total=total,
            written=written_all,
            skipped=skipped,
            weights=weights_note,
            settings=s.to_dict(),
            seed=seed,
            seconds=time.perf_counter() - t0,
            files=files,
            is_main=dist.is_main(),
            label_protocol=plan.label_protocol,
        )


def _settings_record(settings: SampleSettings, device: Any) -> dict[str, Any]:
    """The settings that make the pixels, the precision as it is on `device` (None means bf16 on CUDA, fp32 on
    the CPU) and the decoder's arithmetic beside it."""
    arithmetic = effective_precision(settings, device)
    return {
        **settings.to_dict(),
        "precision": arithmetic["network"],
        "decode_precision": arithmetic["decode"],
    }


def _records(plan: Plan, seed: int, identity: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """samples.jsonl, one record per image in index order, made as it is written."""
    for i in range(len(plan)):
        yield {
            "index": i,
            "file": outputs.png_name(i),
            **plan.condition(i),
            "seed": seed,
            "noise_seed": image_seed(seed, i),
            **identity,
        }


# What must match for an image already in the folder to count as one of this request. The encoders are
# compared by content (sha256) and scale, not by where their file lies.
# A folder made with --class records no label_protocol; one made with --classes records its protocol.
_SAME_RUN_KEYS = ("prompt", "class", "label_protocol", "seed", "preset", "checkpoint_sha256", "weights",
                  "settings", "schedule", "vae", "clip")  # fmt: skip


def _comparable(key: str, value: Any) -> Any:
    if key in ("vae", "clip") and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "path"}
    return value


def _encoder_change(key: str, old: Any, new: Any) -> str:
    """`vae (sha256 0123abcd4567 there, 89abcdef0123 now)`: which part of an encoder differs."""
    was, now = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
    if not was or not now:
        return f"{key} ({'none' if not was else 'one'} recorded there, {'none' if not now else 'one'} now)"
    parts = [
        f"{k} {str(was.get(k))[:12]} there, {str(now.get(k))[:12]} now"
        for k in sorted((set(was) | set(now)) - {"path"})
        if was.get(k) != now.get(k)
    ]
    return f"{key} ({'; '.join(parts)})"


def _check_same_run(out_dir: Path, plan: Plan, seed: int, identity: dict[str, Any]) -> None:
    """Resuming into a folder made by another request would mix images: refuse, naming the difference. The
    old records are read one line at a time."""
    total = len(plan)
    for prev in outputs.iter_jsonl(out_dir):
        i = int(prev["index"])
        if not 0 <= i < total:
            continue
        new = {**plan.condition(i), "seed": seed, **identity}
        diff = [
            _encoder_change(k, prev.get(k), new.get(k)) if k in ("vae", "clip") else k
            for k in _SAME_RUN_KEYS
            if _comparable(k, prev.get(k)) != _comparable(k, new.get(k))
        ]
        if diff:
            raise UvitError(
                f"--out {out_dir} holds image {outputs.png_name(i)} made with different {', '.join(diff)} "
                f"(see {outputs.JSONL}); use another --out or delete the folder"
            )


def _check_disk(
    out_dir: Path, preset: Preset, plan: Plan, seed: int, identity: dict[str, Any], *, npz: bool
) -> None:
    """Refuse a plan whose PNGs, records (and npz) cannot fit on the disk of `out_dir` (those already there
    count as written)."""
    total = len(plan)
    side = image_side(preset)
    record = next(_records(Plan((plan.widest(),), 1), seed, identity))
    record_bytes = len(json.dumps(record, ensure_ascii=False).encode()) + 8  # wider indices and seeds
    need = (total - outputs.count_pngs(out_dir, total)) * outputs.png_bytes_estimate(side)
    need += total * record_bytes + (total * side * side * 3 if npz else 0)
    require_disk(
        out_dir,
        f"{total:,} images of {side}x{side}" + (" and their samples.npz" if npz else ""),
        need,
        fix="ask for fewer images (--n) or choose an --out on a larger disk",
    )


def _encoders(
    preset: Preset,
    plan: Plan,
    needed: set[int],
    vae: str | None,
    clip: str | None,
    device: Any,
    say: Callable[[str], None],
) -> tuple[Any, Any, Any]:
    """(conditions, uncond, autoencoder) for the plan's conditions `needed` by this rank; CLIP encodes the
    prompts once each and is freed after."""
    import torch

    conditions = uncond = None
    cond = preset.model.conditioning
    if cond == "class":
        if plan.label_protocol:
            conditions = label_conditions(plan.label_protocol, plan.seed, plan.num_classes)
        else:
            conditions = class_conditions(ByCondition([c["class"] for c in plan.conditions], plan.n))
        uncond = null_condition(preset.model)
    elif cond == "text":
        # the prompts of the conditions this rank still makes, each once, in order
        prompts = list(dict.fromkeys(plan.conditions[c]["prompt"] for c in sorted(needed)))
        m = preset.model
        require_memory(
            f"the text contexts of {len(prompts):,} prompts",
            4 * len(prompts) * m.num_clip_token * (m.clip_dim or 0),
            fix="sample fewer prompts per run (split the prompts file, one --out each)",
        )
        encoder = text_encoder(preset.text_encoder, clip, device)
        for p, cut in zip(prompts, encoder.tokenizer(prompts).truncated, strict=True):
            if cut:
                say(f"warning: prompt longer than 77 CLIP tokens, truncated: {p[:60]!r}...")
        row = {p: k for k, p in enumerate(prompts)}
        contexts = torch.cat([encoder.encode(prompts[k : k + 64]) for k in range(0, len(prompts), 64)])
        rows = [row.get(c["prompt"], 0) for c in plan.conditions]  # conditions not needed are never asked for
        conditions = context_conditions(contexts, ByCondition(rows, plan.n))
        uncond = null_condition(preset.model, encoder.encode([""]))  # CLIP('') as the official empty_context
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return conditions, uncond, preset_autoencoder(preset, vae, device)
