"""The ``verimed`` command line.

    verimed train CONFIG [section.key=value ...] [--print-config]
    verimed eval healthbench --data FILE --policy MODEL --grader rules|vllm:MODEL|openai:MODEL
    verimed simulate [--audit N | --case ID --persona ENFP --explain]
    verimed plan CONFIG [--cluster-resources SPEC]

Heavy modules (torch, ray, vllm) are imported only after the arguments are
parsed, so ``--help`` and ``--print-config`` are instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (e.g. configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.eps_high=0.3 run.steps=4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verimed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_args(sub.add_parser("train", help="run RL training"))
    ev = sub.add_parser("eval", help="evaluate a policy").add_subparsers(dest="benchmark", required=True)
    from verimed.core import eval_healthbench

    eval_healthbench.add_arguments(ev.add_parser("healthbench", help="HealthBench with rubric grading"))
    from verimed.core.simulator import cli as simulator_cli

    simulator_cli.add_arguments(sub.add_parser("simulate", help="patient simulator: audit or interactive"))
    from verimed.core import placement

    placement.add_plan_arguments(sub.add_parser("plan", help="resolve and check actor placement"))
    from verimed.core import checkpoint

    checkpoint.add_export_arguments(sub.add_parser("export", help="export a run's checkpoint as a Hugging Face model"))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Overrides may follow options (`plan CFG --cluster-resources X a.b=c`): argparse
    # stops collecting positionals at an option, so gather key=value leftovers here.
    args, extra = build_parser().parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown:
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
    from verimed.core.config import ConfigError
    from verimed.core.data import DataError
    from verimed.core.checkpoint import CheckpointError
    from verimed.core.models import ModelError

    try:
        if args.command == "train":
            return train(args)
        if args.command == "eval":
            from verimed.core import eval_healthbench

            return eval_healthbench.run(args)
        if args.command == "simulate":
            from verimed.core.simulator import cli as simulator_cli

            return simulator_cli.run(args)
        if args.command == "export":
            from verimed.core import checkpoint

            return checkpoint.run_export(args)
        if args.command == "plan":
            from verimed.core import placement

            def from_ray(address: str):
                from verimed.actors.placement import cluster_resources_from_ray

                return cluster_resources_from_ray(address)

            return placement.run_plan(args, cluster_from_ray=from_ray)
    except (ConfigError, DataError, ModelError, CheckpointError) as exc:
        print(f"verimed: error: {exc}", file=sys.stderr)
        return 2
    return 1


def train(args: argparse.Namespace) -> int:
    from verimed.core.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from verimed.core.data.cases import load_cases
    from verimed.core.models import resolve_model_path

    load_cases(cfg.data.cases_path, cfg.data.skip_invalid)  # fail on bad data before any actor starts
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    run_dir = Path(args.resume) if args.resume else Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    from verimed.actors.controller import run_training

    run_training(cfg, run_dir, model_path, resume=bool(args.resume))
    print(run_dir.resolve())
    return 0


def init_ray(cfg) -> None:
    # Loopback-only local clusters, no auth token for local `ray job submit` (DESIGN §10).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs above the physical count: helper actors and engines share
        # cores on a laptop; scheduling must not deadlock on 0.5-CPU fragments.
        ray.init(num_cpus=cfg.run.ray_num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})


if __name__ == "__main__":
    sys.exit(main())
