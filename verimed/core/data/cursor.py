"""A resumable dataset cursor: a seeded permutation per epoch, walked one item at a time.

Draw k (0-based, over the whole run) is item ``perm_e[k % N]`` of epoch
``e = k // N``; the state is just ``k``, so a checkpoint stores one integer
and a resumed run draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import numpy as np


class Cursor:
    def __init__(self, size: int, seed: int, shuffle: bool = True, position: int = 0):
        if size < 1:
            raise ValueError("dataset is empty: nothing to draw")
        self.size, self.seed, self.shuffle, self.position = size, seed, shuffle, position
        self._epoch, self._perm = -1, np.arange(size)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size) if self.shuffle else np.arange(self.size)
        return self._perm

    def item(self, draw: int) -> int:
        """Dataset item of global draw number ``draw``."""
        return int(self._order(draw // self.size)[draw % self.size])

    def next(self) -> tuple[int, int]:
        """``(draw number, dataset item)`` and advance."""
        draw = self.position
        self.position += 1
        return draw, self.item(draw)
