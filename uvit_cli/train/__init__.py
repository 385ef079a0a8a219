"""`uvit train`: the fast, exactly resumable, distributed U-ViT trainer (docs/training.md).

from uvit_cli.train import train
result = train(load_preset("cifar10_uvit_s2"), "runs/cifar", on_event=print)
"""

from __future__ import annotations

from uvit_cli.checkpoint import default_run_dir
from uvit_cli.train.loop import TrainEvent, TrainResult, train
from uvit_cli.train.rundir import read_metrics

__all__ = ["TrainEvent", "TrainResult", "default_run_dir", "read_metrics", "train"]
