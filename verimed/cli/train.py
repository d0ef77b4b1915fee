"""``verimed train CONFIG [section.key=value ...]``: load and check the config, start Ray, run the controller.

    verimed train configs/default.yaml run.steps=4 --verbose
    verimed train configs/default.yaml --resume runs/default
    verimed train configs/cluster/m2-32b-8x8.yaml --emulate h100-qwen2.5-32b emulation.time_scale=100
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from verimed.core.config import load_config, to_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (e.g. configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.eps_high=0.3 run.steps=4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--emulate", metavar="PROFILE",
                   help="emulated engines, learner and reference driven by a device profile (a name under "
                        "configs/profiles/ or a YAML path): sets rollout.backend and trainer.backend to emulated "
                        "and emulation.profile (later overrides still apply); model.path is then never read")
    p.add_argument("--verbose", action="store_true",
                   help="stream actor and engine logs (vLLM, Ray) to the console instead of RUN_DIR/logs/")


def emulate_overrides(profile: str | None) -> list[str]:
    """The overrides ``--emulate PROFILE`` puts before the user's (which may still change them)."""
    if profile is None:
        return []
    return ["rollout.backend=emulated", "trainer.backend=emulated", f"emulation.profile={profile}"]


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, emulate_overrides(getattr(args, "emulate", None)) + list(args.overrides))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from verimed.core.data.cases import load_cases

    load_cases(cfg.data.cases_path, cfg.data.skip_invalid)  # fail on bad data before any actor starts
    model_path = resolve_policy_path(cfg)
    run_dir = Path(args.resume) if args.resume else Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg, args.verbose)
    from verimed.actors.controller import run_training
    from verimed.actors.faults import LearnerLost

    try:
        run_training(cfg, run_dir, model_path, resume=bool(args.resume), verbose=args.verbose)
    except LearnerLost as exc:  # the message names the rank, its node and the checkpoint to resume from
        print(f"verimed: error: {exc}", file=sys.stderr)
        return 3
    print(run_dir.resolve())
    return 0


def resolve_policy_path(cfg) -> str:
    """The directory the actors get as ``model_path``: ``model.path``, or under emulation the tokenizer
    directory (``emulation.tokenizer``; model.path is a placeholder then and never read). Under emulation
    the profile is loaded and checked against every engine's tensor-parallel size here, before any actor starts."""
    from verimed.core.models import resolve_model_path

    if cfg.rollout.backend != "emulated":
        return resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    from verimed.core.emulate.profile import engine_speed, load_profile

    profile = load_profile(cfg.emulation.profile)
    for role in ("rollout", "simulator_engine", "verifier_engine"):
        spec = getattr(cfg.placement, role)
        if spec.replicas:
            engine_speed(profile, spec.tensor_parallel_size)
    return resolve_model_path(cfg.emulation.tokenizer, cfg.model.cache_dir)


def init_ray(cfg, verbose: bool = False) -> None:
    # Loopback-only local clusters, no auth token for local `ray job submit` (DESIGN §10).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    # Actors write to RUN_DIR/logs/ (verimed.actors.logs); Ray's own INFO lines are noise on the console.
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        # Ray's own "Connected to Ray cluster" is an INFO line, silenced above: say which cluster was joined.
        print(f"verimed: joined the Ray cluster at {address}", file=sys.stderr)
    else:
        # Logical CPUs above the physical count: helper actors and engines share
        # cores on a laptop; scheduling must not deadlock on 0.5-CPU fragments.
        cpus, gpus = float(cfg.run.ray_num_cpus or max(4, os.cpu_count() or 1)), 0
        if cfg.rollout.backend == "emulated":
            # Emulated devices on one local node: as many logical GPUs (and CPUs) as the plan asks
            # for, so a cluster config runs here; `verimed cluster up` spreads them over loopback nodes.
            need = planned_resources(cfg)
            cpus, gpus = max(cpus, need[0]), need[1]
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}, **quiet)


def planned_resources(cfg) -> tuple[float, int]:
    """(CPUs, GPUs) the placement plan of ``cfg`` reserves in all (bundles of every placed role)."""
    from verimed.core.cluster.planner import ClusterResources, plan
    from verimed.core.config import reference_needed

    the_plan = plan(cfg.placement, kl_enabled=reference_needed(cfg), cluster=ClusterResources.uniform(1, 1 << 20))
    return the_plan.total_cpus, the_plan.total_gpus


