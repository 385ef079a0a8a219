"""FID (and the other metrics) straight from a checkpoint: generate with the paper's conditions, stream images
into the statistics.

No PNGs are written. Conditions follow the official eval scripts (spec §4.2-4.3, §5.4, §6):
  class models  labels uniform over the real classes, drawn from (seed, index) (ImageNet's `sample_label`);
                `classes="balanced"` gives image i class i % K instead (RAE / REPA-E's 50 per class)
  text models   contexts of the prepared **val** split, one caption per image chosen from (seed, index)
                (eval_t2i_discrete.py: shuffled val features, one random caption each); CFG's null is CLIP('')
  unconditional nothing
Every choice depends only on (seed, image index), so the result does not depend on the batch size or on the
number of torchrun ranks: rank r generates indices r::world and the feature sums are all-reduced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uvit_cli.config import LabelProtocol, Preset
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.fid import FidResult, check_request, fid_from_generator
from uvit_cli.fid.metrics import ClipScoreFn

if TYPE_CHECKING:
    from uvit_cli.sample.resolve import SamplerSpec
    from uvit_cli.sample.settings import SampleSettings

__all__ = [
    "check_fid_request",
    "fid_conditions",
    "fid_from_checkpoint",
    "fid_of_model",
    "paper_num_images",
    "val_context_conditions",
    "val_prompts",
]

# progress(images done over all ranks (estimated from this rank's share), total)
Progress = Callable[[int, int], None]


def paper_num_images(preset: Preset) -> int:
    """The sample count of the paper's final FID: the preset's sample.n_samples (30k COCO, 50k otherwise)."""
    return preset.sample.n_samples


def _val_split_missing(root: Path, data_kind: str, have: str) -> DataError:
    how = (
        f"`uvit prepare coco --coco-root DIR --split val --out {root}`"
        if data_kind == "coco"
        else f"`uvit prepare ... --out {root}` with a val split"
    )
    return DataError(
        f"{root}: no prepared 'val' split to take FID contexts from (prepared: {have}); make it with {how}, "
        "or point --contexts-from at shards that have one"
    )


def val_context_conditions(
    root: str | os.PathLike[str], seed: int, preset: Preset
) -> tuple[Callable[[Sequence[int]], dict[str, Any]], Any, dict[str, Any]]:
    """(conditions, empty context (L, D), info) for a text model from the val split of prepared shards.

    Image i takes val image perm[i % N] (perm: a permutation of the N val images seeded by `seed`; every
    image is used once before any repeats, as the official shuffled loader) and, of that image's captions,
    the one `choose(seed, i // N, item)` picks. The null condition is the set's empty_context.npy (CLIP('')
    from the same encoder as the captions).
    """
    import torch

    from uvit_cli.data import MANIFEST, read_manifest

    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise _val_split_missing(root, preset.data.kind, "nothing: no manifest.json there")
    manifest = read_manifest(root)
    splits = manifest.get("splits", {})
    if "val" not in splits:
        raise _val_split_missing(root, preset.data.kind, ", ".join(splits) or "none")
    if manifest.get("conditioning") != "text":
        raise DataError(
            f"{root}: a {manifest.get('conditioning')}-conditional set, but preset '{preset.name}' needs "
            "captions; pass --contexts-from with prepared text shards (e.g. COCO)"
        )
    want = (preset.model.num_clip_token, preset.model.clip_dim)
    got = tuple(manifest.get("context_shape") or ())
    if got != want:
        raise DataError(
            f"{root}: contexts of shape {got}, but preset '{preset.name}' takes {want} "
            "(prepared with another text encoder?); pass --contexts-from with matching shards"
        )
    ds, perm = _val_order(root, seed)
    n_val = ds.num_images

    def conditions(indices: Sequence[int]) -> dict[str, Any]:
        rows = []
        for i in indices:
            item = int(perm[int(i) % n_val]) * ds.views  # view 0 of that val image
            rows.append(ds[(item, int(i) // n_val)]["context"])  # (L, D), caption choose(seed, epoch, item)
        return {"context": torch.stack(rows)}  # (B, L, D)

    info = {
        "path": str(root),
        "split": "val",
        "val_images": n_val,
        "fingerprint": manifest.get("fingerprint"),
        "caption": "val image perm_seed[i % N], caption choose(seed, i // N, image)",
        "null": "empty_context.npy of the shards",
    }
    return conditions, ds.empty_context, info


def _val_order(root: Path, seed: int) -> tuple[Any, Any]:
    """The val split and the order its images are used in: a permutation seeded by `seed`."""
    import numpy as np

    from uvit_cli.data import FeatureDataset

    ds = FeatureDataset(root, "val", seed=seed)
    # a stream of its own ([seed, tag]), apart from the per-image noise ([seed, i]) and labels ([seed, i, 1])
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1, 2])).permutation(ds.num_images)
    return ds, perm


def val_prompts(root: str | os.PathLike[str], seed: int) -> Callable[[Sequence[int]], list[str]]:
    """The caption text of each generated image, the one `val_context_conditions` gives it as context
    (what CLIP score compares the image with)."""
    root = Path(root)
    ds, perm = _val_order(root, seed)
    n_val = ds.num_images
    texts: dict[int, list[str]] = {}

    def prompts(indices: Sequence[int]) -> list[str]:
        out = []
        for i in indices:
            item = int(perm[int(i) % n_val]) * ds.views
            if item not in texts:
                texts[item] = ds.captions(item)
            j = ds.caption_index(item, int(i) // n_val)
            if j >= len(texts[item]):
                raise DataError(
                    f"{root}: the val split stores no caption texts, which CLIP score needs; prepare it again"
                )
            out.append(texts[item][j])
        return out

    return prompts


def fid_conditions(
    preset: Preset,
    seed: int,
    *,
    classes: LabelProtocol = "random",
    contexts_from: str | os.PathLike[str] | None = None,
    null_context: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """(conditions, CFG's null condition, info) of the paper's FID runs for `preset` (module docstring).

    Class models label image i by `classes` (`config.LabelProtocol`; info names it as `label_protocol`, the
    key of samples.jsonl); "balanced" on another model is one line. Text models take contexts from the val
    split of `contexts_from` (default the preset's data set) and, as null, `null_context` (e.g. CLIP(''))
    else the shards' empty_context; None, None for unconditional ones."""
    from uvit_cli.sample.conditions import describe_labels, label_conditions, null_condition, valid_classes

    cond = preset.model.conditioning
    info: dict[str, Any] = {"kind": cond}
    if classes != "random" and cond != "class":
        kind = "text-conditional" if cond == "text" else "unconditional"
        raise ConfigError(
            f"--classes {classes}: labels a class-conditional model's images, but preset '{preset.name}' is "
            f"{kind}; drop --classes"
        )
    if cond == "class":
        k = len(valid_classes(preset.model.num_classes, preset.train.p_uncond))
        info["labels"] = describe_labels(classes, k)
        info["label_protocol"] = classes
        return label_conditions(classes, seed, k), null_condition(preset.model), info
    if cond == "text":
        root = Path(contexts_from) if contexts_from is not None else preset.data.set_path()
        conditions, empty, info["contexts"] = val_context_conditions(root, seed, preset)
        if null_context is not None:
            empty = null_context
        return conditions, null_condition(preset.model, empty), info
    return None, None, info


def check_fid_request(
    ref: str | os.PathLike[str],
    n: int | None,
    mode: str,
    inception_weights: Any,
    features: Any,
    *,
    metrics: str | Iterable[str] = ("fid",),
    clip_score: ClipScoreFn | None = None,
) -> tuple[str, ...]:
    """The cheap checks before a model loads: the metrics and their mode, the reference (it has what each
    metric needs: `fid.check_request`), the Inception weights (with the classifier head for `is`), n.
    Returns the metrics in canonical order."""
    from uvit_cli.fid.metrics import PR_K, needs_logits

    names, _ = check_request(ref, metrics, mode, features=features, feature_dim=None, clip_score=clip_score)
    if features is None:
        from uvit_cli.inception import resolve_weights

        resolve_weights(inception_weights, mode, need_head=needs_logits(names))
    if n is not None and n < 2:
        raise DataError(f"--n {n}: FID needs at least 2 images (the paper uses 50,000; 30,000 for MS-COCO)")
    if n is not None and "pr" in names and n <= PR_K:
        raise DataError(f"--n {n}: precision/recall need more than {PR_K} images")
    return names


def fid_of_model(
    model: Any,
    preset: Preset,
    ref: str | os.PathLike[str],
    *,
    n: int,
    seed: int,
    settings: SampleSettings,
    conditions: Any,
    uncond: Any,
    autoencoder: Any,
    device: Any,
    generator: dict[str, Any],
    mode: str = "clean",
    inception_weights: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    features: Any = None,
    feature_dim: int = 2048,
    metrics: str | Iterable[str] = ("fid",),
    prompts: Callable[[Sequence[int]], list[str]] | None = None,
    clip_score: ClipScoreFn | None = None,
    label_protocol: LabelProtocol | None = None,
) -> FidResult:
    """The `metrics` of `n` images of `model` (eval mode) streamed into the statistics; this rank makes
    indices r::world and the sums are all-reduced. `settings` come from `SampleSettings.from_preset`;
    `generator` describes the source in the stamp; `prompts(indices)` the images' texts (CLIP score,
    `val_prompts`); `label_protocol` how `conditions` labels a class model's images (`fid_conditions`),
    recorded in the stamp's protocol. The one function `uvit fid --ckpt` and training's [eval] call; its
    images are `sample.generate`'s."""
    from uvit_cli import dist
    from uvit_cli.sample.generate import generate

    world = dist.world_size()
    mine = range(dist.rank(), n, world)  # a range, not a list: memory does not grow with n
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(min(done * world, n), n)

    def batches() -> Iterator[Any]:
        for _, images in generate(
            model, preset, mine, conditions, uncond, seed=seed, autoencoder=autoencoder, settings=settings,
            device=device, progress=advance,
        ):  # fmt: skip
            yield images  # uint8 (B, H, W, 3)

    if progress is not None:
        progress(0, n)
    result = fid_from_generator(
        batches(),
        ref,
        mode=mode,
        inception_weights=inception_weights,
        device=device,
        total=len(mine),
        generator={
            **generator,
            "preset": preset.name,
            "n": n,
            "seed": seed,
            **settings.to_dict(),  # solver, steps, cfg_scale, guidance_interval, precision
            "autoencoder": None
            if autoencoder is None
            else {"path": autoencoder.weights_path, "sha256": autoencoder.weights_sha256},
        },
        features=features,
        feature_dim=feature_dim,
        metrics=metrics,
        indices=mine,
        prompts=prompts,
        clip_score=clip_score,
    )
    if label_protocol is not None:
        result.stamp["protocol"]["label_protocol"] = label_protocol  # the key samples.jsonl records it by
    return result


def fid_from_checkpoint(
    ref: str | os.PathLike[str],
    spec: SamplerSpec,
    *,
    n: int | None = None,
    clip: str | None = None,
    contexts_from: str | os.PathLike[str] | None = None,
    mode: str = "clean",
    inception_weights: str | os.PathLike[str] | None = None,
    device: Any = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    features: Any = None,
    feature_dim: int = 2048,
    metrics: str | Iterable[str] = ("fid",),
    clip_score: ClipScoreFn | None = None,
    classes: LabelProtocol = "random",
) -> FidResult:
    """The `metrics` (FID by default) of `n` images generated with `spec` (as `uvit sample`'s) against `ref`,
    streamed, no files written. n defaults to the preset's sample.n_samples.
    `classes`: a class model's labels, random (the paper's) or balanced (`sample.label_conditions`).
    `clip_score`: the CLIP scorer for `--metrics clip` (text models; prompts are the val captions used).
    `contexts_from`: prepared shards with a val split (text models; default the preset's data.path).
    `clip`: if given, CFG's null context is CLIP('') of this encoder instead of the shards' empty_context.
    `features`/`feature_dim` replace the Inception (tests). Under torchrun rank r generates indices r::world.
    """
    from uvit_cli import dist
    from uvit_cli.sample.resolve import load_sampler, preset_autoencoder, text_encoder

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    seed = spec.seed
    names = check_fid_request(
        ref, n, mode, inception_weights, features, metrics=metrics, clip_score=clip_score
    )  # before the model loads
    if device is not None:
        device = dist.device(device)  # a --device that is not one here: one line, before the model loads
    with dist.process_group():
        sampler = load_sampler(spec, device=device, say=say)
        loaded = sampler.loaded
        text_model = loaded.preset.model.conditioning == "text"
        null_context = None
        if clip is not None and text_model:
            null_context = text_encoder(loaded.preset.text_encoder, clip, sampler.device).encode([""])
        conditions, uncond, cond_info = fid_conditions(
            loaded.preset, seed, classes=classes, contexts_from=contexts_from, null_context=null_context
        )
        if null_context is not None:
            cond_info["contexts"]["null"] = f"CLIP('') of {clip}"
        prompts = None
        if "clip" in names:
            if not text_model:
                raise DataError(f"--metrics clip: preset '{loaded.preset.name}' is not a text-to-image model")
            root = Path(contexts_from) if contexts_from is not None else loaded.preset.data.set_path()
            prompts = val_prompts(root, seed)
        autoencoder = preset_autoencoder(loaded.preset, spec.vae, sampler.device)
        say(loaded.note)
        result = fid_of_model(
            loaded.model,
            loaded.preset,
            ref,
            n=n if n is not None else paper_num_images(loaded.preset),
            seed=seed,
            settings=sampler.settings,  # checked once, with the guidance rule, by load_sampler
            conditions=conditions,
            uncond=uncond,
            autoencoder=autoencoder,
            device=sampler.device,
            generator={
                "checkpoint": str(loaded.info.path),
                "checkpoint_sha256": loaded.info.sha256,
                "weights": loaded.note,
                "ema": spec.ema,
                "conditions": cond_info,
            },
            mode=mode,
            inception_weights=inception_weights,
            progress=progress,
            features=features,
            feature_dim=feature_dim,
            metrics=names,
            prompts=prompts,
            clip_score=clip_score,
            label_protocol=cond_info.get("label_protocol"),
        )
        result.stamp["seconds"] = round(time.perf_counter() - t0, 2)  # model loading and sampling included
        return result
