"""The ``verimed`` command line: one launcher, one module per command.

    verimed train CONFIG [section.key=value ...] [--print-config] [--resume RUN_DIR]
    verimed eval healthbench --data FILE --policy MODEL --grader rules|vllm:MODEL|openai:MODEL
    verimed simulate [--audit N | --case ID --persona ENFP --explain]
    verimed plan CONFIG [--cluster-resources SPEC] [--simulate PROFILE [--steps N] [--time-scale X]]
    verimed export RUN_DIR OUT_DIR
    verimed ledger RUN_DIR          (exactly-once check: no sample trained twice, no draw lost)
    verimed cluster up --nodes N --gpus-per-node G --cpus-per-node C | down | status | kill-node | start-node

Heavy modules (torch, ray, vllm) are imported only after the arguments are
parsed, so ``--help`` and ``--print-config`` are instant. Argument parsing,
printing and exit codes live here and only here; the work is in ``verimed.core``.
"""
from __future__ import annotations

import argparse
import sys

from verimed.cli import cluster as cluster_cli
from verimed.cli import eval as eval_cli
from verimed.cli import export as export_cli
from verimed.cli import ledger as ledger_cli
from verimed.cli import plan as plan_cli
from verimed.cli import simulate as simulate_cli
from verimed.cli import train as train_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verimed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train_cli.add_arguments(sub.add_parser("train", help="run RL training"))
    ev = sub.add_parser("eval", help="evaluate a policy").add_subparsers(dest="benchmark", required=True)
    eval_cli.add_arguments(ev.add_parser("healthbench", help="HealthBench with rubric grading"))
    simulate_cli.add_arguments(sub.add_parser("simulate", help="patient simulator: audit or interactive"))
    plan_cli.add_plan_arguments(sub.add_parser("plan", help="resolve and check actor placement"))
    export_cli.add_export_arguments(sub.add_parser("export", help="export a run's checkpoint as a Hugging Face model"))
    ledger_cli.add_arguments(sub.add_parser("ledger", help="check a run's ledger: exactly-once, no gap"))
    cluster_cli.add_arguments(sub.add_parser("cluster", help="a Ray cluster of loopback nodes with logical GPUs"))
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
    from verimed.core.cluster.planner import PlacementError
    from verimed.core.config import ConfigError
    from verimed.core.data import DataError
    from verimed.core.models import ModelError
    from verimed.core.rollout.errors import ParityError
    from verimed.core.train.checkpoint import CheckpointError

    try:
        if args.command == "train":
            return train_cli.train(args)
        if args.command == "eval":
            return eval_cli.run(args)
        if args.command == "simulate":
            return simulate_cli.run(args)
        if args.command == "cluster":
            return cluster_cli.run(args)
        if args.command == "ledger":
            return ledger_cli.run(args)
        if args.command == "export":
            return export_cli.run_export(args)
        if args.command == "plan":
            def from_ray(address: str):
                from verimed.actors.placement import cluster_resources_from_ray

                return cluster_resources_from_ray(address)

            return plan_cli.run_plan(args, cluster_from_ray=from_ray)
    except (ConfigError, DataError, ModelError, CheckpointError, ParityError, PlacementError) as exc:
        print(f"verimed: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
