"""Zipf-distributed key indices from a fixed seed: the same sequence on every run and machine."""

from __future__ import annotations

import itertools
import random

__all__ = ["SEED", "zipf_indices"]

#: The seed every benchmark uses (worker *i* draws from ``SEED + i``).
SEED = 20_240_601


def zipf_indices(n: int, count: int, *, s: float = 1.0, seed: int = SEED) -> list[int]:
    """*count* indices in ``range(n)``; index *k* is drawn with probability proportional to
    ``1 / (k + 1) ** s``, so index 0 is the hottest key. Equal arguments give equal lists."""
    if n < 1 or count < 0 or s <= 0:
        raise ValueError(f"zipf_indices needs n >= 1, count >= 0, s > 0; got {n}, {count}, {s}")
    cumulative = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))
    return random.Random(seed).choices(range(n), cum_weights=cumulative, k=count)
