"""The held-out evaluation at the end of each training stage.

    metrics = await evaluate(roles, stage_cfg, pools, stage_index, max_slices, concurrency=8)
    runner = StageEvalRunner(background=cfg.stage_eval.background)
    metrics.update(await runner.at_stage_end(lambda: evaluate(...), version))  # {} when backgrounded
    metrics.update(runner.ready())    # every step: metrics of evaluations that finished since
    tail = await runner.drain()       # at the end of the run

HealthBench examples (own rubrics, one sample each) and simulator
consultations on cases that training never draws (:class:`verimed.core.tasks.pools.DataPools`).
Examples and consultations run concurrently (``concurrency`` at a time), so an
evaluation costs about its slowest item, not the sum. With ``background`` the
evaluation runs beside training: its metrics are logged with the first step
after it finishes (``eval/started_at_version`` says which policy it began on;
turns generated after the next weight sync come from newer weights, which is
why blocking is the default).
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, Callable

import numpy as np

from verimed.core.rubrics.scoring import training_reward
from verimed.core.tasks.dialogue import consultation_score, run_dialogue
from verimed.core.tasks.groups import Roles, prompt_ids
from verimed.core.tasks.pools import DataPools

# Draw numbers of held-out evaluation episodes: far above any training draw, so
# their simulator sessions and uids never collide with training ones.
EVAL_DRAW_BASE = 10**9


async def evaluate(roles: Roles, stage_cfg: Any, pools: DataPools, stage_index: int, max_slices: int,
                   concurrency: int = 8) -> dict[str, float]:
    """Held-out scores with the current policy: HealthBench (own rubrics, one sample each,
    clipped HealthBench score) and simulator consultations (mean rubric score of the slices).

    An item whose generation, simulator, rubric or judge call raised (a server down past its
    retries) is left out of the means and counted in ``eval/items_failed``, its cause on stderr:
    one unreachable reply must not void the other items' scores. When every item failed the
    evaluation raises (``StageEvalRunner`` reports ``eval/failed``)."""
    base = EVAL_DRAW_BASE + stage_index * 100_000
    room = stage_cfg.model.max_model_len - stage_cfg.rollout.max_tokens
    slots = asyncio.Semaphore(concurrency)

    async def healthbench(i: int, ex: Any) -> float | None:
        ids = prompt_ids(roles.tokenizer, ex.messages)
        if len(ids) > room:  # the same examples are skipped at every stage: scores stay comparable
            return None
        async with slots:
            sample = (await roles.generate(f"{base + i}/eval", ids, 1, base + i, rollout=stage_cfg.rollout))[0]
            return training_reward(ex.rubric, await roles.judge.judge(ex.messages, sample.text, ex.rubric))

    async def consultation(i: int, case: Any) -> float:
        async with slots:
            results, _ = await run_dialogue(roles, stage_cfg, case, base + 50_000 + i, max_slices=max_slices,
                                            continuation="best", n=1)
            return consultation_score(results)

    failures: list[str] = []

    async def guarded(what: str, item: Awaitable[float | None]) -> float | None:
        try:
            return await item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"verimed: evaluation item failed ({failures[-1]})", file=sys.stderr)
            return None

    hb = await asyncio.gather(*(guarded(f"healthbench {ex.prompt_id}", healthbench(i, ex))
                                for i, ex in enumerate(pools.eval_healthbench)))
    consult = await asyncio.gather(*(guarded(f"consultation {case.case_id}", consultation(i, case))
                                     for i, case in enumerate(pools.eval_cases)))
    n_items = len(pools.eval_healthbench) + len(pools.eval_cases)
    if n_items and len(failures) == n_items:
        raise RuntimeError(f"every one of the {n_items} evaluation items failed; first: {failures[0]}")
    hb_scores = [s for s in hb if s is not None]
    consult_scores = [s for s in consult if s is not None]
    out = {"eval/items_failed": float(len(failures))}
    if hb_scores:
        out["eval/healthbench"] = float(np.mean(hb_scores))
    if consult_scores:
        out["eval/consultation"] = float(np.mean(consult_scores))
    return out


class StageEvalRunner:
    """Runs stage-end evaluations blocking (default) or beside training (``background``).
    A failed evaluation is reported (``eval/failed``) and never stops training."""

    def __init__(self, background: bool = False):
        self.background = background
        self._pending: list[asyncio.Task] = []

    async def at_stage_end(self, run: Callable[[], Awaitable[dict[str, float]]], version: int) -> dict[str, float]:
        task = asyncio.create_task(self._guarded(run, version))
        if self.background:
            self._pending.append(task)
            return {}
        return await task

    def ready(self) -> dict[str, float]:
        """Metrics of the background evaluations that have finished (each reported once)."""
        done = [t for t in self._pending if t.done()]
        self._pending = [t for t in self._pending if not t.done()]
        out: dict[str, float] = {}
        for task in done:
            out.update(task.result())
        return out

    async def drain(self) -> dict[str, float]:
        """Wait for the background evaluations still running (the end of the run)."""
        await asyncio.gather(*self._pending)
        return self.ready()

    @staticmethod
    async def _guarded(run: Callable[[], Awaitable[dict[str, float]]], version: int) -> dict[str, float]:
        try:
            metrics = await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported, counted in the metrics; training goes on
            print(f"verimed: evaluation at version {version} failed ({type(exc).__name__}: {str(exc)[:300]})",
                  file=sys.stderr)
            return {"eval/failed": 1.0, "eval/started_at_version": float(version)}
        return {**metrics, "eval/started_at_version": float(version)}
