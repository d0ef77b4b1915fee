"""Which actors a run starts, per placement role: what the plan must place and nothing more.

The controller (``verimed/actors/controller.py:Controller.start``) starts the
actors named here, each on its own role's bundles, so a test can check the plan
of every shipped config against them (no idle GPU bundle, no bundle whose GPUs
two actors ask for). Pure Python: no ray, no torch.
"""
from __future__ import annotations

from verimed.core.config import Config, ConfigError
from verimed.core.config.placement import CLIENT_ROLES

# Which engine group a client role prefers when ``llm.type`` is ``vllm``; the other group serves
# it when its own has no replicas (one group may serve all three).
_PREFERRED = {"simulator": "simulator_engine", "verifier": "verifier_engine", "rubric_generator": "verifier_engine"}


def llm_clients(cfg: Config) -> list[str]:
    """The client roles whose backend is ``llm`` (their prompts go where ``llm.type`` says)."""
    uses = {"simulator": cfg.simulator.backend, "verifier": cfg.judge.backend, "rubric_generator": cfg.rubrics.generator}
    return [role for role in CLIENT_ROLES if uses[role] == "llm"]


def llm_engine_roles(cfg: Config) -> dict[str, str]:
    """client role -> the engine placement role (``simulator_engine`` / ``verifier_engine``) serving it.

    Empty unless ``llm.type`` is ``vllm`` and some client uses an LLM. Raises
    ConfigError when no engine group has replicas to serve them.
    """
    clients = llm_clients(cfg)
    if cfg.llm.type != "vllm" or not clients:
        return {}
    out = {}
    for role in clients:
        preferred = _PREFERRED[role]
        other = "verifier_engine" if preferred == "simulator_engine" else "simulator_engine"
        hosts = [r for r in (preferred, other) if getattr(cfg.placement, r).replicas > 0]
        if not hosts:
            raise ConfigError(f"llm.type=vllm: {role} sends prompts to an LLM engine group, but "
                              "placement.simulator_engine.replicas and placement.verifier_engine.replicas are 0")
        out[role] = hosts[0]
    return out


def started_actors(cfg: Config, *, kl_enabled: bool) -> list[tuple[str, int]]:
    """(role, replica) of every actor the controller starts, in no particular order."""
    p = cfg.placement
    actors = [(role, i) for role in ("learner", "rollout") for i in range(getattr(p, role).replicas)]
    for role in sorted(set(llm_engine_roles(cfg).values())):
        actors += [(role, i) for i in range(getattr(p, role).replicas)]
    actors += [(role, 0) for role in CLIENT_ROLES]
    if kl_enabled:
        actors += [("reference", i) for i in range(p.reference.replicas)]
    return actors
