"""One simulated consultation: :class:`PatientSimulator` runs the three units each turn.

    sim = PatientSimulator(case, sample_persona(seed, case), make_backend(cfg), max_turns=6)
    first = sim.opening()                       # chief complaint in the persona's voice
    reply = await sim.respond("When did it start?")
    reply.text, reply.done, reply.reason, reply.disclosed, reply.vetoed
    sim.transcript                              # [Turn(user, opening), Turn(assistant, doctor), Turn(user, reply), ...]

Per turn: understand the doctor -> factual unit selects what may be disclosed
(unlocking exam / test facts when the doctor examines / orders) -> gate ->
affective unit drafts -> factual unit reviews (rewrite or veto). A restarted
actor calls :meth:`PatientSimulator.rebuild` with the transcript.
"""
from __future__ import annotations

import msgspec

from verimed.core.simulator.backend import SimulatorBackend, TurnContext
from verimed.core.simulator.intent import understand
from verimed.core.simulator.text import sentences
from verimed.core.simulator.persona import behaviour, validate_mbti
from verimed.core.simulator.retrieval import Retriever
from verimed.core.simulator.rules import render_opening
from verimed.core.simulator.script import GATED_KINDS, PATIENT_KINDS, PatientScript
from verimed.core.simulator.text import coverage, numbers
from verimed.core.simulator.units import GateDecision, SessionState, rules_gate, select_facts
from verimed.core.types import Case, Persona, Turn


class PatientReply(msgspec.Struct, frozen=True):
    """The simulator's answer to one doctor turn (consumed by the controller / rollout)."""

    text: str
    done: bool  # the termination gate closed the consultation
    reason: str  # why it closed ("" while open)
    disclosed: list[str]  # fact keys this reply disclosed
    vetoed: bool  # the factual unit rejected the affective unit's draft and rewrote it
    problems: list[str] = []  # what the factual unit found wrong with the draft


class SessionClosed(ValueError):
    """respond() after the termination gate closed the consultation."""


