"""The processes of a loopback cluster, found by session id (``/proc``), and stopping exactly them.

Each ``ray start`` of :mod:`verimed.core.cluster.loopback` runs in a session of its own, and
every process of its node inherits it; ``ray job submit`` drivers get their own session and
are found by their environment. Plain ``ray stop`` is no substitute: it kills every Ray
process of the machine, other users' clusters included. Pure Python (os, /proc).
"""
from __future__ import annotations

import os
import signal
import time


class ProcessError(RuntimeError):
    """Processes of a cluster survived SIGKILL."""


def session_members(session: int) -> list[int]:
    """Pids of the live (not zombie) processes in session ``session``, read from /proc/<pid>/stat."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
        except OSError:
            continue
        # fields[0] = state, [3] = session id (proc(5): fields 3 and 6, counted after the name)
        if int(fields[3]) == session and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def job_driver_sessions(gcs: str) -> list[int]:
    """Sessions of the drivers of ``ray job submit`` jobs on the cluster whose GCS is ``gcs``.

    The job supervisor starts each entrypoint in a new session, so a running job is not in
    any node's session. Its environment holds ``RAY_ADDRESS=<gcs>`` (unique while the cluster
    is up: no other cluster can bind that address and port) and the job config Ray passes
    only to job drivers, so a shell that merely exported ``RAY_ADDRESS`` is left alone.
    """
    wanted, uid, sessions = f"RAY_ADDRESS={gcs}".encode(), os.getuid(), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry.name}").st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if wanted not in env or not any(v.startswith(b"RAY_JOB_CONFIG_JSON_ENV_VAR=") for v in env):
                continue
            sessions.add(os.getsid(int(entry.name)))
        except OSError:  # gone, or not ours to read
            continue
    return sorted(sessions - {os.getsid(0)})  # never the session of the caller (a test, a shell)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_sessions(sessions: list[int]) -> int:
    """SIGKILL every process of ``sessions`` at once, as a machine that loses power (nothing shuts down
    cleanly, nobody is told); return how many there were. ProcessError if one survives 10 s."""
    members = [p for s in sessions for p in session_members(s)]
    _signal_all(members, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(session_members(s) for s in sessions):
        _signal_all([p for s in sessions for p in session_members(s)], signal.SIGKILL)  # forked meanwhile
        time.sleep(0.1)
    still = [p for s in sessions for p in session_members(s)]
    if still:
        raise ProcessError(f"processes {still} of sessions {sessions} survived SIGKILL")
    return len(members)


def stop_sessions(sessions: list[int], grace_s: float = 15.0) -> int:
    """SIGTERM every process of ``sessions``, SIGKILL what is left after ``grace_s``; return how many there were.

    A session id cannot be reused while a process of it lives (the kernel keeps the pid
    reserved), so this reaches only processes this cluster started.
    """
    members = [p for s in sessions for p in session_members(s)]
    _signal_all(members, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(session_members(s) for s in sessions):
        time.sleep(0.2)
    left = [p for s in sessions for p in session_members(s)]
    _signal_all(left, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(session_members(s) for s in sessions):
        time.sleep(0.1)
    still = [p for s in sessions for p in session_members(s)]
    if still:
        raise ProcessError(f"processes {still} of sessions {sessions} survived SIGKILL")
    return len(set(members) | set(left))
