"""Emulated devices (DESIGN §11): rollout engines, learners and references that wait instead of computing.

- ``profile``: the device profile (``configs/profiles/*.yaml``) and the pure time functions it feeds;
- ``architecture``: parameter names, shapes and dtypes of the target model from its HF config fields;
- ``pseudo``: the deterministic stand-in log-probs that engine and learner compute identically;
- ``tokens``: response ids (spans of the prompt) and a light tokenizer; ``rendezvous``: the emulated sync group;
- ``engine``: :class:`EmulatedEngine`, the async interface of ``VLLMEngine`` (ticks of modelled time);
- ``learner``: :class:`EmulatedLearner` and :class:`EmulatedReference`;
- ``roles``: the LLM roles (patient simulator, rubric generator, judge) over emulated engines: content
  from their rules backends, timing from the LLM calls the real role would make.

Nothing here allocates weights or imports torch, transformers or vLLM, so an emulated actor stays
small and dozens fit on 2 cores.
May import: ``verimed.core.config``, ``verimed.core.types``, ``verimed.core.rollout.sync_plan`` (the
torch-free weight-sync planning), ``verimed.core.rollout.engines`` (``EngineOutput``), ``verimed.core.rollout.llm``, ``verimed.core.rubrics`` and
``verimed.core.simulator`` (``roles`` only), msgspec, numpy,
yaml, tokenizers — never torch, transformers, vllm or ray.
"""
