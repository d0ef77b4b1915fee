"""The backend interface of the simulator's three units, and what each unit sees.

A backend implements the termination gate, the affective unit (the draft in
the persona's voice) and the factual unit's review of that draft. Selection
of what may be disclosed (:func:`~verimed.core.simulator.units.select_facts`)
is shared by all backends, so an LLM never even sees the diagnosis or locked
results. ``make_backend(cfg, llm)`` (:mod:`verimed.core.simulator.factory`) picks one by ``cfg.backend``.
"""
from __future__ import annotations

import msgspec

from verimed.core.simulator.intent import DoctorIntent
from verimed.core.simulator.persona import Traits
from verimed.core.simulator.script import PatientScript
from verimed.core.simulator.units import GateDecision, Review, Selection, SessionState
from verimed.core.types import Persona, Turn


class TurnContext(msgspec.Struct):
    """Everything a unit may look at for one patient turn."""

    script: PatientScript
    persona: Persona
    traits: Traits
    state: SessionState  # as of before this turn's gate (turn already counted)
    intent: DoctorIntent
    selection: Selection
    transcript: list[Turn]  # up to, not including, this doctor turn
    max_turns: int


class SimulatorBackend:
    """Base class: ``gate`` -> ``draft`` -> ``review``, all async (LLM backends await a client)."""

    name = "base"

    async def gate(self, ctx: TurnContext) -> GateDecision:
        raise NotImplementedError

    async def draft(self, ctx: TurnContext, decision: GateDecision) -> str:
        raise NotImplementedError

    async def review(self, ctx: TurnContext, decision: GateDecision, draft: str) -> Review:
        raise NotImplementedError
