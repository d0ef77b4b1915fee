"""Service faults during training: the retry policy of a failed draw, and the fault counters.

A draw whose group fails (a crashed actor, a judge that cannot be reached, any
other error of its generate / judge path) is never skipped silently: it waits
and runs again under :class:`RetryPolicy`, and only after ``max_attempts`` failed
attempts is it dropped — counted, written to ``ledger.jsonl`` as dropped
``"failed"``, and its last error logged. :class:`FaultCounters` records every fault as an
event: per-step counts ``faults/<kind>`` (the step it happened at) and cumulative
``counters/<kind>`` in ``metrics.jsonl`` / W&B, and one line in
``runs/<name>/logs/faults.log`` naming the actor that failed and why.

    policy = RetryPolicy()                     # 0.5 s, 1 s, 2 s, ... capped at 30 s; 10 attempts
    if policy.gives_up(attempts): drop it     # else: await asyncio.sleep(policy.delay_s(attempts))
    faults = FaultCounters(run_dir / "logs" / "faults.log")
    faults.record("judge_unavailable", step=7, draw=12, actor="VerifierActor", cause="...")
    metrics.update(faults.step_metrics())      # once per learner step
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

# Kinds of fault events (counter names). A retried attempt is counted by its cause;
# a draw that exhausted its attempts is also counted as draws_failed.
FAULT_KINDS = ("actor_died", "judge_unavailable", "group_error", "draws_failed")


class RetryPolicy(msgspec.Struct, frozen=True):
    """Capped exponential backoff with a per-draw attempt limit.

    For the n-th failed attempt of a draw (n = 1, 2, ...):

        delay_s(n)   = min(cap_s, base_s * 2**(n - 1))
        gives_up(n)  = n >= max_attempts

    With the defaults (0.5 s, 30 s, 10) a draw waits 0.5, 1, 2, 4, 8, 16, 30, 30, 30 s
    between its 10 attempts: 121.5 s of backoff in all, so a service outage of a
    minute is ridden out, while a deterministic error (a bad item) stops after 10
    attempts instead of looping forever. The delay is spent holding the draw's
    admission slot, so a dead service never becomes a hot retry loop.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 10

    def __post_init__(self):
        if not (self.base_s > 0 and self.cap_s >= self.base_s and self.max_attempts >= 1):
            raise ValueError(f"RetryPolicy: expected base_s > 0, cap_s >= base_s, max_attempts >= 1; got "
                             f"base_s={self.base_s}, cap_s={self.cap_s}, max_attempts={self.max_attempts}")

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (>= 1) before the next one."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 62))

    def gives_up(self, attempt: int) -> bool:
        """Whether a draw that has failed ``attempt`` times is dropped instead of run again."""
        return attempt >= self.max_attempts

    def total_backoff_s(self) -> float:
        """sum of delay_s(n) for n in 1 .. max_attempts - 1: the longest outage a draw survives (plus its attempts)."""
        return sum(self.delay_s(n) for n in range(1, self.max_attempts))


class FaultEvent(msgspec.Struct, frozen=True):
    kind: str  # one of FAULT_KINDS
    step: int  # the learner step in progress when it happened (version + 1)
    draw: int  # the draw whose group failed (-1: none)
    actor: str  # the actor (class or role) that failed, "" when unknown
    cause: str  # one line: the error's cause
    wall_s: float  # time.time() of the event


class FaultCounters:
    """Fault events of a run: counters per step and cumulative, and ``logs/faults.log``.

    ``step_metrics()`` returns, for every kind k in FAULT_KINDS,

        faults/k   = events of kind k since the previous call (the step they happened at)
        counters/k = events of kind k since the run started (a resumed run starts from 0)

    so a zero row is written too and a dashboard plots each kind from step 1.
    """

    def __init__(self, log_path: Path | None = None):
        self.log_path = log_path
        self.total = dict.fromkeys(FAULT_KINDS, 0)
        self.since_step = dict.fromkeys(FAULT_KINDS, 0)
        self.events: list[FaultEvent] = []

    def record(self, kind: str, *, step: int, draw: int = -1, actor: str = "", cause: str = "") -> FaultEvent:
        if kind not in self.total:
            raise ValueError(f"fault kind {kind!r}: expected one of {', '.join(FAULT_KINDS)}")
        event = FaultEvent(kind=kind, step=step, draw=draw, actor=actor, cause=one_line(cause), wall_s=time.time())
        self.total[kind] += 1
        self.since_step[kind] += 1
        self.events.append(event)
        self._append(format_event(event))
        return event

    def note(self, step: int, line: str) -> None:
        """A free-form line (an engine lost or back, a group rebuilt) on stderr and in logs/faults.log, in
        the ``<UTC time> step <s>: <what>`` shape of every line there; the counters are the caller's."""
        print(f"verimed: step {step}: {line}", file=sys.stderr, flush=True)
        self._append(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} step {step}: {line}")

    def _append(self, line: str) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    def step_metrics(self) -> dict[str, float]:
        out = {f"faults/{k}": float(n) for k, n in self.since_step.items()}
        out.update({f"counters/{k}": float(n) for k, n in self.total.items()})
        self.since_step = dict.fromkeys(FAULT_KINDS, 0)
        return out


def format_event(event: FaultEvent) -> str:
    """``<UTC time> step <s>: <kind> draw <d> actor <a>: <cause>`` (one line of logs/faults.log; the
    ``<time> step <s>: <what>`` shape of every line there)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.wall_s))
    return f"{stamp} step {event.step}: {event.kind} draw {event.draw} actor {event.actor or '?'}: {event.cause}"


def one_line(text: str, limit: int = 300) -> str:
    """The most informative line of an error message, at most ``limit`` characters.

    Ray error messages are multi-line (a traceback, then the cause); the last
    non-empty line that is not a traceback frame is the cause, e.g.
    ``verimed.core.rubrics.judge.JudgeUnavailable: judge call failed ...``.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if not ln.startswith(("File ", "^", "Traceback", "~"))]
    line = (causes or lines or [""])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."
