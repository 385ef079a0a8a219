"""Deterministic picks from (seed, epoch, index): no RNG state, the same on every rank and every resume."""

from __future__ import annotations

M64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def choose(seed: int, epoch: int, index: int, n: int) -> int:
    """A deterministic pick in [0, n) from (seed, epoch, index): no RNG state, same on every rank."""
    h = splitmix64(seed & M64)
    h = splitmix64(h ^ (epoch & M64))
    h = splitmix64(h ^ (index & M64))
    return h % n
