"""Per-actor log files: every actor (and the engine processes it starts) writes to ``runs/<name>/logs/``.

The controller gives each actor ``VERIMED_LOG_FILE`` through its Ray
``runtime_env`` (:func:`with_log_file`); the actor's first act is
:func:`redirect_output`, which points the process's stdout and stderr file
descriptors at that file, so Python, C++ and child-process output (vLLM's
engine core and workers inherit the descriptors) land there and the console
keeps only the run's own lines. ``verimed train --verbose`` sets no log file:
actor output then streams to the console as Ray prints it.

On a multi-node cluster each node writes the files of its own actors under
the same path on its own disk.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_ENV = "VERIMED_LOG_FILE"


def with_log_file(options: dict, log_dir: Path | None, name: str) -> dict:
    """``options`` for ``ActorClass.options(...)`` that send the actor's output to ``log_dir/name.log``."""
    if log_dir is None:
        return options
    env = {**options.get("runtime_env", {}).get("env_vars", {}), LOG_ENV: str(log_dir / f"{name}.log")}
    return {**options, "runtime_env": {**options.get("runtime_env", {}), "env_vars": env}}


def redirect_output() -> None:
    """Point fds 1 and 2 of this process at ``$VERIMED_LOG_FILE`` (appending; no-op when unset)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # A restarted actor appends to its predecessor's file: mark where this process begins.
    print(f"---- pid {os.getpid()} started ----", flush=True)
