"""Simulator actor: a thin Ray shell over :class:`verimed.core.simulator.SimulatorSessions`.

    sim = SimulatorActor.options(num_cpus=0).remote(cfg.simulator, llm_client)  # llm_client: None for rules
    opening = await sim.start.remote("draw-7", case, persona)
    reply = await sim.respond.remote("draw-7", "When did it start?")   # PatientReply
    await sim.close.remote("draw-7")

Async actor: many sessions run concurrently in one process. Sessions live in
memory; after a restart the caller re-creates one with ``rebuild(session_id,
case, persona, transcript)``. All logic is in ``verimed.core.simulator``.
"""
from __future__ import annotations

from typing import Any

import ray

from verimed.actors.logs import redirect_output
from verimed.core.emulate.roles import make_backend  # the emulated backend over emulated engines
from verimed.core.rollout.llm import client_stats
from verimed.core.simulator import PatientReply, SimulatorSessions
from verimed.core.types import Case, Persona, Turn


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class SimulatorActor:
    def __init__(self, cfg: Any, llm: Any = None):
        redirect_output()  # first: all later output, child processes included, goes to its log file
        self.llm = llm
        self.core = SimulatorSessions(make_backend(cfg, llm), cfg.max_turns)

    async def start(self, session_id: str, case: Case, persona: Persona) -> str:
        return await self.core.start(session_id, case, persona)

    async def respond(self, session_id: str, doctor_text: str) -> PatientReply:
        return await self.core.respond(session_id, doctor_text)

    async def rebuild(self, session_id: str, case: Case, persona: Persona, transcript: list[Turn]) -> None:
        await self.core.rebuild(session_id, case, persona, transcript)

    async def transcript(self, session_id: str) -> list[Turn]:
        return await self.core.transcript(session_id)

    async def close(self, session_id: str) -> None:
        await self.core.close(session_id)

    def num_sessions(self) -> int:
        return len(self.core.sessions)

    def llm_stats(self) -> dict[str, int]:
        """This role's LLM client counters (calls, tokens, retries, errors)."""
        return client_stats(self.llm)
