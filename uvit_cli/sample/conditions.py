"""What a network is conditioned on, per image index: labels, label protocols, text contexts, the null condition
of guidance, and inputs of the real shapes (bench, FLOP counts).

A condition function maps the indices of a batch to the network's keywords for those images: `{"y": (B,)}`
for class models, `{"context": (B, L, D)}` for text models, `{}` for unconditional ones; the keyword follows
from the [model] table (`model.conditioning`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

import numpy as np
import torch

from uvit_cli.config import LabelProtocol, ModelConfig
from uvit_cli.errors import ConfigError

# indices of a batch -> the model's conditioning keywords for those images ({"y": (B,)}, {"context": (B,L,D)}, {})
ConditionFn = Callable[[Sequence[int]], dict[str, torch.Tensor]]


def valid_classes(num_classes: int, p_uncond: float) -> range:
    """Labels a user may ask for of a model with `num_classes` label embeddings (model.num_classes) trained
    with condition dropout `p_uncond` (train.p_uncond): with dropout the last class is the null class."""
    return range(num_classes - 1) if p_uncond > 0 else range(num_classes)


def class_conditions(labels: Sequence[int] | Mapping[int, int]) -> ConditionFn:
    """Labels per image index (a sequence indexed by image index, or a mapping index -> label)."""

    def fn(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"y": torch.tensor([int(labels[int(i)]) for i in indices], dtype=torch.long)}

    return fn


# How the class of each image of a class-conditional FID set is chosen, by the name recorded in samples.jsonl
# and FID stamps. "random": uniform labels drawn from (seed, index), as U-ViT's official ImageNet FID
# (`sample_label`) and DiT's, SiT's and ADM's FID-50K. "balanced": class = index % K, so N = m K images hold
# m of each class (RAE's and REPA-E's FID-50K: 50 per class); on strong models it reads about 0.1 FID lower
# than random labels, so the protocol is stated beside every number.
LABEL_PROTOCOLS: tuple[str, ...] = get_args(LabelProtocol)


def random_label(seed: int, num_classes: int, index: int) -> int:
    """The uniform label in [0, num_classes) of image `index`, from (seed, index) on a stream of its own."""
    return int(np.random.default_rng(np.random.SeedSequence([seed, int(index), 1])).integers(num_classes))


def class_label(protocol: LabelProtocol, seed: int, num_classes: int, index: int) -> int:
    """The class of image `index` under `protocol` (`LabelProtocol`): a function of the index alone (and the
    seed for "random"), so the set does not depend on batch size, GPU count or resume, and a larger N keeps
    the classes of the first images."""
    if protocol == "balanced":
        return int(index) % num_classes
    if protocol == "random":
        return random_label(seed, num_classes, index)
    raise ConfigError(f"unknown label protocol '{protocol}' (choose one of {', '.join(LABEL_PROTOCOLS)})")


def describe_labels(protocol: LabelProtocol, num_classes: int) -> str:
    """One line for stamps: how the labels of `protocol` over the classes 0..num_classes-1 are made."""
    if protocol == "balanced":
        return f"balanced: class = index % {num_classes} (N/{num_classes} per class when {num_classes} divides N)"
    class_label(protocol, 0, num_classes, 0)  # an unknown protocol is one line
    return f"uniform over 0..{num_classes - 1} from (seed, index)"


def label_conditions(protocol: LabelProtocol, seed: int, num_classes: int) -> ConditionFn:
    """Labels of the real classes 0..num_classes-1 (never the null class) per image index under `protocol`."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    class_label(protocol, seed, num_classes, 0)  # an unknown protocol fails here, not in the first batch

    def fn(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        labels = [class_label(protocol, seed, num_classes, int(i)) for i in indices]
        return {"y": torch.tensor(labels, dtype=torch.long)}

    return fn


def random_class_conditions(seed: int, num_classes: int) -> ConditionFn:
    """Uniform labels in [0, num_classes) per image, drawn from (seed, index) on a stream of their own
    (as the official ImageNet FID's uniform `sample_label`), so they too ignore batching."""
    return label_conditions("random", seed, num_classes)


def balanced_class_conditions(num_classes: int) -> ConditionFn:
    """Class-balanced labels: image i gets class i % num_classes (RAE / REPA-E's 50-per-class FID-50K)."""
    return label_conditions("balanced", 0, num_classes)


def context_conditions(contexts: torch.Tensor, rows: Sequence[int] | Mapping[int, int]) -> ConditionFn:
    """Text contexts: image index i gets `contexts[rows[i]]` (contexts (P, 77, D), e.g. one row per prompt)."""

    def fn(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        sel = torch.tensor([int(rows[int(i)]) for i in indices], dtype=torch.long, device=contexts.device)
        return {"context": contexts.index_select(0, sel)}  # (B, 77, D)

    return fn


def null_condition(model: ModelConfig, empty_context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The unconditional input of classifier-free guidance (spec §4.2) of a network of the [model] table
    `model`: the null class K-1 for class models, CLIP('') (1, 77, D) for text models (pass
    `text_encoder.encode([''])` or a data set's empty context), nothing otherwise."""
    if model.conditioning == "class":
        return {"y": torch.tensor(model.num_classes - 1, dtype=torch.long)}
    if model.conditioning == "text":
        if empty_context is None:
            raise ValueError("a text model's null condition is CLIP(''): pass empty_context")
        return {"context": empty_context.reshape(1, *empty_context.shape[-2:])}
    return {}


def data_null_condition(model: ModelConfig, ds: Any) -> dict[str, torch.Tensor]:
    """The null condition of a network of the [model] table `model` trained on the prepared set `ds`
    (`data.FeatureDataset`): the null class, the set's CLIP('') for text models, nothing otherwise."""
    return null_condition(model, ds.empty_context if model.conditioning == "text" else None)


def data_conditions(
    model: ModelConfig, ds: Any, n: int
) -> tuple[ConditionFn | None, dict[str, torch.Tensor] | None]:
    """(conditions of images 0..n-1, the null condition) of a network of the [model] table `model` trained on
    the prepared set `ds` (`data.FeatureDataset`): labels i % K and the null class for class models; for text
    models the captions of the first items (caption choice of epoch 0) and the set's CLIP(''); (None, None)
    for unconditional ones."""
    if model.conditioning == "class":
        k = ds.num_classes or model.num_classes
        return class_conditions([i % k for i in range(n)]), null_condition(model)
    if model.conditioning == "text":
        items = [(i * ds.views) % len(ds) for i in range(n)]
        contexts = torch.stack([ds[(i, 0)]["context"] for i in items])  # (n, L, D)
        return context_conditions(contexts, range(n)), data_null_condition(model, ds)
    return None, None


def example_conditions(
    model: ModelConfig, batch: int, generator: torch.Generator | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Conditions of the real shapes for `batch` images and the null condition beside them (timing, FLOP
    counts): random contexts (B, L, D) and a random null context (1, L, D) for text models, real-class labels
    (B,) and the null class for class models, nothing for unconditional ones. Made on the default device (the
    meta device under `with torch.device("meta")`); the `generator`'s draws are then on the CPU."""
    if model.conditioning == "text":
        assert model.clip_dim is not None
        shape = (model.num_clip_token, model.clip_dim)
        context = torch.randn(batch, *shape, generator=generator)
        return {"context": context}, {"context": torch.randn(1, *shape, generator=generator)}
    if model.conditioning == "class":
        y = torch.randint(0, model.num_classes - 1, (batch,), generator=generator)
        return {"y": y}, {"y": torch.full((1,), model.num_classes - 1)}
    return {}, {}
