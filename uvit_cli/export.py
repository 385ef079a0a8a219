"""A checkpoint as a folder ready for the Hugging Face Hub (`uvit export`), loadable itself (`--ckpt DIR`):

    model.safetensors   the EMA weights under the official key names, the preset in the metadata
    preset.toml         the preset they belong to
    README.md           the model card: the Hub's YAML header, the preset, steps, measured metrics, usage
    samples.png         a sample grid of the run (or --samples), when there is one
    metrics.json        the measured rows with their full protocol stamps, when there are any

`uvit push` (hub.push) uploads it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvit_cli.checkpoint import (
    CKPTS,
    EMA_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PRESET_FILE,
    SAMPLES,
    find_checkpoint,
    load_weights,
    save_weights,
)
from uvit_cli.config import ModelConfig, Preset, list_presets, load_preset
from uvit_cli.errors import CheckpointError, ConfigError, UvitError
from uvit_cli.fileio import atomic_open, check_outputs, sha256_file, write_json_atomic, write_text_atomic
from uvit_cli.hub import CARD_FILE, REPO_PLACEHOLDER
from uvit_cli.state_dicts import check_state_dict, official_file, official_keys, recognise_preset

SAMPLES_FILE = "samples.png"
STAMPS_FILE = "metrics.json"
BEST_DIR = "best"  # train.evaluate.BEST_DIR, named here without importing torch
_GRID_RE = re.compile(r"^(\d{8,})\.png$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The stamp keys of the numbers a card shows, with their names (fid.result's summary order).
_METRICS = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision",
            "recall": "recall", "clip_score": "CLIP score"}  # fmt: skip
_WEIGHTS = {"ema": "EMA", "model": "online (non-EMA)", "released": "as released (EMA or online: not stated)"}


@dataclass
class Exported:
    """What `export` wrote: the folder, its files, the weights it took and what the card says of them."""

    out: Path
    files: list[Path]
    source: Path
    preset: Preset
    step: int | None
    weights: str  # "ema" | "model"
    notes: list[str] = field(default_factory=list)


def export(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    preset: str | os.PathLike[str] | None = None,
    best: bool = False,
    samples: str | os.PathLike[str] | None = None,
    repo_id: str | None = None,
    force: bool = False,
) -> Exported:
    """Write the Hub-ready folder of `source` (a run dir: its newest checkpoint, or RUN/best with `best`; a
    step dir; a weights file: ours, or the paper's .pth with `preset` or recognised by its shapes) to `out`.

    `samples` replaces the run's sample grid; `repo_id` fills the card's usage lines (else ORG/NAME, which
    `push` fills in). A non-empty `out` is refused unless `force`."""
    file = _source_file(source, best)
    run = _run_of(file)
    out = Path(out)
    outputs = {f"--out ({name})": out / name for name in (MODEL_FILE, PRESET_FILE, CARD_FILE, SAMPLES_FILE)}
    check_outputs(outputs, {"SOURCE": file, "--samples": samples})
    _check_out(out, force)
    if samples is not None and not Path(samples).is_file():
        raise ConfigError(f"--samples {samples}: no such file (pass a PNG, e.g. RUN/samples/<step>.png)")

    sd, embedded, meta = load_weights(file)
    sd = official_keys(sd)
    official = meta.get("format") == "official"
    chosen = embedded if embedded is not None else _preset_beside(file)
    notes = []
    if chosen is None:
        chosen = load_preset(preset) if preset is not None else recognise_preset(sd, str(file))
    elif preset is not None:
        notes.append(f"the checkpoint's embedded preset '{chosen.name}' is used, not --preset")
    _check_fits(chosen.model, sd, file)
    step = int(meta["step"]) if str(meta.get("step", "")).isdigit() else None
    weights = meta.get("weights", "ema")
    if official and "ema" not in file.stem and file.stem != "nnet":
        weights = "released"  # the README's files (imagenet256_uvit_huge.pth) do not say EMA or online
    if weights == "model":
        notes.append(f"{file.name} holds online (non-EMA) weights: exported as they are")
    sha = sha256_file(file)

    out.mkdir(parents=True, exist_ok=True)
    written = [
        save_weights(out / MODEL_FILE, sd, chosen, step, weights,
                     extra={"source": file.name, "source_sha256": sha}),
    ]  # fmt: skip
    write_text_atomic(out / PRESET_FILE, chosen.to_toml())
    written.append(out / PRESET_FILE)

    grid, grid_step = (Path(samples), None) if samples is not None else _grid_of(run, step)
    if grid is not None:
        _copy_png(grid, out / SAMPLES_FILE)
        written.append(out / SAMPLES_FILE)
    else:
        (out / SAMPLES_FILE).unlink(missing_ok=True)  # a --force export keeps no stale grid
    rows = _metric_rows(run, file, sha, best)
    if rows:
        write_json_atomic(out / STAMPS_FILE, {"rows": rows}, indent=2)
        written.append(out / STAMPS_FILE)
    else:
        (out / STAMPS_FILE).unlink(missing_ok=True)

    card = model_card(
        chosen, sd, step=step, weights=weights, source=file, sha256=sha, official=official, rows=rows,
        grid=None if grid is None else (grid.name, grid_step, samples is not None), repo_id=repo_id,
        notes=notes,
    )  # fmt: skip
    write_text_atomic(out / CARD_FILE, card)
    written.append(out / CARD_FILE)
    return Exported(out, written, file, chosen, step, weights, notes)


def _source_file(source: str | os.PathLike[str], best: bool) -> Path:
    if not best:
        return find_checkpoint(source, ema=True)
    file = Path(source) / BEST_DIR / EMA_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file}: no best checkpoint (a run keeps its best FID's EMA weights there when [eval] is on with "
            "keep_best); export without --best for the newest checkpoint"
        )
    return file


def _run_of(file: Path) -> Path | None:
    """The run dir of RUN/ckpts/<step>/X or RUN/best/X (it has a metrics.jsonl or preset.toml), else None."""
    if file.parent.parent.name == CKPTS:
        run = file.parent.parent.parent
    elif file.parent.name == BEST_DIR:
        run = file.parent.parent
    else:
        return None
    return run if (run / METRICS_FILE).is_file() or (run / PRESET_FILE).is_file() else None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file exists under this name where a directory is needed")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out}: the folder is not empty; choose another --out, or pass --force to "
                          "replace the exported files in it")  # fmt: skip


def _preset_beside(file: Path) -> Preset | None:
    beside = file.parent / PRESET_FILE
    return load_preset(beside) if beside.is_file() else None


def _check_fits(model: ModelConfig, sd: dict[str, Any], file: Path) -> None:
    """The weights fit the [model] table's network key by key and shape by shape (a meta-device model: no
    memory)."""
    import torch

    from uvit_cli.model import UViT

    with torch.device("meta"):
        expected = UViT(**model).state_dict()
    check_state_dict(expected, sd, str(file))


def _grid_of(run: Path | None, step: int | None) -> tuple[Path | None, int | None]:
    """The run's sample grid of `step`, else its newest grid at or before `step`, else its newest."""
    found = []
    for p in (run / SAMPLES).iterdir() if run is not None and (run / SAMPLES).is_dir() else []:
        if (m := _GRID_RE.match(p.name)) and p.is_file():
            found.append((int(m[1]), p))
    if not found:
        return None, None
    found.sort()
    upto = [f for f in found if step is None or f[0] <= step]
    s, p = (upto or found)[-1]
    return p, s


