"""The exactly-once check of a run's files (verimed/core/train/ledger_check.py), on hand-made runs.

Each case writes a ledger and a real checkpoint (the controller's own writers) the way a
faulty controller would leave them, and expects the check to name the fault.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from verimed.core.rl.staleness import LedgerState
from verimed.core.tasks.schedule import ScheduleState
from verimed.core.train.checkpoint import ControllerState, atomic_checkpoint_dir, save_controller_state
from verimed.core.train.ledger_check import check_exactly_once, draw_of


def group(draw: int, g: int = 0, n: int = 2) -> list[str]:
    return [f"{draw}/{g}/{s}" for s in range(n)]


def make_run(tmp_path: Path, lines: list[dict], draws: int, version: int, in_flight=(), buffered=()) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "ledger.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    state = ControllerState(version=version, schedule=ScheduleState(step=version, draws=draws, stage_draws=[draws]),
                            ledger=LedgerState(consumed=[]), in_flight=[(d, 0, "cases", d) for d in in_flight],
                            buffered_draws=[(d, 0, "cases", d) for d in buffered])
    with atomic_checkpoint_dir(run, version) as tmp:
        save_controller_state(tmp, state)
    return run


def step(k: int, *draws: int, **dropped: list[str]) -> dict:
    return {"step": k, "consumed": [u for d in draws for u in group(d)], "dropped": dropped}


def test_a_clean_async_run_with_drops_reruns_and_pending_draws_is_ok(tmp_path):
    lines = [step(1, 0, 1, filtered=["2/0/0"]),
             step(2, 4, 3, stale_dropped=["5/0/0"]),  # draw 5 went stale: it runs again
             {"checkpoint": 2, "dropped": {"prompt_too_long": ["6/0"]}},
             ]
    report = check_exactly_once(make_run(tmp_path, lines, draws=9, version=2, in_flight=[5, 7], buffered=[8]))
    assert report.ok, report.problems
    assert (report.steps, report.consumed, report.draws, report.pending) == (2, 8, 9, 3)
    assert report.dropped == {"filtered": 1, "prompt_too_long": 1} and report.reruns == {"stale_dropped": 1}
    assert "exactly-once: ok" in report.summary()


def test_a_sample_trained_twice_is_named(tmp_path):
    report = check_exactly_once(make_run(tmp_path, [step(1, 0, 1), step(2, 2, 1)], draws=3, version=2))
    assert not report.ok and report.duplicates == group(1)
    assert "trained twice" in report.problems[0]


def test_a_draw_nobody_accounts_for_is_a_gap(tmp_path):
    # Draw 2 failed and was skipped without a ledger record: the silent loss the check exists for.
    report = check_exactly_once(make_run(tmp_path, [step(1, 0, 1), step(2, 3, 4)], draws=5, version=2))
    assert not report.ok and report.gaps == [2]
    # A stale drop is not an account: its draw must run again (or be pending).
    report = check_exactly_once(make_run(tmp_path, [step(1, 0, 1, stale_dropped=["2/0/0"])], draws=3, version=1))
    assert report.gaps == [2]


def test_a_resumed_run_redoes_steps_and_the_last_line_of_a_step_wins(tmp_path):
    # Crash after step 3's line, resume from the step-2 checkpoint: step 3 is trained again on other draws.
    lines = [step(1, 0), step(2, 1), step(3, 2), step(3, 3), step(4, 2)]
    report = check_exactly_once(make_run(tmp_path, lines, draws=4, version=4))
    assert report.ok, report.problems
    # Without last-line-wins draw 2 would look trained twice; with a first-line-wins reading, draw 3 a gap.


def test_missing_steps_a_stale_checkpoint_and_draws_beyond_the_schedule(tmp_path):
    report = check_exactly_once(make_run(tmp_path, [step(1, 0), step(3, 1)], draws=2, version=3))
    assert any("without a hole" in p for p in report.problems)
    report = check_exactly_once(make_run(tmp_path, [step(1, 0), step(2, 1)], draws=2, version=1))
    assert any("did not end on a checkpoint" in p for p in report.problems)
    report = check_exactly_once(make_run(tmp_path, [step(1, 0, 5)], draws=2, version=1))
    assert any("the schedule made only 2" in p for p in report.problems)


def test_careless_files_get_a_clear_error(tmp_path):
    assert "missing" in check_exactly_once(tmp_path).problems[0]
    run = make_run(tmp_path, [step(1, 0)], draws=1, version=1)
    (run / "ledger.jsonl").write_text(json.dumps(step(1, 0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"ledger.jsonl:2: not JSON"):
        check_exactly_once(run)
    (run / "ledger.jsonl").write_text(json.dumps({"step": "1", "consumed": []}) + "\n")
    with pytest.raises(ValueError, match=r"ledger.jsonl:1: expected an object with an integer 'step'"):
        check_exactly_once(run)
    (run / "ledger.jsonl").write_text(json.dumps(step(1, 0, mystery=["0/0/0"])) + "\n")
    assert any("unknown drop reason 'mystery'" in p for p in check_exactly_once(run).problems)
    with pytest.raises(ValueError, match="non-negative integer draw"):
        draw_of("abc/0/1")


def test_the_ledger_command_exits_by_the_verdict(tmp_path, capsys):
    from verimed.cli import main

    run = make_run(tmp_path, [step(1, 0, 1)], draws=2, version=1)
    assert main(["ledger", str(run)]) == 0 and "exactly-once: ok" in capsys.readouterr().out
    run = make_run(tmp_path, [step(1, 0, 1)], draws=3, version=1)
    assert main(["ledger", str(run)]) == 1 and "neither trained" in capsys.readouterr().out
