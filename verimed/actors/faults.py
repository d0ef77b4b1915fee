"""What the driver says when an actor or the job fails: ``runs/<name>/logs/faults.log`` and the stop messages.

Every loss and return of an actor is one line of ``faults.log`` (UTC time, learner step, which
actor on which node, Ray's error) and the same line on the driver's stderr; the matching
counters are in ``metrics.jsonl`` / W&B (``counters/engines_lost``, ``counters/engines_recovered``,
``counters/groups_rerun_after_failure``). A run that cannot go on (its learner's node died, or
``ray job stop`` / SIGTERM) stops with a message naming the newest checkpoint and how to resume, and a
last ``metrics.jsonl`` row at the step it did not finish (``counters/learner_lost``,
``counters/job_stopped``; the first in W&B too).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

from verimed.core.train.checkpoint import latest_checkpoint
from verimed.core.train.faults import FaultCounters

FAULT_LOG = "faults.log"
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class LearnerLost(RuntimeError):
    """A learner rank's actor died (its node is gone): the run cannot go on; the message says how to resume."""


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line. Ray's actor errors spread the cause over lines (class, actor id,
    pid, ip, then why: "...its node has died..."); all of them are kept, joined, up to ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:limit]


def resume_hint(run_dir: Path) -> str:
    """Where a stopped run can continue from: its newest checkpoint and the command."""
    ckpt = latest_checkpoint(Path(run_dir))
    where = f"the newest checkpoint is {ckpt}" if ckpt is not None else "it has no checkpoint yet (it restarts at step 0)"
    return f"{where}; resume with `verimed train CONFIG --resume {run_dir}`"


def learner_rank_of(exc: BaseException, learner_actors: list) -> int | None:
    """The rank whose actor ``exc`` (Ray's actor error) is about, or None when it is another actor's."""
    actor_id = getattr(exc, "actor_id", None)
    if actor_id is None:
        return None
    for rank, handle in enumerate(learner_actors):
        if handle._actor_id.hex() == actor_id:
            return rank
    return None


def learner_lost_message(rank: int, node_ip: str | None, exc: BaseException, version: int, run_dir: Path) -> str:
    return (f"learner rank {rank} on {node_ip or 'an unknown node'} died ({describe_error(exc)}); "
            f"the run stops at version {version}: {resume_hint(run_dir)}")


@contextlib.contextmanager
def exit_on_sigterm(run_dir: Path, version_of):
    """Within the block, SIGTERM (``ray job stop``, a scheduler's preemption) prints where the run can
    resume from and exits with 143; the previous handler is back afterwards.

    Checkpoints are written atomically and ledger lines whole, so stopping between any two
    bytecodes leaves a resumable run; ``version_of()`` gives the policy version for the message.
    Only the main thread may set signal handlers: elsewhere (a caller's thread) nothing changes.
    """
    def stop(signum, frame):
        version = version_of()
        FaultCounters(Path(run_dir) / "logs" / FAULT_LOG).note(
            version, f"stopped by SIGTERM at version {version}: {resume_hint(run_dir)}")
        # The step that did not finish gets the counter (a resumed run re-does that step and its row).
        # Straight to the file: W&B's client threads are not safe to enter from a signal handler.
        with (Path(run_dir) / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": version + 1, "counters/job_stopped": 1.0}) + "\n")
        os._exit(SIGTERM_EXIT_CODE)  # at once: Ray's job stop follows up with SIGKILL after a few seconds

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
