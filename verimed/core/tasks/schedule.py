"""The step schedule of a staged run: which stage a learner step belongs to, and what it draws.

    index, step_in_stage = stage_at(cfg.stages, version)               # version: steps completed
    schedule = Schedule(cfg.stages, {"cases": 170, "healthbench": 50}, cfg.run.seed)
    draw = schedule.next_draw(index)                                    # Draw(draw, stage, source, item)
    state = schedule.state(version)   # checkpoint it; Schedule(..., state=state) resumes mid-stage

Each stage draws from its data mix (:class:`MixSampler`, deterministic and
resumable from one integer); a global draw counter numbers every draw of the
run (the sample uid prefix).
"""
from __future__ import annotations

import zlib
from typing import NamedTuple, Sequence

import msgspec
import numpy as np

from verimed.core.config.stages import StageConfig
from verimed.core.data.cursor import Cursor


def stage_at(stages: Sequence[StageConfig], step: int) -> tuple[int, int]:
    """``(stage index, step in stage)`` of the learner step that follows ``step`` completed steps.

    ``step`` is 0-based (= the policy version before the update); with stages
    of 3 and 2 steps, steps 0,1,2 -> (0,0),(0,1),(0,2) and 3,4 -> (1,0),(1,1).
    """
    if not stages:
        raise ValueError("no stages configured")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps:
            return i, step - start
        start += st.steps
    raise ValueError(f"step {step} is past the last stage (the stages have {start} steps)")


class Draw(NamedTuple):
    draw: int  # global draw number (the sample uid prefix; unique over the whole run)
    stage: int  # stage index the work belongs to
    source: str  # "cases", "healthbench", "mcq", "user"
    item: int  # index into that source's training pool


class MixSampler:
    """Deterministic weighted draws over several sources, resumable from one integer.

    Draw k picks a source with probabilities ``weights`` (block b of 1024 draws
    from ``rng([seed, b])``), then that source's ``n``-th item, where ``n`` counts
    earlier draws of the same source, from a per-source shuffled :class:`Cursor`.
    The state is ``position``: a restored sampler draws exactly what the
    uninterrupted one would have.
    """

    BLOCK = 1024

    def __init__(self, weights: dict[str, float], sizes: dict[str, int], seed: int, shuffle: bool = True,
                 position: int = 0):
        self.sources = sorted(s for s, w in weights.items() if w > 0)
        if not self.sources:
            raise ValueError("a data mix needs at least one source with weight > 0")
        missing = [s for s in self.sources if sizes.get(s, 0) < 1]
        if missing:
            raise ValueError(f"data mix source(s) {', '.join(missing)} have no items")
        p = np.asarray([weights[s] for s in self.sources], dtype=np.float64)
        self.probs = p / p.sum()
        self.seed, self.position = seed, position
        self.cursors = {s: Cursor(sizes[s], seed * 1_000_003 + zlib.crc32(s.encode()), shuffle) for s in self.sources}
        self._blocks: list[np.ndarray] = []  # source index per draw, one array per block
        self._before: list[np.ndarray] = []  # per-source counts before each block

    def _block(self, b: int) -> np.ndarray:
        while len(self._blocks) <= b:
            k = len(self._blocks)
            rng = np.random.default_rng([self.seed, k])
            self._before.append(self._before[-1] + np.bincount(self._blocks[-1], minlength=len(self.sources))
                                if self._blocks else np.zeros(len(self.sources), np.int64))
            self._blocks.append(rng.choice(len(self.sources), size=self.BLOCK, p=self.probs))
        return self._blocks[b]

    def at(self, k: int) -> tuple[str, int]:
        """``(source, item)`` of draw ``k`` (0-based) without moving the position."""
        b, r = divmod(k, self.BLOCK)
        block = self._block(b)
        s = int(block[r])
        n = int(self._before[b][s] + np.count_nonzero(block[:r] == s))
        return self.sources[s], self.cursors[self.sources[s]].item(n)

    def next(self) -> tuple[str, int]:
        out = self.at(self.position)
        self.position += 1
        return out


class ScheduleState(msgspec.Struct, frozen=True):
    """What a checkpoint stores of the schedule (with the learner's step)."""

    step: int  # learner steps completed (= policy version)
    draws: int  # global draws made so far (next uid number)
    stage_draws: list[int]  # draws made by each stage's sampler


class Schedule:
    """The stages' samplers and the global draw counter, resumable from a :class:`ScheduleState`.

    ``sizes``: training-pool size per source, one dict for all stages or one per stage
    (stages with their own ``mcq_path`` / ``user_path`` have their own pools).
    """

    def __init__(self, stages: Sequence[StageConfig], sizes: dict[str, int] | Sequence[dict[str, int]], seed: int,
                 shuffle: bool = True, state: ScheduleState | None = None):
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        self.stages = list(stages)
        positions = state.stage_draws if state is not None else [0] * len(stages)
        if len(positions) != len(stages):
            raise ValueError(f"checkpointed schedule has {len(positions)} stages, the config has {len(stages)}")
        per_stage = [sizes] * len(stages) if isinstance(sizes, dict) else list(sizes)
        if len(per_stage) != len(stages):
            raise ValueError(f"{len(per_stage)} size dicts for {len(stages)} stages")
        self.samplers = [MixSampler(st.data.weights(st.kind), per_stage[i], seed + 7919 * i, shuffle, positions[i])
                         for i, st in enumerate(stages)]
        self.draws = state.draws if state is not None else 0

    def stage_at(self, step: int) -> tuple[int, int]:
        return stage_at(self.stages, step)

    def next_draw(self, stage: int) -> Draw:
        source, item = self.samplers[stage].next()
        self.draws += 1
        return Draw(self.draws - 1, stage, source, item)

    def state(self, step: int) -> ScheduleState:
        return ScheduleState(step=step, draws=self.draws, stage_draws=[s.position for s in self.samplers])
