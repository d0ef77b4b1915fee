"""Errors of the rollout side that the command line reports (no torch here: the CLI imports it early)."""
from __future__ import annotations


class ParityError(RuntimeError):
    """After a sync, the engines' log-probs differ from the learner's by more than the tolerance."""
