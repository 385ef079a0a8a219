"""What a prepare run reports: `Progress` after every batch, `PrepareResult` at the end, and its summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    """Reported after every batch: this rank's images done / to do in `split` (skipped = unreadable)."""

    split: str
    done: int
    total: int
    skipped: int = 0
    shards_written: int = 0
    shards_reused: int = 0

    def note(self) -> str:
        """What a progress bar shows beside the count: images skipped, shards reused."""
        skipped = f"{self.skipped} skipped" if self.skipped else ""
        reused = f"{self.shards_reused} shards reused" if self.shards_reused else ""
        return ", ".join(part for part in (skipped, reused) if part)


ProgressFn = Callable[[Progress], None]


@dataclass
class PrepareResult:
    out: Path
    manifest: dict[str, Any]
    written: dict[str, int] = field(default_factory=dict)  # shards written per split by this rank
    reused: dict[str, int] = field(default_factory=dict)

    def summary(self, seconds: float) -> list[str]:
        """A line per split (items, shards, captions, images skipped) and per encoder, then where it went."""
        lines = []
        for split, entry in self.manifest["splits"].items():
            skipped, shards = len(entry.get("skipped", [])), len(entry.get("shards", []))
            lines.append(
                f"{split}: {entry.get('items', 0)} items in {shards} shard{'s' if shards != 1 else ''}"
                + (f", {entry['captions']} captions" if entry.get("captions") else "")
                + (f", {skipped} unreadable images skipped (listed in manifest.json)" if skipped else "")
            )
        for name, e in self.manifest.get("encoders", {}).items():
            lines.append(f"{name}: {e['path']} sha256 {e['sha256'][:16]}")
        reused = sum(self.reused.values())
        note = f" ({reused} finished shards verified and kept)" if reused else ""
        return [*lines, f"wrote {self.out} in {seconds:.1f} s{note}"]

    def skipped_warnings(self) -> list[str]:
        """A line per split with unreadable images, naming the first three (a named pipe or a broken link
        among the images is seen, not only counted)."""
        lines = []
        for split, entry in self.manifest["splits"].items():
            if skipped := entry.get("skipped", []):
                more = f", and {len(skipped) - 3} more" if len(skipped) > 3 else ""
                named = "; ".join(f"{s.get('key')} ({s.get('reason')})" for s in skipped[:3])
                lines.append(f"{split}: skipped {named}{more}")
        return lines
