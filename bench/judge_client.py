"""Judge calls/s against an OpenAI-compatible server, at judge concurrency 1 and 16,
for the current client (AsyncOpenAI) and the old urllib client (baseline, loaded
from git at ``--baseline-commit``, thread per call).

    python -m vllm.entrypoints.openai.api_server --model ~/.cache/verimed/smollm2-135m-instruct \\
        --served-model-name tiny --host 127.0.0.1 --port 8765 --enforce-eager --dtype bfloat16 &
    PYTHONPATH=. .venv/bin/python bench/judge_client.py --url http://127.0.0.1:8765/v1 --model tiny

A judge call is one rubric item of a shipped HealthBench example graded by
``LLMJudge`` (real judge prompts, ``--max-tokens`` answer budget, greedy); the
first ``--calls`` items in example order are graded, one response per example.
Structured output is off for ``old`` and ``new`` so they ask the server the same
thing; ``new+schema`` asks for the judge's JSON schema (``response_format``).
Prints one markdown table row per (client, concurrency).

    PYTHONPATH=. .venv/bin/python bench/judge_client.py --concurrency 16 --clients new+schema
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
import types
from pathlib import Path

from verimed.core.data.healthbench import load_healthbench
from verimed.core.rollout.openai_client import OpenAIClient
from verimed.core.rubrics.judge import LLMJudge

RESPONSE = "Please rest, drink fluids, and see a doctor if the fever lasts more than three days."


def old_client_class(commit: str) -> type:
    """The urllib ``OpenAIClient`` as it was at ``commit`` (the baseline)."""
    source = subprocess.run(["git", "show", f"{commit}:verimed/core/rollout/llm.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[1]).stdout
    module = types.ModuleType("old_llm")
    exec(compile(source, "old_llm.py", "exec"), module.__dict__)
    return module.OpenAIClient


async def measure(client, concurrency: int, calls: int, max_tokens: int) -> tuple[float, int]:
    """(judge calls per second, ungradable items) over the first ``calls`` rubric items."""
    judge = LLMJudge(client, max_retries=0, max_tokens=max_tokens, concurrency=concurrency, temperature=0.0)
    work, left = [], calls
    for ex in load_healthbench()[0]:
        if left <= 0:
            break
        work.append((ex.messages, ex.rubric[:left]))
        left -= len(work[-1][1])
    start = time.perf_counter()
    results = await asyncio.gather(*(judge.judge(messages, RESPONSE, items) for messages, items in work))
    seconds = time.perf_counter() - start
    return judge.stats["calls"] / seconds, sum(j.met is None for r in results for j in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765/v1")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--calls", type=int, default=32, help="judge calls per measurement")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--baseline-commit", default="8c572d8", help="commit with the urllib client")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--clients", default="old,new", help="comma list of old, new, new+schema")
    args = parser.parse_args()
    makers = {
        "old": ("urllib (old)", lambda c: old_client_class(args.baseline_commit)(args.url, args.model)),
        "new": ("AsyncOpenAI (new)", lambda c: OpenAIClient(args.url, args.model, role="judge", max_concurrency=c,
                                                            structured_output=False)),
        "new+schema": ("AsyncOpenAI + JSON schema", lambda c: OpenAIClient(args.url, args.model, role="judge",
                                                                            max_concurrency=c)),
    }
    print("| client | concurrency | calls | judge calls/s | ungradable |\n|---|---|---|---|---|")
    for concurrency in args.concurrency:
        for key in args.clients.split(","):
            name, make = makers[key]
            rate, ungradable = asyncio.run(measure(make(concurrency), concurrency, args.calls, args.max_tokens))
            print(f"| {name} | {concurrency} | {args.calls} | {rate:.2f} | {ungradable} |", flush=True)


if __name__ == "__main__":
    main()
