"""``verimed eval healthbench``: sample a policy on HealthBench conversations,
grade every rubric item, and score exactly as the reference (simple-evals).

    verimed eval healthbench --data FILE --policy smollm2 --grader rules --limit 20 --out runs/hb
    python -m verimed.cli.eval --grader vllm:smollm2 --limit 2     # same thing

``--data`` takes the official full / hard / consensus JSONL files (default: the
50 shipped examples). ``--grader`` is ``rules`` (deterministic, CPU),
``vllm:MODEL`` (an in-process vLLM engine; MODEL is a local HF dir or
"smollm2") or ``openai:MODEL`` (an OpenAI-compatible endpoint: ``--grader-url``,
key from ``$OPENAI_API_KEY``). Outputs under ``--out``: ``responses.jsonl``
(sampled replies), ``gradings.jsonl`` (one line per graded example, appended as
they finish), ``items.jsonl`` (one line per rubric item with the raw judge
output), ``results.json`` and ``report.md``. ``--resume`` re-uses finished
responses and gradings. Ray-free; heavy imports happen after argument parsing.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Sequence

import msgspec

from verimed.core.eval.healthbench import EvalSettings, evaluate_healthbench, fmt_score


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="HealthBench JSONL (full/hard/consensus); default: 50 shipped examples")
    parser.add_argument("--policy", default="smollm2", help='policy model: local HF dir or "smollm2"')
    parser.add_argument("--grader", default="rules", help="rules | vllm:MODEL | openai:MODEL")
    parser.add_argument("--grader-url", default="https://api.openai.com/v1", help="base URL for openai:MODEL")
    parser.add_argument("--out", default="runs/eval_healthbench", help="output directory")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--resume", action="store_true", help="re-use responses and gradings already in --out")
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm", help="policy sampling backend")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=256, help="policy response tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="policy temperature (0 = greedy)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="engine context (prompt + response)")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="vLLM KV-cache bound per engine")
    parser.add_argument("--judge-retries", type=int, default=2, help="re-asks on unparseable grader output")
    parser.add_argument("--judge-max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per engine / grader endpoint")
    parser.add_argument("--grader-timeout", type=float, default=120.0, help="openai grader: seconds per request")
    parser.add_argument("--grader-retries", type=int, default=4,
                        help="openai grader: retries of 429/5xx/timeouts/resets/malformed replies")
    parser.add_argument("--grader-backoff", type=float, default=0.5, help="openai grader: first backoff in seconds")
    parser.add_argument("--judge-cache", default=None,
                        help="openai grader: JSONL answer cache; re-grading the same completions costs no call")
    parser.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap / sampling seed")
    parser.add_argument("--worst", type=int, default=5, help="lowest-scoring examples shown in the report")
    parser.add_argument("--no-progress", action="store_true")


def _check_args(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_tokens < 1 or args.max_model_len <= args.max_tokens:
        raise ValueError("--max-tokens must be >= 1 and smaller than --max-model-len")
    if args.grader != "rules" and not args.grader.startswith(("vllm:", "openai:")):
        raise ValueError(f"--grader must be rules, vllm:MODEL or openai:MODEL, got {args.grader!r}")
    if args.grader_timeout <= 0 or args.grader_retries < 0 or args.grader_backoff <= 0:
        raise ValueError("--grader-timeout and --grader-backoff must be > 0, --grader-retries >= 0")
    if args.grader.endswith(":"):
        raise ValueError(f"--grader {args.grader!r}: missing model name after ':'")


def _progress(total: int, desc: str, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=disable or None, file=sys.stderr)


def settings_of(args: argparse.Namespace) -> EvalSettings:
    """The flags as :class:`EvalSettings` (every settings field is a flag of the same name)."""
    return EvalSettings(**{f.name: getattr(args, f.name) for f in msgspec.structs.fields(EvalSettings)})


async def _evaluate(args: argparse.Namespace) -> int:
    agg, report = await evaluate_healthbench(settings_of(args), lambda total, desc: _progress(total, desc, args.no_progress))
    print(f"HealthBench overall {fmt_score(agg.overall)} ± {fmt_score(agg.bootstrap_std)} on {agg.n_samples} examples; "
          f"report: {report}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point for ``verimed eval healthbench`` (after argument parsing)."""
    try:
        _check_args(args)
    except ValueError as exc:
        print(f"verimed: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_evaluate(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verimed eval healthbench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:  # user mistakes (bad file, bad model dir): one line, no traceback
        print(f"verimed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # vLLM's engine processes re-import __main__: keep the guard
    sys.exit(main())
