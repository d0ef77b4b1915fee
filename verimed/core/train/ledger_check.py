"""Exactly-once check of a finished run, from its files alone: ``ledger.jsonl`` and the newest checkpoint.

    report = check_exactly_once(Path("runs/default"))
    assert report.ok, report.problems

Written apart from the controller's bookkeeping (``core/rl/staleness.py:Ledger``,
``actors/controller.py``): it reads only what a run leaves on disk, so a bug in
that bookkeeping cannot hide itself here.

- **No duplicate**: a sample uid ("<draw>/<group>/<sample>") is trained at most once.
  ``ledger.jsonl`` has one line per learner step; a resumed run re-does the steps after
  its checkpoint and appends them again, so the last line of a step wins.
- **No gap**: every draw the schedule made (0 … ``schedule.draws`` − 1 of the newest
  checkpoint) is accounted for: trained, finally dropped (a reason in ``FINAL_DROPS``,
  recorded in any line's ``dropped``), or still in flight / buffered in the checkpoint
  (a resumed run plays those). Stale drops are not final (their draws run again), so
  they count as re-runs, not as accounting.
- **Steps**: the step lines are 1 … N without a hole, and the checkpoint is at step N.

Lines: ``{"step": k, "consumed": [uid, …], "dropped": {reason: [uid, …]}}`` per learner step, and
``{"checkpoint": k, "dropped": {…}}`` for the drops between step k's line and its checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from verimed.core.train.checkpoint import CONTROLLER_FILE, latest_checkpoint

LEDGER_FILE = "ledger.jsonl"
# Drop reasons after which a draw never runs again (the controller's ledger-line keys).
FINAL_DROPS = ("filtered", "prompt_too_long", "failed", "stage_ended", "groups_wrong_stage")
# Drop reasons after which the draw runs again (or was a re-run twin of a trained group).
RERUN_DROPS = ("stale_dropped", "duplicates_dropped")


@dataclass
class LedgerReport:
    ok: bool
    problems: list[str]
    steps: int = 0
    consumed: int = 0  # sample uids trained on
    draws: int = 0  # draws the schedule made
    duplicates: list[str] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)  # draw numbers nowhere accounted for
    dropped: dict[str, int] = field(default_factory=dict)  # final drops by reason (groups)
    reruns: dict[str, int] = field(default_factory=dict)  # non-final drops by reason (groups)
    pending: int = 0  # draws in flight or buffered at the checkpoint

    def summary(self) -> str:
        head = "exactly-once: ok" if self.ok else f"exactly-once: {len(self.problems)} problem(s)"
        return (f"{head}; {self.steps} steps, {self.consumed} samples trained, {self.draws} draws "
                f"(dropped {self.dropped or 0}, re-run {self.reruns or 0}, pending {self.pending})"
                + "".join(f"\n  - {p}" for p in self.problems))


def draw_of(uid: str) -> int:
    """The draw number of a uid or group prefix ("12/0/3", "12/0" -> 12)."""
    head = uid.split("/", 1)[0]
    if not head.isdigit():
        raise ValueError(f"uid {uid!r}: expected '<draw>/<group>[/<sample>]' with a non-negative integer draw")
    return int(head)


def read_ledger(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        drop_only = isinstance(row, dict) and isinstance(row.get("checkpoint"), int)
        if not drop_only and (not isinstance(row, dict) or not isinstance(row.get("step"), int)
                              or not isinstance(row.get("consumed"), list)):
            raise ValueError(f"{path}:{n}: expected an object with an integer 'step' and a list 'consumed' "
                             "(or a drop-only line with an integer 'checkpoint')")
        if not isinstance(row.get("dropped", {}), dict):
            raise ValueError(f"{path}:{n}: 'dropped' must map a reason to a list of uids")
        rows.append(row)
    return rows


def check_exactly_once(run_dir: Path) -> LedgerReport:
    run_dir = Path(run_dir)
    ledger = run_dir / LEDGER_FILE
    if not ledger.is_file():
        return LedgerReport(False, [f"{ledger}: missing (the controller writes a line per learner step)"])
    rows = read_ledger(ledger)
    by_step = {row["step"]: row for row in rows if "step" in row}  # the last line of a step wins
    problems: list[str] = []
    steps = sorted(by_step)
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"step lines are {steps[:3]}…{steps[-3:]}, expected 1…{len(steps)} without a hole")

    seen: set[str] = set()
    duplicates: list[str] = []
    for step in steps:
        for uid in by_step[step]["consumed"]:
            if uid in seen:
                duplicates.append(uid)
            seen.add(uid)
    if duplicates:
        problems.append(f"{len(duplicates)} sample(s) trained twice, e.g. {duplicates[:5]}")

    accounted = {draw_of(uid) for uid in seen}
    dropped: dict[str, int] = {}
    reruns: dict[str, int] = {}
    for row in rows:  # drops of every line: a superseded line's drop still happened
        for reason, uids in (row.get("dropped") or {}).items():
            if reason in FINAL_DROPS:
                accounted.update(draw_of(u) for u in uids)
            if reason in FINAL_DROPS + RERUN_DROPS:
                if uids:  # the controller writes every reason it checks, most with no uid
                    counts = dropped if reason in FINAL_DROPS else reruns
                    counts[reason] = counts.get(reason, 0) + len(uids)
            else:
                problems.append(f"{ledger}: unknown drop reason {reason!r} (known: {', '.join(FINAL_DROPS + RERUN_DROPS)})")

    report = LedgerReport(False, problems, steps=len(steps), consumed=len(seen), duplicates=duplicates,
                          dropped=dropped, reruns=reruns)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        problems.append(f"{run_dir}: no checkpoint: the draws made are unknown, gaps cannot be checked")
        return report
    state = msgspec.msgpack.decode((ckpt / CONTROLLER_FILE).read_bytes())
    if steps and state["version"] != steps[-1]:
        problems.append(f"newest checkpoint {ckpt.name} is at step {state['version']}, the ledger at {steps[-1]}: "
                        "the run did not end on a checkpoint")
    pending = {int(d[0]) for d in state.get("in_flight", [])} | {int(d[0]) for d in state.get("buffered_draws", [])}
    report.draws, report.pending = int(state["schedule"]["draws"]), len(pending)
    accounted |= pending
    beyond = sorted(d for d in accounted if d >= report.draws)
    if beyond:
        problems.append(f"draws {beyond[:5]} are in the ledger but the schedule made only {report.draws}")
    report.gaps = [d for d in range(report.draws) if d not in accounted]
    if report.gaps:
        problems.append(f"{len(report.gaps)} draw(s) neither trained, dropped nor pending, e.g. {report.gaps[:10]}")
    report.ok = not problems
    return report
