"""Deterministic picks from (seed, epoch, index): no RNG state, the same on every rank and every resume."""

from __future__ import annotations

import numpy as np

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


def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    """`splitmix64` over a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64, as the masks do)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def choose_many(seed: int, epochs: np.ndarray, indices: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`choose(seed, epochs[k], indices[k], counts[k])` for every k, in one pass (int64 picks)."""
    h_seed = splitmix64(seed & M64)
    epochs = np.asarray(epochs, dtype=np.int64)
    uniq, where = np.unique(epochs, return_inverse=True)
    h_epoch = np.array([splitmix64(h_seed ^ (int(e) & M64)) for e in uniq], dtype=np.uint64)[where]
    h = _splitmix64_np(h_epoch ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    return (h % np.asarray(counts, dtype=np.uint64)).astype(np.int64)
