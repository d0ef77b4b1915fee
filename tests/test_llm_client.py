"""The openai LLMClient against a local fake server behind a fault-injecting proxy
(fast: no model), the llm.* config keys reaching every LLM role, and the frozen
verifier rule.

    pytest -q tests/test_llm_client.py
"""
from __future__ import annotations

import asyncio
import json

import pytest

from fault_proxy import FaultProxy
from verimed.core.config import load_config
from verimed.core.rollout.llm import LLMError, RoleClient, llm_roles
from verimed.core.rollout.openai_client import OpenAIClient, make_openai_client, retry_after_seconds
from verimed.core.rubrics.generator import LLMRubricGenerator, make_generator
from verimed.core.rubrics.judge import LLMJudge, make_judge
from verimed.core.types import RubricItem, Turn

MSG = [{"role": "user", "content": "Is the sky blue?"}]
ITEMS = [RubricItem("Asks about onset", 5), RubricItem("Prescribes antibiotics", -3)]
CONVO = [Turn("user", "I have a cough.")]


@pytest.fixture
def proxy_factory():
    proxies = []

    def make(**kwargs) -> FaultProxy:
        proxies.append(FaultProxy(**kwargs).start())
        return proxies[-1]

    yield make
    for p in proxies:
        p.stop()


def _client(proxy: FaultProxy, **kwargs) -> OpenAIClient:
    defaults = dict(timeout_s=1.0, backoff_base_s=0.001, backoff_max_s=0.01, max_retries=6, seed=0)
    client = OpenAIClient(proxy.base_url, "tiny", **{**defaults, **kwargs})
    client.delays = []

    async def record(delay: float) -> None:
        client.delays.append(delay)

    client._sleep = record
    return client


def test_every_fault_kind_is_retried_counted_and_retry_after_honoured(proxy_factory):
    proxy = proxy_factory(schedule=["429", "500", "slow", "malformed", "reset", None], slow_s=1.5)
    client = _client(proxy)
    text = asyncio.run(client.chat(MSG))
    assert json.loads(text)["criteria_met"] is True
    s = client.stats
    assert s["retries"] == 5 and s["errors"] == 0 and s["calls"] == 1
    assert [s[f"retry_{k}"] for k in ("429", "5xx", "timeout", "malformed", "connection")] == [1, 1, 1, 1, 1]
    assert client.delays[0] == pytest.approx(0.05)  # the 429's Retry-After, not the 1 ms backoff
    assert all(d <= 0.01 for d in client.delays[1:])  # backoff_max_s caps the rest
    assert s["completion_tokens"] == 7 and s["prompt_tokens"] == len(MSG[0]["content"]) // 4


def test_gives_up_after_max_retries_with_an_explicit_error(proxy_factory):
    proxy = proxy_factory(schedule=["500"] * 10)
    client = _client(proxy, max_retries=2)
    with pytest.raises(LLMError, match="HTTP 500"):
        asyncio.run(client.chat(MSG))
    assert client.stats["retries"] == 2 and client.stats["errors"] == 1 and proxy.requests == 3


def test_backoff_grows_exponentially_with_jitter(proxy_factory):
    proxy = proxy_factory(schedule=["500"] * 4 + [None])
    client = _client(proxy, backoff_base_s=0.1, backoff_max_s=100.0, max_retries=4)
    asyncio.run(client.chat(MSG))
    for k, delay in enumerate(client.delays):
        assert 0.1 * 2**k * 0.5 <= delay <= 0.1 * 2**k


def test_twenty_percent_faults_under_concurrency_lose_nothing(proxy_factory):
    # a 1 s timeout: a loaded 2-core box can delay a healthy reply past a few hundred ms,
    # which would be a real (uninjected) timeout and break the exact count below
    proxy = proxy_factory(fault_rate=0.2, seed=3, slow_s=1.5, reply_delay_s=0.01)
    client = _client(proxy, max_concurrency=4, timeout_s=1.0)

    async def many():
        return await asyncio.gather(*(client.chat(MSG) for _ in range(60)))

    answers = asyncio.run(many())
    assert len(answers) == 60 and all(json.loads(a)["criteria_met"] for a in answers)
    injected = sum(proxy.injected.values())
    assert injected >= 6 and client.stats["retries"] == injected and client.stats["errors"] == 0
    assert proxy.max_in_flight <= 4  # llm.max_concurrency bounds the requests in flight
    assert client.stats["completion_tokens"] == 7 * 60


