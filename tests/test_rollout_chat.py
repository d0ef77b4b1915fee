"""The ``policy`` LLM backend: roles chat through the rollout actors (EngineGroupClient -> RolloutActor.chat)."""
from __future__ import annotations

import asyncio

import pytest

from verimed.core.config import load_config
from verimed.core.rollout.engines import TransformersEngine
from verimed.core.rollout.llm import EngineClient
from verimed.core.models import load_tokenizer

MESSAGES = [{"role": "user", "content": "I have had a cough for two weeks. What should I do?"}]


@pytest.mark.integration
def test_policy_backend_chat_equals_in_process_engine(tiny_model_path):
    ray = pytest.importorskip("ray")
    from verimed.actors.rollout import EngineGroupClient, EngineRouter, RolloutActor

    cfg = load_config(None, ["rollout.backend=transformers"])
    expected = asyncio.run(EngineClient(TransformersEngine(tiny_model_path), load_tokenizer(tiny_model_path))
                           .chat(MESSAGES, max_tokens=12, temperature=0.0))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = RolloutActor.remote(cfg, tiny_model_path, 0)
        ray.get(actor.ready.remote())
        client = EngineGroupClient(EngineRouter([actor]))
        answer = asyncio.run(client.chat(MESSAGES, max_tokens=12, temperature=0.0, affinity_key="case-1"))
    finally:
        ray.shutdown()
    assert answer and answer == expected  # greedy: the same text through the actor
