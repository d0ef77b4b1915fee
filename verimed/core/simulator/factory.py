"""The simulator backend chosen by ``simulator.backend`` (sits above the backends it builds)."""
from __future__ import annotations

from verimed.core.config import SimulatorConfig
from verimed.core.simulator.backend import SimulatorBackend
from verimed.core.simulator.llm import LLMBackend
from verimed.core.simulator.rules import RulesBackend


def make_backend(cfg: SimulatorConfig, llm=None, embedder=None) -> SimulatorBackend:
    """``rules`` (default, deterministic) or ``llm`` (needs an LLMClient)."""
    if cfg.backend == "rules":
        return RulesBackend(embedder=embedder)
    if cfg.backend == "llm":
        if llm is None:
            raise ValueError("simulator.backend=llm needs an LLM client (configure the llm section)")
        return LLMBackend(llm, embedder=embedder)
    raise ValueError(f"simulator.backend={cfg.backend!r}: expected 'rules' or 'llm'")
