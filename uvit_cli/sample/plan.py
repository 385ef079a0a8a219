"""The plan of a `uvit sample` request: which condition (prompt, class, label protocol or none) image i takes,
held per condition and never per image, so memory does not grow with --n."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvit_cli.config import LabelProtocol, Preset
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.sample.conditions import LABEL_PROTOCOLS, class_label, valid_classes


@dataclass(frozen=True)
class Plan:
    """Condition-major: image c * n + j is the j-th image of condition c (`{"prompt": p}`, `{"class": k}`, or
    `{}` for an unconditional model). With a `label_protocol` (--classes) there are no listed conditions: the
    `n` images each take the class `class_label` gives their index among the `num_classes` real classes.
    O(conditions) memory whatever `n` is."""

    conditions: tuple[dict[str, Any], ...]
    n: int
    label_protocol: LabelProtocol | None = None
    num_classes: int = 0
    seed: int = 0  # the labels' seed ("random" protocol)

    def __len__(self) -> int:
        return self.n if self.label_protocol else len(self.conditions) * self.n

    def condition(self, index: int) -> dict[str, Any]:
        if self.label_protocol:
            k = class_label(self.label_protocol, self.seed, self.num_classes, index)
            return {"class": k, "label_protocol": self.label_protocol}
        return self.conditions[index // self.n]

    def widest(self) -> dict[str, Any]:
        """The condition with the longest record (the disk estimate)."""
        if self.label_protocol:
            return {"class": self.num_classes - 1, "label_protocol": self.label_protocol}
        return max(self.conditions, key=lambda c: len(str(c.get("prompt", ""))))


class ByCondition(Mapping[int, int]):
    """Image index -> `per_condition[index // n]`: a per-image view of per-condition values (labels, context
    rows)."""

    def __init__(self, per_condition: Sequence[int], n: int) -> None:
        self.per_condition, self.n = per_condition, n

    def __getitem__(self, index: int) -> int:
        return self.per_condition[index // self.n]

    def __len__(self) -> int:
        return len(self.per_condition) * self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))


def check_labels(classes: Sequence[int], label_protocol: str | None) -> None:
    """--classes is a known protocol and excludes --class (checked before the model loads)."""
    if label_protocol is None:
        return
    if label_protocol not in LABEL_PROTOCOLS:
        raise ConfigError(
            f"--classes {label_protocol}: unknown label protocol (choose one of {', '.join(LABEL_PROTOCOLS)})"
        )
    if classes:
        raise ConfigError(
            f"--classes {label_protocol} and --class exclude each other: --classes labels every image by its "
            "index (--n is the total), --class makes --n images of each class given; pass one of them"
        )


def make_plan(
    preset: Preset,
    prompts: Sequence[str],
    classes: Sequence[int],
    n: int,
    label_protocol: LabelProtocol | None = None,
    seed: int = 0,
) -> Plan:
    cond = preset.model.conditioning
    if label_protocol is not None and cond != "class":
        kind = "text-conditional: use --prompt" if cond == "text" else "unconditional: drop it"
        raise ConfigError(
            f"--classes {label_protocol} needs a class-conditional preset; '{preset.name}' is {kind}"
        )
    if cond == "text":
        if classes:
            raise ConfigError(f"preset '{preset.name}' is text-conditional: use --prompt, not --class")
        if not prompts:
            raise ConfigError(
                f"preset '{preset.name}' is text-conditional: pass --prompt TEXT or --prompts-file"
            )
        return Plan(tuple({"prompt": p} for p in prompts), n)
    if cond == "class":
        if prompts:
            raise ConfigError(f"preset '{preset.name}' is class-conditional: use --class N, not --prompt")
        ok = valid_classes(preset.model.num_classes, preset.train.p_uncond)
        if label_protocol is not None:
            return Plan((), n, label_protocol, len(ok), seed)
        if not classes:
            raise ConfigError(
                f"preset '{preset.name}' is class-conditional: pass --class N (repeatable), or --classes "
                "random|balanced to label --n images by their index (FID sets)"
            )
        for c in classes:
            if c not in ok:
                null = (
                    f"; {preset.model.num_classes - 1} is the null class used for guidance"
                    if preset.train.p_uncond > 0
                    else ""
                )
                raise ConfigError(f"unknown class {c} for '{preset.name}' (valid: 0..{ok[-1]}{null})")
        return Plan(tuple({"class": int(c)} for c in classes), n)
    if prompts or classes:
        raise ConfigError(f"preset '{preset.name}' is unconditional: drop --prompt/--class")
    return Plan(({},), n)


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
