"""FID while training (the preset's [eval] table): the EMA weights sampled with the [sample] solver and guidance,
streamed into the Inception statistics on every rank (`uvit fid --ckpt`'s machinery), logged to metrics.jsonl.

The conditions are those of `uvit fid --ckpt` (fid.generated.fid_conditions): labels by `eval.classes` for class
models (random: uniform, the paper's; balanced: index % K), the val split's captions for text models, all
drawn from (eval.seed, image index), so successive evaluations compare the same requests. `eval.metrics` adds
numbers of the same Inception pass (sFID, Inception Score, precision/recall, CLIP score), logged beside `fid`
under the stamp's keys; FID alone picks the best. With `keep_best`, the EMA weights of the best FID so far are
kept in RUN/best/ (ema.safetensors, loadable by `uvit sample --ckpt RUN/best`, and fid.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uvit_cli.checkpoint import EMA_FILE, save_weights
from uvit_cli.config import Preset
from uvit_cli.errors import CheckpointError
from uvit_cli.fileio import write_json_atomic

if TYPE_CHECKING:
    from uvit_cli.fid.metrics import ClipScoreFn

BEST_DIR = "best"
BEST_FILE = "fid.json"


class FidEvaluator:
    """FID of the EMA model at the steps [eval] names; construct it on every rank (the sums are all-reduced).

    The reference, mode, metrics and Inception weights are checked on construction, so a wrong path (or an ADM
    metric outside legacy_tensorflow) fails at the start of the run, not after the first `interval` steps.
    `features`/`feature_dim` replace the Inception and `clip_score` the CLIP scorer (tests)."""

    def __init__(
        self,
        preset: Preset,
        run_dir: Path,
        device: torch.device,
        *,
        features: Any = None,
        feature_dim: int = 2048,
        clip_score: ClipScoreFn | None = None,
    ) -> None:
        from uvit_cli.fid.generated import check_fid_request, fid_conditions, val_prompts
        from uvit_cli.fid.metrics import clip_scorer
        from uvit_cli.sample.resolve import preset_autoencoder
        from uvit_cli.sample.settings import SampleOptions, SampleSettings

        ev = preset.eval
        assert ev.ref is not None, "FidEvaluator is built only when [eval] ref is set"
        self.preset, self.run_dir, self.device, self.ref = preset, run_dir, device, ev.ref
        self.features, self.feature_dim = features, feature_dim
        if "clip" in ev.metrics and clip_score is None:
            clip_score = clip_scorer(None, device)  # $UVIT_CLIP, else the Hugging Face cache: found now
        self.clip_score = clip_score
        self.metrics = check_fid_request(
            ev.ref, ev.n, ev.mode, None, features, metrics=ev.metrics, clip_score=clip_score
        )
        # compile=False: a network compiled for sampling would recompile at every evaluation. Guidance the
        # model cannot take is refused here, before the first step (the one guidance rule).
        self.settings = SampleSettings.from_preset(preset, SampleOptions(steps=ev.steps, compile=False))
        self.conditions, self.uncond, self.cond_info = fid_conditions(preset, ev.seed, classes=ev.classes)
        # the captions each image was generated from, which CLIP score compares it with
        self.prompts = val_prompts(preset.data.set_path(), ev.seed) if "clip" in self.metrics else None
        self.autoencoder = preset_autoencoder(preset, None, device)  # $UVIT_VAE > preset > HF cache
        best = run_dir / BEST_DIR / BEST_FILE
        self.best = _best_fid(best) if best.is_file() else math.inf

    def due(self, step: int, end_step: int) -> bool:
        return step % self.preset.eval.interval == 0 or step == end_step

    @torch.no_grad()
    def __call__(self, ema: torch.nn.Module, step: int, *, write: bool) -> dict[str, Any]:
        """Measure the EMA model at `step`; the metrics record (step, fid, fid_n, fid_seconds, fid_best,
        fid_is_best, and each other metric by its stamp key: sfid, inception_score, precision, recall,
        clip_score). With `write` (rank 0), a new best FID's EMA weights go to RUN/best/."""
        from uvit_cli.fid.generated import fid_of_model

        ev = self.preset.eval
        was_training = ema.training
        ema.eval()
        try:
            generator = {
                "checkpoint": f"{self.run_dir} step {step} (EMA, in training)",
                "step": step,
                "conditions": self.cond_info,
            }
            result = fid_of_model(
                ema, self.preset, self.ref, n=ev.n, seed=ev.seed, settings=self.settings,
                conditions=self.conditions, uncond=self.uncond, autoencoder=self.autoencoder, device=self.device,
                generator=generator, mode=ev.mode, features=self.features, feature_dim=self.feature_dim,
                metrics=self.metrics, prompts=self.prompts, clip_score=self.clip_score,
                label_protocol=self.cond_info.get("label_protocol"),
            )  # fmt: skip
        finally:
            ema.train(was_training)
        fid = float(result.fid)
        best = fid < self.best
        if best:
            self.best = fid
            if write and ev.keep_best:
                d = self.run_dir / BEST_DIR
                d.mkdir(exist_ok=True)
                save_weights(d / EMA_FILE, ema.state_dict(), self.preset, step, "ema")
                write_json_atomic(d / BEST_FILE, {"step": step, "fid": fid, "n": ev.n, "mode": ev.mode,
                                                  "ref": str(self.ref), "stamp": result.stamp})  # fmt: skip
        others = {k: float(v) for k, v in result.metrics.items() if k != "fid"}
        return {
            "step": step,
            "fid": fid,
            "fid_n": ev.n,
            "fid_seconds": float(result.stamp.get("seconds", 0.0)),
            "fid_best": self.best,
            "fid_is_best": best,
            **others,
        }


def _best_fid(path: Path) -> float:
    """The FID recorded in RUN/best/fid.json; one line if the file is not what this module wrote."""
    try:
        fid = json.loads(path.read_bytes())["fid"]
    except (OSError, ValueError, RecursionError, TypeError, KeyError, IndexError):
        fid = None
    if type(fid) not in (int, float) or not math.isfinite(fid) or fid < 0:
        raise CheckpointError(
            f"{path}: unreadable record of the best FID; delete {path.parent} to start the record afresh"
        )
    return float(fid)