class PatientSimulator:
    def __init__(self, case: Case, persona: Persona, backend: SimulatorBackend, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        validate_mbti(persona.mbti)
        self.case = case
        self.persona = persona
        self.backend = backend
        self.max_turns = max_turns
        self.script = PatientScript.from_case(case)
        self.traits = behaviour(persona)
        self.retriever = Retriever(self.script, getattr(backend, "embedder", None))
        self.state = SessionState()
        self._turns: list[Turn] = []

    # ------------------------------------------------------------- public API

    def opening(self) -> str:
        """The patient's first statement (recorded once in the transcript)."""
        text = render_opening(self.script, self.persona)
        if not self._turns:
            self._turns.append(Turn(role="user", content=text))
            self._mark_disclosed(["chief_complaint"])
        return text

    @property
    def transcript(self) -> list[Turn]:
        return list(self._turns)

    @property
    def done(self) -> bool:
        return self.state.done

    async def respond(self, doctor_text: str) -> PatientReply:
        if self.state.done:
            raise SessionClosed(f"{self.case.case_id}: the consultation is closed ({self.state.reason})")
        if not self._turns:
            self.opening()
        intent = understand_turn(self.script, doctor_text)
        selection = select_facts(intent, self.script, self.state, self.retriever, self.traits)
        ctx = TurnContext(self.script, self.persona, self.traits, self.state, intent, selection,
                          list(self._turns), self.max_turns)
        decision = await self.backend.gate(ctx)
        draft = await self.backend.draft(ctx, decision)
        review = await self.backend.review(ctx, decision, draft)
        disclosed = [] if decision.done else detect_disclosed(review.text, selection.facts)
        self._advance(intent, decision)
        self._turns += [Turn(role="assistant", content=doctor_text), Turn(role="user", content=review.text)]
        self._mark_disclosed(disclosed)
        return PatientReply(review.text, decision.done, decision.reason, disclosed, review.vetoed, review.problems)

    @classmethod
    def rebuild(cls, case: Case, persona: Persona, backend: SimulatorBackend, max_turns: int,
                transcript: list[Turn]) -> "PatientSimulator":
        """A session in the state ``transcript`` left it in (after an actor restart).

        Replays the doctor turns through the deterministic understanding and
        gate (unlocks, diagnosis / plan, closure) and re-detects the disclosed
        facts from the patient's recorded replies. A trailing doctor turn with
        no reply is dropped (the caller re-sends it).
        """
        sim = cls(case, persona, backend, max_turns)
        turns = [t for t in transcript if t.role != "system"]
        if turns and turns[-1].role == "assistant":
            turns = turns[:-1]
        if turns and turns[0].role != "user":
            raise ValueError(f"{case.case_id}: a transcript starts with the patient's opening (role 'user')")
        sim._turns = list(turns[:1])
        sim._mark_disclosed(detect_disclosed(turns[0].content, sim.script.facts_of("chief_complaint")) if turns else [])
        for i in range(1, len(turns) - 1, 2):
            doctor, patient = turns[i], turns[i + 1]
            if doctor.role != "assistant" or patient.role != "user":
                raise ValueError(f"{case.case_id}: transcript turn {i} is not a doctor/patient pair")
            if sim.state.done:
                raise ValueError(f"{case.case_id}: transcript continues after the consultation closed")
            intent = understand_turn(sim.script, doctor.content)
            selection = select_facts(intent, sim.script, sim.state, sim.retriever, sim.traits)
            decision = rules_gate(intent, sim.state, sim.traits, max_turns)
            candidates = [f for f in sim.script.facts if f.kind in PATIENT_KINDS] + selection.facts
            sim._advance(intent, decision)
            sim._turns += [doctor, patient]
            sim._mark_disclosed(detect_disclosed(patient.content, candidates))
        return sim

    # ------------------------------------------------------------- internals

    def _advance(self, intent, decision: GateDecision) -> None:
        s = self.state
        s.turn += 1
        if intent.diagnosis and s.diagnosis_turn is None:
            s.diagnosis_turn = s.turn
        if intent.plan and s.plan_turn is None:
            s.plan_turn = s.turn
        if decision.done:
            s.done, s.reason = True, decision.reason

    def _mark_disclosed(self, keys: list[str]) -> None:
        self.state.disclosed += [k for k in keys if k not in self.state.disclosed]


def understand_turn(script: PatientScript, doctor_text: str):
    """:func:`understand` plus what only the case knows: a statement naming this case's diagnosis states it
    ("So the problem is Osteoclastoma."), whatever words frame it."""
    intent = understand(doctor_text)
    if not intent.diagnosis and any(not s.rstrip().endswith("?") and script.leaks_diagnosis(s)
                                    for s in sentences(doctor_text)):
        intent = msgspec.structs.replace(intent, diagnosis=True)
    return intent


def detect_disclosed(text: str, candidates) -> list[str]:
    """Keys of the candidate facts ``text`` states: most of a fact's words, or a gated fact's value numbers."""
    out = []
    for f in candidates:
        if f.kind == "diagnosis":
            continue
        nums = numbers(f.text)
        if f.kind in GATED_KINDS and nums and nums <= numbers(text) and coverage(f.label, text) >= 0.5:
            out.append(f.key)
        elif coverage(f.text, text) >= (0.6 if len(f.text.split()) > 3 else 0.99):
            out.append(f.key)
    return list(dict.fromkeys(out))


class SimulatorSessions:
    """Many concurrent consultations keyed by session id (the core of ``SimulatorActor``).

    All methods are async so one event loop serves every session; the LLM
    backend's calls for different sessions overlap.
    """

    def __init__(self, backend: SimulatorBackend, max_turns: int):
        self.backend = backend
        self.max_turns = max_turns
        self.sessions: dict[str, PatientSimulator] = {}

    async def start(self, session_id: str, case: Case, persona: Persona) -> str:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} already exists (close it first)")
        sim = PatientSimulator(case, persona, self.backend, self.max_turns)
        self.sessions[session_id] = sim
        return sim.opening()

    async def respond(self, session_id: str, doctor_text: str) -> PatientReply:
        return await self._get(session_id).respond(doctor_text)

    async def rebuild(self, session_id: str, case: Case, persona: Persona, transcript: list[Turn]) -> None:
        self.sessions[session_id] = PatientSimulator.rebuild(case, persona, self.backend, self.max_turns, transcript)

    async def transcript(self, session_id: str) -> list[Turn]:
        return self._get(session_id).transcript

    async def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def _get(self, session_id: str) -> PatientSimulator:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"unknown simulator session {session_id!r} (started? rebuilt after a restart?)") from None
