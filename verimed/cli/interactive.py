"""Play the doctor against the simulator in a terminal (or from piped stdin, as the tests do).

    verimed simulate --case case-0001 --persona ENFP --explain
    printf 'When did it start?\nLet me examine you.\n' | verimed simulate --case case-0001 --explain

``--explain`` shows, under each reply, which facts it disclosed (key and the
case's own words), whether the factual unit vetoed the draft, and the gate.
Type ``/quit`` (or end the input) to stop.
"""
from __future__ import annotations

import sys
from typing import TextIO

from verimed.core.simulator.persona import describe
from verimed.core.simulator.session import PatientReply, PatientSimulator


def _explain(sim: PatientSimulator, keys: list[str], reply: PatientReply | None, out: TextIO) -> None:
    for key in keys:
        out.write(f"    disclosed [{key}] {sim.script[key].text}\n")
    if not keys:
        out.write("    disclosed nothing\n")
    if reply is not None:
        if reply.vetoed:
            out.write(f"    factual unit vetoed the draft: {'; '.join(reply.problems)}\n")
        out.write(f"    gate: {'closed (' + reply.reason + ')' if reply.done else 'open'}"
                  f"  turn {sim.state.turn}/{sim.max_turns}\n")


async def play(sim: PatientSimulator, explain: bool = False, stdin: TextIO | None = None,
               stdout: TextIO | None = None) -> int:
    """Read doctor lines from ``stdin`` until the gate closes, ``/quit`` or end of input."""
    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin.isatty()
    out.write(f"case {sim.case.case_id} | patient persona: {describe(sim.persona)}\n")
    out.write("You are the doctor. Type a message per line; /quit to stop.\n\n")
    out.write(f"Patient: {sim.opening()}\n")
    if explain:
        _explain(sim, ["chief_complaint"], None, out)
    while not sim.done:
        if tty:
            out.write("Doctor> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if not tty:
            out.write(f"Doctor: {text}\n")
        reply = await sim.respond(text)
        out.write(f"Patient: {reply.text}\n")
        if explain:
            _explain(sim, reply.disclosed, reply, out)
        if reply.done:
            out.write(f"(consultation closed: {reply.reason})\n")
    out.flush()
    return 0
