"""The data a run draws from: per-stage training pools by source, and the held-out evaluation split.

    pools = DataPools.load(cfg, stages)        # training pools + held-out split
    item = pools.item(draw)                    # what a schedule Draw points at
"""
from __future__ import annotations

import sys
from typing import Any

import msgspec
import numpy as np

from verimed.core.config import StageConfig
from verimed.core.data.cases import load_cases
from verimed.core.data.healthbench import load_healthbench
from verimed.core.data.mcq import load_mcq
from verimed.core.tasks.schedule import Draw


class DataPools(msgspec.Struct):
    """Per-stage training pools by source, and the held-out evaluation items."""

    stages: list[dict[str, list[Any]]]
    eval_healthbench: list[Any]
    eval_cases: list[Any]

    @classmethod
    def load(cls, cfg: Any, stages: list[StageConfig]) -> "DataPools":
        skip = cfg.data.skip_invalid
        cases, report = load_cases(cfg.data.cases_path, skip)
        hb, hb_report = load_healthbench(cfg.data.healthbench_path, skip)
        for r in (report, hb_report):
            if r.skipped:
                print(f"verimed: skipped {r.skipped} invalid records in {r.path} (first: {r.errors[0]})", file=sys.stderr)
        hb_train, hb_eval = split_heldout(len(hb), cfg.stage_eval.healthbench, cfg.run.seed)
        case_train, case_eval = split_heldout(len(cases), cfg.stage_eval.consultations, cfg.run.seed + 1)
        base = {"cases": [cases[i] for i in case_train], "healthbench": [hb[i] for i in hb_train]}
        pools = []
        for st in stages:
            pool = dict(base)
            if st.data.mcq_path:
                pool["mcq"] = load_mcq(st.data.mcq_path, skip)[0]
            if st.data.user_path:
                pool["user"] = load_healthbench(st.data.user_path, skip)[0]
            pools.append(pool)
        return cls(stages=pools, eval_healthbench=[hb[i] for i in hb_eval], eval_cases=[cases[i] for i in case_eval])

    def sizes(self) -> list[dict[str, int]]:
        return [{source: len(items) for source, items in pool.items()} for pool in self.stages]

    def item(self, draw: Draw) -> Any:
        return self.stages[draw.stage][draw.source][draw.item]


def split_heldout(size: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, held-out indices)``: a seeded split that keeps >= 1 training item."""
    if size < 1:
        raise ValueError("cannot split an empty dataset")
    n_eval = min(n_eval, size - 1)
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(size)
    return sorted(int(i) for i in perm[n_eval:]), sorted(int(i) for i in perm[:n_eval])
