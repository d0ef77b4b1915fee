"""The simulator backend chosen by ``simulator.backend`` (sits above the backends it builds)."""
from __future__ import annotations

from verimed.core.config import SimulatorConfig
from verimed.core.rollout.llm import is_emulated
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
        if is_emulated(llm):  # its engines answer filler: the units would all fall back, silently
            raise ValueError("simulator.backend=llm with an emulated client (rollout.backend=emulated): build the "
                             "backend with verimed.core.emulate.roles.make_backend")
        return LLMBackend(llm, embedder=embedder)
    raise ValueError(f"simulator.backend={cfg.backend!r}: expected 'rules' or 'llm'")