def test_structured_output_is_asked_for_and_falls_back_when_rejected(proxy_factory):
    proxy = proxy_factory(schedule=[None])
    schema = {"type": "object", "properties": {"present": {"type": "boolean"}}, "required": ["present"]}
    asyncio.run(_client(proxy).chat(MSG, json_schema=schema))
    assert proxy.bodies[-1]["response_format"]["json_schema"]["schema"] == schema
    asyncio.run(_client(proxy, structured_output=False).chat(MSG, json_schema=schema))
    assert "response_format" not in proxy.bodies[-1]
    rejecting = proxy_factory(schedule=[None], reject_response_format=True)
    client = _client(rejecting)
    asyncio.run(client.chat(MSG, json_schema=schema))
    assert client.stats["structured_fallbacks"] == 1 and client.stats["retries"] == 0
    assert "response_format" not in rejecting.bodies[-1]


def test_answer_cache_makes_regrading_free(proxy_factory, tmp_path):
    proxy = proxy_factory(schedule=[None])
    path = tmp_path / "cache.jsonl"
    first = _client(proxy, cache_path=str(path))
    a = asyncio.run(first.chat(MSG))
    b = asyncio.run(first.chat(MSG))
    assert a == b and proxy.forwarded == 1 and first.stats["cache_hits"] == 1
    again = _client(proxy, cache_path=str(path))  # a new run re-grading the same completions
    asyncio.run(again.chat(MSG))
    asyncio.run(again.chat(MSG, max_tokens=7))  # another budget is another request
    assert proxy.forwarded == 2 and again.stats["cache_hits"] == 1


def test_judge_through_the_client_keeps_raw_output_and_schema(proxy_factory):
    proxy = proxy_factory(schedule=[None])
    judge = LLMJudge(_client(proxy), max_retries=1)
    out = asyncio.run(judge.judge(CONVO, "Take amoxicillin.", ITEMS))
    assert [j.met for j in out] == [True, True]
    assert all(j.raw and json.loads(j.raw)["explanation"] == "fake judge" for j in out)
    keys = sorted(b["response_format"]["json_schema"]["schema"]["required"][1] for b in proxy.bodies)
    assert keys == ["criteria_met", "present"]  # the positive and the negative template's key


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds(None) is None


def test_client_pickles_without_its_connection_pool(proxy_factory):
    import pickle

    client = _client(proxy_factory(schedule=[None]))
    client._sleep = asyncio.sleep
    asyncio.run(client.chat(MSG))
    copy = pickle.loads(pickle.dumps(client))
    assert copy._session_of is None and copy.stats["calls"] == 1


# ------------------------------------------------------------- llm.* config keys


class Recorder:
    """A bare client that records the arguments of every call."""

    def __init__(self, answer='{"explanation": "e", "criteria_met": true, "present": false}'):
        self.answer, self.calls = answer, []

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None):
        self.calls.append({"max_tokens": max_tokens, "temperature": temperature})
        return self.answer


def _role_client(cfg, role):
    """What the controller builds for llm.type=vllm/policy: a RoleClient over the engine group."""
    recorder = Recorder()
    return RoleClient(recorder, role, cfg.llm.max_tokens, cfg.llm.temperature), recorder


@pytest.mark.parametrize("overrides,expect_tokens", [
    (["llm.max_tokens=77"], 77),  # llm.* is the default
    (["llm.max_tokens=77", "judge.max_tokens=33"], 33),  # the role key wins
])
def test_llm_max_tokens_and_temperature_reach_the_judge(overrides, expect_tokens):
    cfg = load_config(None, ["judge.backend=llm", "llm.type=vllm", "llm.temperature=0.7", *overrides])
    client, recorder = _role_client(cfg, "judge")
    asyncio.run(make_judge(cfg.judge, client).judge(CONVO, "x", ITEMS))
    assert {c["max_tokens"] for c in recorder.calls} == {expect_tokens}
    assert {c["temperature"] for c in recorder.calls} == {0.7}


