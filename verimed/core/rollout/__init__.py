"""Generation: engines, the weight-sync transport, and the LLM clients of the verifier roles.

- ``engines``: vLLM ``AsyncLLM`` (token in / token out, per-token versions) and a transformers engine;
- ``weight_sync``: bucketed, versioned broadcast from learner rank 0 to every engine worker;
- ``sync_plan``: its torch-free half (describe from triples, bucket plan, checks, sync ranks);
- ``worker_extension``: the receiving side, loaded into vLLM workers;
- ``llm``: the ``LLMClient`` protocol and its openai / in-process engine backends;
- ``routing``: engine choice by expected completion (in flight x EWMA latency).

May import: ``config``, ``types``, ``models``, torch, vllm (lazily).
"""
