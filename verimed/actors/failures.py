"""What failed and why: a group's exception, read as (fault kind, actor, cause line).

    kind, actor, cause = failure_origin(exc)   # ("judge_unavailable", "VerifierActor.judge", "...JudgeUnavailable: ...")

Ray wraps an error raised inside an actor method in ``RayTaskError`` (its
``proctitle`` names the actor and method, ``cause`` is the original exception),
and reports a dead or restarting actor as ``RayActorError`` (its message names
the class and the reason: "The actor is dead because ..."). The kinds are the
counters of :mod:`verimed.core.train.faults`.
"""
from __future__ import annotations

import re

import ray

from verimed.core.rubrics.judge import JudgeUnavailable
from verimed.core.train.faults import one_line


def failure_origin(exc: BaseException) -> tuple[str, str, str]:
    """(kind, actor, cause line) of a failed group's exception.

    kind: "actor_died" (a Ray actor died or is restarting), "judge_unavailable" (the judge's
    LLM could not be reached: :class:`JudgeUnavailable`, raised here or inside the verifier
    actor), "group_error" (anything else, e.g. a bug or a bad item).
    """
    if isinstance(exc, ray.exceptions.RayActorError):
        text = str(exc)
        name = re.search(r"class_name:\s*(\S+)", text)
        actor = name.group(1) if name else (getattr(exc, "actor_id", None) or "actor")
        return "actor_died", str(actor), one_line(text)
    cause = exc
    actor = ""
    if isinstance(exc, ray.exceptions.RayTaskError):
        # The error as raised here is Ray's "dual" instance (RayTaskError and the cause's class), whose
        # attributes are the cause's: the actor and method are on its message's first line,
        # "ray::VerifierActor.judge() (pid=.., ip=..)" (possibly in terminal colours).
        cause = getattr(exc, "cause", None) or exc
        title = re.search(r"ray::([\w.]+)", str(exc))
        actor = title.group(1) if title else ""
    kind = "judge_unavailable" if isinstance(cause, JudgeUnavailable) else "group_error"
    if not actor:
        actor = "judge" if kind == "judge_unavailable" else "controller"
    return kind, actor, one_line(f"{type(cause).__name__}: {cause}")
