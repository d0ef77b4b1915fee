"""``verimed simulate``: audit the simulator or play the doctor against it.

    verimed simulate --audit 170 --json runs/sim_audit.json     # both audits: the old one and the independent one
    verimed simulate --case case-0001 --persona ENFP --explain   # interactive (reads stdin)
    verimed simulate --audit 5 --backend llm                     # needs an LLM client

``verimed/cli/__init__.py`` wires :func:`add_arguments` and :func:`run` as
the ``simulate`` subcommand. Heavy imports happen inside :func:`run`.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit", type=int, metavar="N", help="audit the first N cases (0 or more than shipped: all)")
    parser.add_argument("--case", metavar="ID", help="play this case interactively (case-0001, or its line number)")
    parser.add_argument("--persona", metavar="MBTI", help="fix the patient's MBTI type (e.g. ENFP); default: sampled")
    parser.add_argument("--explain", action="store_true", help="interactive: show the facts each reply disclosed")
    parser.add_argument("--backend", choices=("rules", "llm"), default="rules", help="simulator backend")
    parser.add_argument("--json", metavar="OUT", help="audit: also write the report as JSON to OUT")
    parser.add_argument("--seed", type=int, default=0, help="persona sampling seed")
    parser.add_argument("--max-turns", type=int, default=20, help="interactive: turn limit of the termination gate")
    parser.add_argument("--cases-path", metavar="JSONL", help="OSCE cases file (default: the shipped cases)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed case records")
    parser.add_argument("--llm-base-url", metavar="URL", help="--backend llm: an OpenAI-compatible endpoint")
    parser.add_argument("--llm-model", metavar="NAME", help="--backend llm: the model name at that endpoint")


def find_case(cases: list, case_id: str):
    """``case-0007``, ``0007`` or ``7`` -> the Case; ValueError naming valid ids otherwise."""
    wanted = case_id.strip().lower()
    if wanted.isdigit():
        wanted = f"case-{int(wanted):04d}"
    for case in cases:
        if case.case_id == wanted:
            return case
    ids = [c.case_id for c in cases]
    span = f"{ids[0]} .. {ids[-1]}" if ids else "none loaded"
    raise ValueError(f"no case {case_id!r} (valid ids: {span})")


def _llm_client(args: argparse.Namespace) -> Any:
    """An OpenAI-compatible client from the flags (engine-group clients need a cluster: use the trainer)."""
    if not (args.llm_base_url and args.llm_model):
        raise ValueError("--backend llm needs --llm-base-url and --llm-model (an OpenAI-compatible endpoint)")
    from verimed.core.rollout.openai_client import OpenAIClient

    return OpenAIClient(args.llm_base_url, args.llm_model, role="simulator")


def _independent_audits(cases: list, backend: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The independent audit (``verimed.core.eval.sim_audit``): dev and held-out probes on ``cases``, and the
    held-out probes on the 12 held-out cases nobody tuned on. Sessions are built here, so the audit
    package never imports the simulator."""
    from verimed.core.data import shipped
    from verimed.core.data.cases import load_cases
    from verimed.core.eval.sim_audit.runner import run_independent_audit
    from verimed.core.simulator.persona import sample_persona
    from verimed.core.simulator.session import PatientSimulator

    def new_session(case):
        return PatientSimulator(case, sample_persona(args.seed, case, args.persona), backend, 60)

    heldout_cases, _ = load_cases(shipped(HELDOUT_CASES))
    runs = {"dev probes, shipped cases": (cases, "dev"), "held-out probes, shipped cases": (cases, "heldout"),
            "held-out probes, held-out cases": (heldout_cases, "heldout")}
    return {title: asyncio.run(run_independent_audit(cs, split, new_session)) for title, (cs, split) in runs.items()}


HELDOUT_CASES = "sim_audit_heldout_cases.jsonl"  # original cases written for the audit (verimed/data/NOTICE.md)


def run(args: argparse.Namespace, *, llm: Any = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Execute ``verimed simulate``; returns the exit status (2 on a usage error)."""
    import msgspec

    from verimed.core.config import SimulatorConfig
    from verimed.core.data.cases import load_cases
    from verimed.core.eval.sim_audit.runner import format_independent
    from verimed.core.simulator.audit import format_report, run_audit
    from verimed.core.simulator.factory import make_backend
    from verimed.cli.interactive import play
    from verimed.core.simulator.persona import sample_persona, validate_mbti
    from verimed.core.simulator.session import PatientSimulator

    out = stdout or sys.stdout
    try:
        if args.persona:
            validate_mbti(args.persona)
        if (args.audit is None) == (args.case is None):
            raise ValueError("give exactly one of --audit N or --case ID")
        cases, loaded = load_cases(args.cases_path, skip_invalid=args.skip_invalid)
        if loaded.skipped:
            out.write(f"skipped {loaded.skipped} malformed case record(s): {loaded.errors[0]}\n")
        if args.backend == "llm" and llm is None:
            llm = _llm_client(args)
        backend = make_backend(SimulatorConfig(backend=args.backend), llm)
        if args.audit is not None:
            if args.audit < 0:
                raise ValueError(f"--audit N must be >= 0, got {args.audit}")
            chosen = cases if args.audit == 0 else cases[: args.audit]
            report = asyncio.run(run_audit(chosen, backend, seed=args.seed, mbti=args.persona))
            out.write(format_report(report) + "\n\n")
            independent = _independent_audits(chosen, backend, args)
            for title, r in independent.items():
                out.write(format_independent(r, title) + "\n")
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(
                    {"old": report, "independent": independent})))
                out.write(f"wrote {args.json}\n")
            return 0
        case = find_case(cases, args.case)
        persona = sample_persona(args.seed, case, args.persona)
        sim = PatientSimulator(case, persona, backend, args.max_turns)
        return asyncio.run(play(sim, args.explain, stdin, out))
    except ValueError as exc:
        (sys.stderr if stdout is None else out).write(f"verimed simulate: error: {exc}\n")
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verimed simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