def _copy_png(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ConfigError(f"{src}: not a PNG file (the card shows samples.png)")
    with atomic_open(dst, "wb") as f:
        f.write(data)


def _finite(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _metric_rows(run: Path | None, file: Path, sha: str, best: bool) -> list[dict[str, Any]]:
    """The measured rows of these weights: `uvit fid --ckpt` stamps beside the file whose checkpoint is this
    file (by sha256), RUN/best/fid.json for the best weights, and the run's [eval] rows (FID while training,
    with the protocol of the run's preset)."""
    rows: list[dict[str, Any]] = []
    for p in sorted(file.parent.glob(f"{file.stem}.fid-*.json")):
        stamp = _read_json(p)
        g = stamp.get("samples", {}).get("generator", {}) if isinstance(stamp, dict) else {}
        if isinstance(g, dict) and g.get("checkpoint_sha256") == sha:
            values = {k: stamp[k] for k in _METRICS if _finite(stamp.get(k))}
            rows.append({"source": p.name, "step": None, **values, "stamp": stamp})
    if run is None:
        return rows
    if best and isinstance(rec := _read_json(run / BEST_DIR / "fid.json"), dict) and _finite(rec.get("fid")):
        rows.append({"source": f"{BEST_DIR}/fid.json", "step": rec.get("step"), "fid": rec["fid"],
                     "stamp": rec.get("stamp")})  # fmt: skip
    protocol = _eval_protocol(run)
    try:
        lines = (run / METRICS_FILE).read_bytes().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and _finite(rec.get("fid")) and _finite(rec.get("step")):
            values = {k: rec[k] for k in _METRICS if _finite(rec.get(k))}
            rows.append({"source": METRICS_FILE, "step": rec["step"], **values, "n": rec.get("fid_n"),
                         "stamp": protocol})  # fmt: skip
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _eval_protocol(run: Path) -> dict[str, Any] | None:
    """How the run measured FID while training: its preset's [eval] table (mode, images, reference, steps)."""
    try:
        p = load_preset(run / PRESET_FILE)
    except (OSError, UvitError):
        return None
    ev = p.eval
    return {"mode": ev.mode, "n": ev.n, "reference": None if ev.ref is None else str(ev.ref),
            "solver": p.sample.solver, "steps": ev.steps or p.sample.steps, "cfg_scale": p.sample.cfg_scale,
            "seed": ev.seed, "classes": ev.classes}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The model card


def pipeline_tag(model: ModelConfig) -> str:
    """The Hub's task of a network: text-to-image for text models; class-conditional and unconditional models
    are listed as unconditional-image-generation (the Hub has no class-conditional task; ImageNet generators
    such as MAR and PAR are tagged so)."""
    return "text-to-image" if model.conditioning == "text" else "unconditional-image-generation"


def model_card(
    preset: Preset,
    sd: dict[str, Any],
    *,
    step: int | None,
    weights: str,
    source: Path,
    sha256: str,
    official: bool,
    rows: list[dict[str, Any]],
    grid: tuple[str, int | None, bool] | None,
    repo_id: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """README.md of an exported folder: the Hub's YAML header, then the model, the metrics, samples, usage."""
    m, d = preset.model, preset.data
    cond = m.conditioning
    kind = {"text": "text-to-image", "class": "class-conditional"}.get(cond, "unconditional")
    tags = ["u-vit", "diffusion", kind, d.kind, f"{d.space}-space"]
    params = sum(math.prod(v.shape) for v in sd.values())
    repo = repo_id or REPO_PLACEHOLDER
    release = official_file(source.name) if official else None
    lines = ["---", "library_name: uvit", "tags:", *(f"- {t}" for t in dict.fromkeys(tags)),
             f"pipeline_tag: {pipeline_tag(preset.model)}", "---", "", f"# {preset.name}", ""]  # fmt: skip
    what = (f"the paper's released {release.model}" if release else
            "released U-ViT weights (the paper's format)" if official else "a U-ViT trained with uvit")  # fmt: skip
    lines += [
        f'U-ViT ("All are Worth Words: A ViT Backbone for Diffusion Models", Bao et al., CVPR 2023): {what}, '
        f"{kind}, {d.resolution}x{d.resolution} {d.kind} in {d.space} space.",
        "",
        "| | |",
        "|---|---|",
        f"| preset | `{preset.name}` (`preset.toml`) |",
        f"| network | embed_dim {m.embed_dim}, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}, "
        f"{params:,} parameters |",
        f"| objective | {preset.train.objective}, schedule {preset.schedule.kind} |",
        f"| sampler (preset) | {preset.sample.solver}, {preset.sample.steps} steps, cfg scale "
        f"{preset.sample.cfg_scale:g} |",
        f"| weights | {_WEIGHTS.get(weights, weights)}, "
        f"{'step ' + format(step, ',') if step is not None else 'step not recorded'} |",
        f"| source | `{source.name}`, sha256 `{sha256}` |",
    ]
    if release:
        lines.append(f"| reported | FID {release.fid} after {release.iterations} iterations (official README, "
                     "not measured here) |")  # fmt: skip
    lines += ["", "## Metrics", ""]
    if rows:
        lines += ["| step | " + " | ".join(_METRICS.values()) + " | protocol | from |",
                  "|---|" + "---|" * len(_METRICS) + "---|---|"]  # fmt: skip
        for r in rows:
            vals = " | ".join(f"{r[k]:.4g}" if k in r else "" for k in _METRICS)
            step_s = "" if r.get("step") is None else f"{int(r['step']):,}"
            lines.append(f"| {step_s} | {vals} | {_protocol(r)} | `{r['source']}` |")
        lines += ["", f"Every row's full protocol stamp is in `{STAMPS_FILE}`."]
    else:
        lines.append(
            "No metric was measured with these weights (`uvit fid --ckpt` writes a stamp beside them)."
        )
    lines += ["", "## Samples", ""]
    if grid is not None:
        name, grid_step, given = grid
        if given:
            at = ", given with --samples"
        else:
            at = "" if grid_step is None else f", the EMA model at step {grid_step:,}"
        lines.append(f"![samples]({SAMPLES_FILE}) ({name}{at})")
    else:
        lines.append("No sample grid: these weights come without a training run (`uvit export --samples PNG` "
                     "adds one).")  # fmt: skip
    lines += ["", "## Use", "", "```sh", 'pip install "uvit[hub]"']
    label = 207 if m.num_classes > 208 else 0  # 207: an ImageNet class (golden retriever)
    use = {"text": '--prompt "a photo of a cat"', "class": f"--class {label}"}.get(cond, "")
    train_arg = preset.name if preset.name in list_presets() else PRESET_FILE  # this folder's preset.toml
    lines += [f"uvit sample --ckpt {repo} {use} --n 4".replace("  ", " "),
              f"uvit train {train_arg} --init {repo}   # fine-tune", "```", ""]  # fmt: skip
    if d.space == "latent":
        lines += ["Latent models decode with the preset's autoencoder (`--vae`, `$UVIT_VAE` or the Hugging Face "
                  "cache; docs/encoders.md)" + (", and read prompts with CLIP (`--clip`)." if cond == "text" else
                  "."), ""]  # fmt: skip
    lines += ["The weights keep the official key names: the official code loads `model.safetensors` with "
              "`safetensors.torch.load_file` and `load_state_dict` unchanged.", ""]  # fmt: skip
    if notes:
        lines += [*(f"Note: {n}." for n in notes), ""]
    return "\n".join(lines)


def _protocol(row: dict[str, Any]) -> str:
    s = row.get("stamp")
    if not isinstance(s, dict):
        return ""
    g = s.get("samples", {}).get("generator") if isinstance(s.get("samples"), dict) else None
    if isinstance(g, dict):  # a `uvit fid` stamp
        ref = s.get("reference", {}).get("sha256", "") if isinstance(s.get("reference"), dict) else ""
        return (f"{s.get('mode')}, {s.get('num_images')} images, {g.get('solver')} {g.get('steps')} steps, "
                f"cfg {g.get('cfg_scale')}, seed {g.get('seed')}, ref {str(ref)[:12]}")  # fmt: skip
    if "n" in s:  # the run's [eval] protocol
        ref = Path(str(s.get("reference"))).name if s.get("reference") else "?"
        return (f"{s.get('mode')}, {row.get('n') or s.get('n')} images, {s.get('solver')} {s.get('steps')} "
                f"steps, cfg {s.get('cfg_scale')}, seed {s.get('seed')}, ref {ref}")  # fmt: skip
    return f"{s.get('mode')}, {s.get('num_images')} images"
