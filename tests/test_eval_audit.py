"""Evaluation bookkeeping: loader errors with file:line, one judgement per rubric
item (missing and duplicate ones counted), the per-item audit lines, and the
concurrent, optionally backgrounded stage-end evaluation.

    pytest -q tests/test_eval_audit.py
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from verimed.core.config import load_config
from verimed.core.data import DataError, shipped
from verimed.core.data.healthbench import DEFAULT_HEALTHBENCH, load_healthbench
from verimed.core.eval.audit import check_judgements, item_lines
from verimed.core.eval.stage import StageEvalRunner, evaluate
from verimed.core.types import Judgement, RubricItem

RUBRIC = [RubricItem("a", 5), RubricItem("b", -3), RubricItem("c", 2)]


def _records(n: int = 3) -> list[dict]:
    return [json.loads(line) for line in shipped(DEFAULT_HEALTHBENCH).read_text().splitlines()[:n]]


def _write(tmp_path, records, raw_lines=()) -> str:
    path = tmp_path / "hb.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in records] + list(raw_lines)) + "\n")
    return str(path)


def test_nan_points_fail_with_file_and_line(tmp_path):
    records = _records(2)
    text = json.dumps(records[1]).replace(f'"points": {records[1]["rubrics"][0]["points"]}', '"points": NaN', 1)
    path = _write(tmp_path, records[:1], [text])
    with pytest.raises(DataError, match=r"hb\.jsonl:2: rubrics\[0\]\.points: expected an integer"):
        load_healthbench(path)


def test_repeated_prompt_id_is_rejected_or_skipped(tmp_path):
    records = _records(3)
    records[2]["prompt_id"] = records[0]["prompt_id"]
    path = _write(tmp_path, records)
    with pytest.raises(DataError, match=r"hb\.jsonl:3: prompt_id: .* repeats line 1"):
        load_healthbench(path)
    examples, report = load_healthbench(path, skip_invalid=True)
    assert len(examples) == 2 and report.skipped == 1


def test_missing_and_duplicate_judgements_are_counted_never_silent():
    given = [Judgement(0, True, raw="r0"), Judgement(0, True, raw="r0'"), Judgement(1, True, raw="x"),
             Judgement(1, False, raw="y")]
    out, missing, duplicates = check_judgements(RUBRIC, given)
    assert (missing, duplicates) == (1, 2)
    assert [j.met for j in out] == [True, None, None] and [j.item_index for j in out] == [0, 1, 2]
    assert out[1].raw == "x | y" and "conflicting" in out[1].explanation
    assert out[2].explanation.startswith("missing") and out[2].attempts == 0
    with pytest.raises(ValueError, match="item 7"):
        check_judgements(RUBRIC, [Judgement(7, True)])


def test_item_lines_keep_the_raw_output_of_every_verdict():
    out, _, _ = check_judgements(RUBRIC, [Judgement(i, i != 1, raw=f"raw-{i}") for i in range(3)])
    lines = [json.loads(line) for line in item_lines("p1", RUBRIC, out)]
    assert [(d["item_index"], d["met"], d["raw"], d["points"]) for d in lines] == [
        (0, True, "raw-0", 5), (1, False, "raw-1", -3), (2, True, "raw-2", 2)]


# ------------------------------------------------------------- stage-end evaluation


class SlowRoles:
    """Fake roles: generation and judging each take ``delay`` seconds."""

    def __init__(self, delay: float):
        self.delay, self.in_flight, self.max_in_flight = delay, 0, 0
        self.tokenizer = SimpleNamespace(apply_chat_template=lambda messages, **kw: [1, 2, 3])
        self.judge = SimpleNamespace(judge=self.grade)

    async def generate(self, uid, ids, n, seed, rollout=None):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        return [SimpleNamespace(text="reply")]

    async def grade(self, messages, response, items):
        await asyncio.sleep(self.delay)
        return [Judgement(i, it.points > 0) for i, it in enumerate(items)]


def test_stage_eval_runs_examples_concurrently_within_its_bound():
    cfg = load_config(None, [])
    examples, _ = load_healthbench()
    pools = SimpleNamespace(eval_healthbench=examples[:12], eval_cases=[])
    roles = SlowRoles(0.05)
    out = asyncio.run(evaluate(roles, cfg, pools, 0, 3, concurrency=4))
    # 4 requests in flight at once (never more): concurrent, within its bound (no wall-clock check:
    # a loaded CI machine must not fail it).
    assert out == {"eval/items_failed": 0.0, "eval/healthbench": 1.0} and roles.max_in_flight == 4


class FlakyJudgeRoles(SlowRoles):
    """The judge raises for the responses to the examples named in ``down``, like a server past its retries."""

    def __init__(self, down: set[str]):
        super().__init__(0.0)
        self.down = down

    async def grade(self, messages, response, items):
        if messages[-1].content in self.down:
            raise ConnectionError("judge server unreachable")
        return await super().grade(messages, response, items)


def test_a_failed_evaluation_item_is_counted_and_the_others_scored(capsys):
    cfg = load_config(None, [])
    examples, _ = load_healthbench()
    pools = SimpleNamespace(eval_healthbench=examples[:3], eval_cases=[])
    out = asyncio.run(evaluate(FlakyJudgeRoles({examples[1].messages[-1].content}), cfg, pools, 0, 3))
    assert out == {"eval/items_failed": 1.0, "eval/healthbench": 1.0}
    assert f"healthbench {examples[1].prompt_id}: ConnectionError" in capsys.readouterr().err
    # every item failed: no score to report, the evaluation itself fails (eval/failed)
    every = {ex.messages[-1].content for ex in examples[:3]}
    with pytest.raises(RuntimeError, match="every one of the 3 evaluation items failed"):
        asyncio.run(evaluate(FlakyJudgeRoles(every), cfg, pools, 0, 3))


def test_background_runner_reports_when_ready_and_blocking_runner_waits():
    async def scenario(background: bool):
        runner = StageEvalRunner(background)
        gate = asyncio.Event()

        async def ev():
            await gate.wait()
            return {"eval/healthbench": 0.5}

        task = asyncio.create_task(runner.at_stage_end(ev, version=3))
        await asyncio.sleep(0.01)
        early = task.done() and task.result()
        gate.set()
        first = await task
        await asyncio.sleep(0)
        return early, first, runner.ready(), await runner.drain()

    early, first, ready, tail = asyncio.run(scenario(background=True))
    assert early == {} and first == {} and ready == {"eval/healthbench": 0.5, "eval/started_at_version": 3.0}
    assert tail == {}
    early, first, ready, tail = asyncio.run(scenario(background=False))
    assert early is False and first == {"eval/healthbench": 0.5, "eval/started_at_version": 3.0} and ready == {}


def test_a_failed_evaluation_is_reported_not_raised():
    async def broken():
        raise RuntimeError("judge down")

    assert asyncio.run(StageEvalRunner().at_stage_end(broken, 2)) == {"eval/failed": 1.0,
                                                                    "eval/started_at_version": 2.0}


def test_stage_eval_keys_are_read():
    cfg = load_config(None, ["stage_eval.background=true", "stage_eval.concurrency=3"])
    assert StageEvalRunner(cfg.stage_eval.background).background and cfg.stage_eval.concurrency == 3
