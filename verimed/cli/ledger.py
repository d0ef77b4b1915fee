"""``verimed ledger RUN_DIR``: the exactly-once check of a run (no sample trained twice, no draw lost)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (runs/<name>) with ledger.jsonl and checkpoints/")


def run(args: argparse.Namespace) -> int:
    from verimed.core.train.ledger_check import check_exactly_once

    try:
        report = check_exactly_once(Path(args.run_dir))
    except ValueError as exc:
        print(f"verimed: error: {exc}")
        return 2
    print(report.summary())
    return 0 if report.ok else 1
