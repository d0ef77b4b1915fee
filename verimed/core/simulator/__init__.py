"""The patient simulator (paper §2.1, DESIGN §7): scripts, personas, three units per turn, backends, audit.

    from verimed.core.simulator import PatientSimulator, make_backend, sample_persona
    sim = PatientSimulator(case, sample_persona(seed, case), make_backend(cfg.simulator), cfg.simulator.max_turns)
    sim.opening(); reply = await sim.respond("When did it start?")

``verimed simulate --audit N`` measures privacy / fact / persona scores;
``verimed simulate --case case-0001 --persona ENFP --explain`` plays it in a terminal.
No Ray here: ``verimed.actors.simulator`` wraps :class:`PatientSimulator`; the
commands live in :mod:`verimed.cli.simulate`. May import: ``verimed.core.config``,
``types``, ``rollout.llm`` (the LLMClient protocol); nothing else of ``verimed``.
"""
from verimed.core.simulator.backend import SimulatorBackend, TurnContext
from verimed.core.simulator.factory import make_backend
from verimed.core.simulator.persona import MBTI_TYPES, Traits, behaviour, describe, sample_persona
from verimed.core.simulator.rules import RulesBackend
from verimed.core.simulator.script import Fact, PatientScript, ScriptError
from verimed.core.simulator.session import (
    PatientReply, PatientSimulator, SessionClosed, SimulatorSessions, detect_disclosed,
)
from verimed.core.simulator.units import GateDecision, Review, SessionState

__all__ = [
    "MBTI_TYPES", "Fact", "GateDecision", "PatientReply", "PatientScript", "PatientSimulator", "Review",
    "RulesBackend", "ScriptError", "SessionClosed", "SessionState", "SimulatorSessions", "SimulatorBackend", "Traits", "TurnContext",
    "behaviour", "describe", "detect_disclosed", "make_backend", "sample_persona",
]