@pytest.mark.parametrize("overrides,expect_tokens", [
    (["llm.max_tokens=91", "rubrics.max_tokens=null"], 91),
    (["llm.max_tokens=91"], 1024),  # rubrics.max_tokens defaults to 1024 (a rubric is long)
    (["rubrics.max_tokens=500"], 500),
])
def test_llm_max_tokens_and_temperature_reach_the_rubric_generator(overrides, expect_tokens):
    from verimed.core.data.cases import load_cases

    cfg = load_config(None, ["rubrics.generator=llm", "rubrics.on_failure=case", "llm.type=vllm",
                             "llm.temperature=0.4", *overrides])
    client, recorder = _role_client(cfg, "rubric_generator")
    gen = make_generator(cfg.rubrics, client)
    assert isinstance(gen, LLMRubricGenerator)
    case = load_cases(skip_invalid=True)[0][0]
    asyncio.run(gen.generate(case, [Turn("user", case.primary_symptom)]))
    assert {c["max_tokens"] for c in recorder.calls} == {expect_tokens}
    assert {c["temperature"] for c in recorder.calls} == {0.4}


def test_llm_max_tokens_and_temperature_reach_the_simulator():
    from verimed.core.simulator.llm import LLMBackend

    cfg = load_config(None, ["simulator.backend=llm", "llm.type=vllm", "llm.max_tokens=55", "llm.temperature=0.9"])
    client, _ = _role_client(cfg, "simulator")
    backend = LLMBackend(client)
    assert (backend.max_tokens, backend.temperature) == (55, 0.9)


def test_openai_client_reads_every_llm_key():
    cfg = load_config(None, [
        "llm.type=openai", "llm.base_url=http://h/v1", "llm.model=m", "llm.max_tokens=12", "llm.temperature=0.3",
        "llm.max_concurrency=3", "llm.timeout_s=4.5", "llm.max_retries=7", "llm.backoff_base_s=0.25",
        "llm.backoff_max_s=9", "llm.structured_output=false", "llm.cache_path=/tmp/verimed-test-cache.jsonl"])
    c = make_openai_client(cfg.llm, "judge")
    assert (c.max_tokens, c.temperature, c.max_concurrency, c.timeout_s, c.max_retries) == (12, 0.3, 3, 4.5, 7)
    assert (c.backoff_base_s, c.backoff_max_s, c.structured_output, c.role) == (0.25, 9.0, False, "judge")
    assert str(c.cache.path) == "/tmp/verimed-test-cache.jsonl"
    with pytest.raises(ValueError, match="llm.base_url"):
        make_openai_client(load_config(None, ["llm.type=openai"]).llm, "judge")


def test_config_defaults_reach_an_openai_request(proxy_factory):
    proxy = proxy_factory(schedule=[None])
    cfg = load_config(None, ["llm.type=openai", f"llm.base_url={proxy.base_url}", "llm.model=tiny",
                             "llm.max_tokens=21", "llm.temperature=0.6"])
    asyncio.run(make_openai_client(cfg.llm, "simulator").chat(MSG))
    assert (proxy.bodies[-1]["max_tokens"], proxy.bodies[-1]["temperature"]) == (21, 0.6)


# ------------------------------------------------------------- frozen verifier


def test_llm_roles_need_an_explicit_type_and_policy_is_warned_about():
    assert llm_roles(load_config(None, [])) == ([], None)
    with pytest.raises(ValueError, match="set llm.type"):
        llm_roles(load_config(None, ["judge.backend=llm"]))
    users, warning = llm_roles(load_config(None, ["judge.backend=llm", "llm.type=policy"]))
    assert users == ["judge"] and "drifts with the policy" in warning
    assert llm_roles(load_config(None, ["judge.backend=llm", "llm.type=vllm", "llm.model=x"]))[1] is None


def test_no_shipped_config_judges_with_the_policy():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")):
        if "profiles" in path.parts:  # device profiles, not run configs
            continue
        cfg = load_config(path)
        users, warning = llm_roles(cfg)
        assert warning is None, path
        if users:
            assert cfg.llm.type in ("vllm", "openai"), path
