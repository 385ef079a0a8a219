"""Which numbers `uvit fid` reports and their definitions: FID (pytorch-fid / clean-fid) and the ADM table
(openai/guided-diffusion `evaluations/evaluator.py`: Inception Score, FID, sFID, precision, recall), plus
CLIP score for text-to-image samples.

Names here are what `--metrics` takes; `STAMP_KEYS` what the stamp calls each number. The Inception
Score is streamed: images are split into consecutive chunks of IS_SPLIT by their index (ADM splits its
`arr_0` so), and per chunk only the sum of p and the sum of p log p are kept, so it needs no N x 1008
array and ranks merge by adding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from uvit_cli.config import FidMetric
from uvit_cli.errors import ConfigError

METRICS: tuple[str, ...] = get_args(FidMetric)  # the one list: config.FidMetric ([eval] metrics) names them
ADM_TABLE = ("fid", "sfid", "is", "pr")  # `--metrics all`: what DiT, SiT, REPA, RAE report
# Metrics whose definition is ADM's evaluator, which feeds images to the TF graph (resize inside the network):
# legacy_tensorflow is that path, so they are computed there only.
ADM_ONLY = ("sfid", "is", "pr")
ADM_MODE = "legacy_tensorflow"
STAMP_KEYS = {
    "fid": ("fid",),
    "sfid": ("sfid",),
    "is": ("inception_score",),
    "pr": ("precision", "recall"),
    "clip": ("clip_score",),
}
IS_SPLIT = 5000  # ADM's compute_inception_score(split_size=5000)
PR_K = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10_000  # ADM's row_batch_size = col_batch_size: blocks of the distance matrices

# CLIP score's hook: B uint8 (H, W, 3) images at their own size and their B prompts -> (B,) scores,
# 100 * max(cos(image embedding, text embedding), 0) (the encoder does its own resize and crop).
ClipScoreFn = Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray]


def parse_metrics(spec: str | Iterable[str]) -> tuple[str, ...]:
    """`"fid,sfid"`, `["is", "pr"]`, `"all"` (= the ADM table) -> the metrics in canonical order; unknown
    names are one ConfigError line listing the choices."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: set[str] = set()
    for raw in items:
        name = raw.strip().lower()
        if name == "all":
            names.update(ADM_TABLE)
        elif name in METRICS:
            names.add(name)
        elif name:
            raise ConfigError(
                f"--metrics: unknown metric {raw.strip()!r}; choose from {', '.join(METRICS)} or all "
                "(= fid,sfid,is,pr, the ADM evaluator's table)"
            )
    if not names:
        raise ConfigError("--metrics: no metric named; e.g. --metrics fid or --metrics all")
    return tuple(m for m in METRICS if m in names)


def default_mode(metrics: Sequence[str]) -> str:
    """The `--mode` when none is given: legacy_tensorflow for the ADM metrics, else clean (clean-fid's default)."""
    return ADM_MODE if any(m in ADM_ONLY for m in metrics) else "clean"


def check_metrics_mode(metrics: Sequence[str], mode: str) -> None:
    """sFID, IS and precision/recall are ADM's evaluator's numbers: only its preprocessing (legacy_tensorflow)."""
    other = [m for m in metrics if m in ADM_ONLY]
    if other and mode != ADM_MODE:
        raise ConfigError(
            f"--metrics {','.join(other)} with --mode {mode}: these are the ADM evaluator's numbers, defined on "
            f"the TF Inception graph's own resize; use --mode {ADM_MODE} (the default when they are asked), "
            "or measure only fid in this mode"
        )


def needs_spatial(metrics: Sequence[str]) -> bool:
    return "sfid" in metrics


def needs_logits(metrics: Sequence[str]) -> bool:
    return "is" in metrics


def needs_pool_features(metrics: Sequence[str]) -> bool:
    """Precision/recall compare individual images: the pool features are kept (N x 2048 float32)."""
    return "pr" in metrics


# ---------------------------------------------------------------------------------------- Inception Score
@dataclass
class ISChunks:
    """Per chunk c of IS_SPLIT consecutive images: count, sum of p (C, 1008), sum of sum_j p_j log p_j (C,)."""

    count: np.ndarray  # (C,) float64
    sum_p: np.ndarray  # (C, K)
    sum_plogp: np.ndarray  # (C,)

    def score(self) -> float:
        """exp of the mean KL(p || mean p) per chunk, averaged over chunks: ADM's `compute_inception_score`.
        mean_i sum_j p_ij (log p_ij - log m_j) = mean_i sum_j p_ij log p_ij - sum_j m_j log m_j."""
        scores = []
        for n, sp, splogp in zip(self.count, self.sum_p, self.sum_plogp, strict=True):
            if n == 0:
                continue
            m = sp / n
            kl = splogp / n - float(np.sum(_xlogx(m)))
            scores.append(np.exp(kl))
        if not scores:
            raise ConfigError("the Inception Score needs at least one image")
        return float(np.mean(scores))


def _xlogx(p: np.ndarray) -> np.ndarray:
    """p log p with 0 log 0 = 0 (a probability that underflowed to 0 adds nothing, as in the limit)."""
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def frechet_key(metric: str) -> tuple[str, str]:
    """The reference npz keys a Fréchet metric compares with: FID mu/sigma, sFID mu_s/sigma_s (ADM's names)."""
    return ("mu", "sigma") if metric == "fid" else ("mu_s", "sigma_s")


def clip_scorer(weights: str | None, device: Any, *, preset: str | None = None) -> ClipScoreFn:
    """CLIP score with CLIP ViT-L/14's two towers (`weights` > $UVIT_CLIP > `preset` > the Hugging Face cache):
    the file is found now, so a missing one is one line before any work; the model loads at the first batch."""
    from uvit_cli.encoders.weights import resolve_weights

    resolve_weights(weights, "clip_model", preset=preset)
    model: list[Any] = []

    def score(images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        from uvit_cli import dist
        from uvit_cli.encoders import load_clip_model
        from uvit_cli.encoders.clip_score import clip_score

        if not model:
            model.append(load_clip_model(weights, dist.device(device), preset=preset))
        return clip_score(images, prompts, model[0]).numpy()

    return score
