"""A run's state beside its weights: what `state.pt` holds (optimiser, schedule, scaler, each rank's RNG
states, the data position), how it is captured at a save, and how a run resumes from its newest readable
checkpoint, bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uvit_cli import checkpoint as ck
from uvit_cli import dist
from uvit_cli.config import TrainConfig
from uvit_cli.errors import CheckpointError
from uvit_cli.fileio import sha256_file, write_json_atomic
from uvit_cli.train.step import StepState, warmup_factor

# --------------------------------------------------------------------------------------------------
# RNG states of a process (stored per rank in state.pt; tensors and plain values only)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(s["python"])


# --------------------------------------------------------------------------------------------------
# Save and resume


def capture(st: StepState, step: int, epoch: int, batch_in_epoch: int, global_batch: int) -> dict[str, Any]:
    """`state.pt` of this step (a collective: every rank's RNG states are gathered)."""
    state = {
        "step": step,
        "optimizer": st.opt.state_dict(),
        "lr_scheduler": st.sched.state_dict(),
        "rng": dist.all_gather_object(rng_state()),
        "data": {"epoch": epoch, "batch": batch_in_epoch, "global_batch": global_batch},
        "world_size": dist.world_size(),
    }
    if st.scaler.is_enabled():
        state["grad_scaler"] = st.scaler.state_dict()
    return state


@dataclass
class Resumed:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already trained on, at this run's global batch
    step_dir: Path | None = None  # the checkpoint resumed from; None for a new run


def resume(
    run_dir: Path,
    tc: TrainConfig,
    model: nn.Module,
    ema: nn.Module,
    st: StepState,
    global_batch: int,
    warn: Callable[[str], None],
) -> Resumed:
    """Load the newest readable checkpoint of `run_dir` into the model, EMA and step state (falling back to
    older ones with a warning); `tc`'s lr, betas and weight decay win over the stored ones."""
    for _, step_dir in reversed(ck.list_checkpoints(run_dir)):
        try:
            model_sd, ema_sd, saved = ck.read_checkpoint(step_dir)
        except CheckpointError as e:
            warn(f"checkpoint {step_dir.name} is unreadable ({e}); trying the previous one")
            continue
        # The step the state records is the step; a directory's name is only a label (one renamed to a
        # higher number would otherwise be taken for the newest on every rerun, which then redoes it).
        if int(saved["step"]) != int(step_dir.name):
            warn(
                f"{step_dir} holds step {int(saved['step'])} (recorded in its {ck.STATE_FILE}), not the step "
                f"its name says; resuming from step {int(saved['step'])} (rename it to "
                f"{ck.step_dir_name(int(saved['step']))} to silence this)"
            )
        ck.check_state_dict(model.state_dict(), model_sd, str(step_dir / ck.MODEL_FILE))
        ck.check_state_dict(ema.state_dict(), ema_sd, str(step_dir / ck.EMA_FILE))
        model.load_state_dict(model_sd)
        ema.load_state_dict(ema_sd)
        st.opt.load_state_dict(saved["optimizer"])
        st.sched.load_state_dict(saved["lr_scheduler"])
        # The preset's recipe wins over the one stored with the state (they differ only under --force).
        st.sched.base_lrs = [tc.lr for _ in st.opt.param_groups]
        for g in st.opt.param_groups:
            g.update(betas=(float(tc.betas[0]), float(tc.betas[1])), weight_decay=tc.weight_decay)
            g["lr"] = tc.lr * warmup_factor(st.sched.last_epoch, tc.warmup_steps)
        if "grad_scaler" in saved and st.scaler.is_enabled():
            st.scaler.load_state_dict(saved["grad_scaler"])
        rngs = saved.get("rng", [])
        if len(rngs) == dist.world_size():
            set_rng_state(rngs[dist.rank()])
        pos = saved["data"]
        batch = int(pos["batch"]) * int(pos["global_batch"]) // global_batch
        return Resumed(int(saved["step"]), int(pos["epoch"]), batch, step_dir)
    if ck.list_checkpoints(run_dir):
        raise CheckpointError(
            f"{run_dir / ck.CKPTS}: no readable checkpoint; move that folder aside to start over"
        )
    return Resumed()


INIT_RECORD = "init.json"  # in the run dir: the weights a fine-tuning run started from


def initialise(
    run_dir: Path, source: str | Path, model: nn.Module, ema: nn.Module, write: bool
) -> dict[str, Any]:
    """Start a new run from the weights of `source` (our checkpoint file, a step or run directory, or the
    official nnet_ema.pth / nnet.pth): loaded strictly into the model and the EMA; the optimiser and the
    schedule stay fresh. The source and its sha256 are recorded in `run_dir/init.json` (by rank 0)."""
    file = ck.find_checkpoint(source, ema=True)
    sd, _, meta = ck.load_weights(file)
    ck.check_state_dict(model.state_dict(), sd, f"--init {file}")
    model.load_state_dict(sd)
    ema.load_state_dict(sd)
    record = {
        "path": str(file),
        "sha256": sha256_file(file),
        "format": meta.get("format", ck.FORMAT),
        "weights": meta.get("weights", "ema"),
    }
    if write:
        write_json_atomic(run_dir / INIT_RECORD, record, indent=2)
    return record


def check_init(run_dir: Path, source: str | Path) -> bool:
    """Whether `--init source` on `run_dir` resumes (True: the run started from this same file and has
    checkpoints) or starts the run (False); a run dir with checkpoints of another start is refused."""
    if not ck.list_checkpoints(run_dir):
        return False
    file = ck.find_checkpoint(source, ema=True)
    try:
        recorded = json.loads((run_dir / INIT_RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("sha256") != sha256_file(file):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints of a run that did not start from {file}: it resumes "
            "without --init; pass another --run-dir to fine-tune"
        )
    return True
