"""The conditioning helpers of `sample.conditions`: the labels a user may ask for, and the conditions a
training grid draws from a prepared set."""

from __future__ import annotations

import torch

from uvit_cli.config import ModelConfig
from uvit_cli.sample.conditions import data_conditions, valid_classes


def test_the_null_class_of_condition_dropout_is_not_a_valid_label():
    assert valid_classes(11, 0.1) == range(10)
    assert valid_classes(11, 0.0) == range(11)


class _Set:
    """A prepared set as the grid reads it: items (index, caption choice) -> {"context": (L, D)}, views."""

    num_classes, views = 0, 2

    def __init__(self, n: int) -> None:
        self.contexts = torch.arange(n * 2 * 3, dtype=torch.float32).reshape(n, 2, 3)  # (n, L, D)
        self.empty_context = torch.full((2, 3), -1.0)

    def __len__(self) -> int:
        return len(self.contexts)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"context": self.contexts[key[0]]}


def _model(**kw: object) -> ModelConfig:
    return ModelConfig(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=1, num_heads=2, **kw)


def test_grid_conditions_follow_the_model():
    fn, uncond = data_conditions(_model(num_classes=4), _Set(6), 5)  # the set has no classes: the model's
    assert fn is not None and uncond is not None
    assert fn(range(5))["y"].tolist() == [0, 1, 2, 3, 0] and int(uncond["y"]) == 3
    ds = _Set(6)
    fn, uncond = data_conditions(_model(clip_dim=3, num_clip_token=2), ds, 4)
    assert fn is not None and uncond is not None
    assert torch.equal(fn([1, 3])["context"], ds.contexts[[2, 0]])  # item (i * views) % len: 2, 6 % 6 = 0
    assert uncond["context"].shape == (1, 2, 3) and bool((uncond["context"] == -1).all())
    assert data_conditions(_model(), ds, 4) == (None, None)
