"""HealthBench evaluation: sample a policy on HealthBench conversations, grade every rubric
item, and score exactly as the reference (simple-evals). The command line is ``verimed eval
healthbench`` (:mod:`verimed.cli.eval`), which documents the flags of :class:`EvalSettings`.

    agg, report = await evaluate_healthbench(EvalSettings(grader="rules", limit=20), progress)

Outputs under ``settings.out``: ``responses.jsonl`` (sampled replies),
``gradings.jsonl`` (one line per graded example, appended as they finish),
``items.jsonl`` (one line per graded rubric item with the raw judge output),
``results.json`` (with the grader client's counters) and ``report.md``; ``resume`` re-uses finished responses and
gradings. Ray-free; torch / vLLM are imported only when an engine starts.
"""
from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec

from verimed.core.data.healthbench import HealthBenchExample, load_healthbench
from verimed.core.eval.audit import check_judgements, item_lines
from verimed.core.rubrics.scoring import Aggregate, aggregate, example_metrics, response_score
from verimed.core.types import Judgement


class EvalSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What ``verimed eval healthbench`` was asked to do (its flags, checked by :mod:`verimed.cli.eval`)."""

    data: str | None = None  # HealthBench JSONL; None = the 50 shipped examples
    policy: str = "smollm2"  # local HF dir or "smollm2"
    grader: str = "rules"  # rules | vllm:MODEL | openai:MODEL
    grader_url: str = "https://api.openai.com/v1"
    out: str = "runs/eval_healthbench"
    limit: int | None = None
    resume: bool = False
    engine: str = "vllm"  # vllm | transformers
    dtype: str = "bfloat16"
    max_tokens: int = 256
    temperature: float = 0.0
    max_model_len: int = 4096
    kv_cache_mb: int = 512
    judge_retries: int = 2
    judge_max_tokens: int = 256
    concurrency: int = 32
    grader_timeout: float = 120.0  # seconds per openai grader request
    grader_retries: int = 4  # openai grader: retries of 429/5xx/timeouts/resets/malformed replies
    grader_backoff: float = 0.5  # openai grader: first retry's backoff (seconds)
    judge_cache: str | None = None  # openai grader: JSONL answer cache (re-grading costs no call)
    skip_invalid: bool = False
    seed: int = 0
    worst: int = 5


Progress = Callable[[int, str], Any]  # (total, description) -> a context manager with .update(n)


# ------------------------------------------------------------------ engines


class Engines:
    """Local engines by (backend, model), started lazily and shared: ``--grader
    vllm:M`` with policy M on vLLM re-uses the policy's engine (one start)."""

    def __init__(self, settings: EvalSettings):
        self.settings = settings
        self._live: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, model: str, backend: str) -> tuple[Any, Any]:
        """(engine, tokenizer); torch / vllm are imported here, not at module import."""
        from verimed.core.rollout.engines import TransformersEngine, VLLMEngine
        from verimed.core.models import load_tokenizer, resolve_model_path

        key = (backend, model)
        if key not in self._live:
            settings, path = self.settings, resolve_model_path(model)
            if backend == "transformers":
                engine = TransformersEngine(path, dtype="float32", seed=settings.seed)
            else:
                engine = VLLMEngine(path, dtype=settings.dtype, max_model_len=settings.max_model_len,
                                    kv_cache_bytes=settings.kv_cache_mb * 2**20, max_num_seqs=settings.concurrency,
                                    enforce_eager=True, seed=settings.seed)
            self._live[key] = (engine, load_tokenizer(path))
        return self._live[key]

    def release(self, keep: tuple[str, str] | None = None) -> None:
        for key in [k for k in self._live if k != keep]:
            self._live.pop(key)[0].shutdown()
        gc.collect()  # let vLLM's finaliser run now, not at interpreter teardown


def fit_messages(tokenizer: Any, messages: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """Drop the oldest non-system turns (then trim the oldest text) until the
    chat-templated prompt fits ``budget`` tokens; the last user turn is kept."""
    from verimed.core.models import apply_chat_template

    msgs = [dict(m) for m in messages]
    while len(apply_chat_template(tokenizer, msgs)) > budget:
        droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
        if droppable:
            msgs.pop(droppable[0])
            continue
        last = msgs[-1]
        if len(last["content"]) < 64:
            break
        last["content"] = last["content"][len(last["content"]) // 4:]  # keep the end, where the question is
    return msgs


async def sample_policy(examples: Sequence[HealthBenchExample], settings: EvalSettings, engines: Engines,
                        progress: Any) -> dict[str, str]:
    """prompt_id -> the policy's reply to that example's conversation."""
    from verimed.core.rollout.llm import EngineClient

    engine, tokenizer = engines.get(settings.policy, settings.engine)
    client = EngineClient(engine, tokenizer)
    slots = asyncio.Semaphore(settings.concurrency)
    budget = settings.max_model_len - settings.max_tokens

    async def one(ex: HealthBenchExample) -> tuple[str, str]:
        messages = fit_messages(tokenizer, [{"role": t.role, "content": t.content} for t in ex.messages], budget)
        async with slots:
            text = await client.chat(messages, max_tokens=settings.max_tokens, temperature=settings.temperature)
        progress.update(1)
        return ex.prompt_id, text

    return dict(await asyncio.gather(*(one(ex) for ex in examples)))


def _make_judge(settings: EvalSettings, engines: Engines) -> Any:
    """The judge for ``--grader`` (local engines come from ``engines``)."""
    from verimed.core.rubrics.judge import LLMJudge
    from verimed.core.rubrics.rules import RulesJudge

    if settings.grader == "rules":
        return RulesJudge()
    kind, _, model = settings.grader.partition(":")
    if kind == "openai":
        from verimed.core.rollout.openai_client import OpenAIClient

        client: Any = OpenAIClient(settings.grader_url, model, role="judge", max_tokens=settings.judge_max_tokens,
                                   max_concurrency=settings.concurrency, timeout_s=settings.grader_timeout,
                                   max_retries=settings.grader_retries, backoff_base_s=settings.grader_backoff,
                                   cache_path=settings.judge_cache, seed=settings.seed)
    else:
        from verimed.core.rollout.llm import EngineClient

        engine, tokenizer = engines.get(model, "vllm")
        budget = settings.max_model_len - settings.judge_max_tokens
        client = _TruncatingClient(EngineClient(engine, tokenizer), tokenizer, budget)
    return LLMJudge(client, max_retries=settings.judge_retries, max_tokens=settings.judge_max_tokens,
                    concurrency=settings.concurrency)


class _TruncatingClient:
    """Keeps judge prompts within a local engine's context (long HealthBench chats)."""

    def __init__(self, inner: Any, tokenizer: Any, budget: int):
        self.inner, self.tokenizer, self.budget = inner, tokenizer, budget

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None) -> str:
        messages = fit_messages(self.tokenizer, messages, self.budget)
        return await self.inner.chat(messages, max_tokens=max_tokens, temperature=temperature, affinity_key=affinity_key)


# ------------------------------------------------------------------ grading


class Grading(msgspec.Struct):
    """One graded example: a line of gradings.jsonl."""

    prompt_id: str
    response: str
    score: float | None
    metrics: dict[str, float]
    judgements: list[Judgement]
    example_tags: list[str]
    missing_judgements: int = 0  # items the judge returned nothing for (graded as ungradable)
    duplicate_judgements: int = 0  # extra judgements for one item (merged, or ungradable when they disagree)


async def grade_all(examples: Sequence[HealthBenchExample], responses: dict[str, str], judge: Any,
                    sink: Any, progress: Any, items_sink: Any = None) -> list[Grading]:
    encoder = msgspec.json.Encoder()

    async def one(ex: HealthBenchExample) -> Grading:
        response = responses[ex.prompt_id]
        judgements, missing, duplicates = check_judgements(ex.rubric, await judge.judge(ex.messages, response, ex.rubric))
        grading = Grading(ex.prompt_id, response, response_score(ex.rubric, judgements),
                          example_metrics(ex.rubric, judgements, ex.example_tags), judgements, ex.example_tags,
                          missing, duplicates)
        if items_sink is not None:
            items_sink.writelines(item_lines(ex.prompt_id, ex.rubric, judgements))
            items_sink.flush()
        sink.write(encoder.encode(grading).decode() + "\n")
        sink.flush()  # a crash keeps every finished grading for --resume
        progress.update(1)
        return grading

    return list(await asyncio.gather(*(one(ex) for ex in examples)))


def _read_jsonl(path: Path, kind: type) -> list[Any]:
    if not path.is_file():
        return []
    decoder = msgspec.json.Decoder(kind)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(decoder.decode(line))
            except msgspec.DecodeError:  # a line cut by a crash: grade that example again
                continue
    return out


class _Response(msgspec.Struct):
    prompt_id: str
    response: str


# ------------------------------------------------------------------ reporting


def fmt_score(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def _table(title: str, stats: dict[str, Any]) -> list[str]:
    if not stats:
        return []
    lines = [f"## {title}", "", "| name | score | bootstrap std | n |", "|---|---|---|---|"]
    lines += [f"| {k} | {fmt_score(v.mean)} | {fmt_score(v.bootstrap_std)} | {v.n_samples} |" for k, v in stats.items()]
    return lines + [""]


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit] + " ..."


def render_report(agg: Aggregate, gradings: Sequence[Grading], examples: dict[str, HealthBenchExample],
                  settings: dict[str, Any], worst: int) -> str:
    ungradable = sum(j.met is None for g in gradings for j in g.judgements)
    items = sum(len(g.judgements) for g in gradings)
    lines = [
        "# HealthBench evaluation", "",
        *(f"- {k}: `{v}`" for k, v in settings.items()),
        f"- examples graded: {len(gradings)} (scored {agg.n_samples}, undefined score {agg.n_unscored})",
        f"- rubric items graded: {items} (ungradable, left out of normalisers: {ungradable}; of which the judge "
        f"returned none: {sum(g.missing_judgements for g in gradings)}; duplicate judgements: "
        f"{sum(g.duplicate_judgements for g in gradings)})", "",
        f"**Overall score: {fmt_score(agg.overall)} ± {fmt_score(agg.bootstrap_std)}** (mean clipped to [0, 1], "
        "bootstrap std over 1,000 resamples)", "",
    ]
    lines += _table("Axes", agg.by_prefix("axis:"))
    lines += _table("Themes", agg.by_prefix("theme:"))
    lines += _table("Clinical dimensions", agg.by_prefix("dimension:"))
    scored = sorted((g for g in gradings if g.score is not None), key=lambda g: g.score)
    if scored:
        lines += [f"## Lowest-scoring examples ({min(worst, len(scored))})", ""]
    for g in scored[:worst]:
        ex = examples[g.prompt_id]
        last_user = next((t.content for t in reversed(ex.messages) if t.role == "user"), "")
        lines += [f"### {g.prompt_id}: {g.score:.3f}", "", f"- user: {_short(last_user)}",
                  f"- response: {_short(g.response)}"]
        for j in g.judgements:
            item = ex.rubric[j.item_index]
            bad = (item.points > 0 and j.met is False) or (item.points < 0 and j.met is True)
            if bad:
                lines.append(f"- {'missed' if item.points > 0 else 'penalised'} [{item.points:+d}] {_short(item.criterion, 160)}")
        lines.append("")
    return "\n".join(lines)


def results_dict(agg: Aggregate, gradings: Sequence[Grading], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "overall": agg.overall,
        "bootstrap_std": agg.bootstrap_std,
        "n_samples": agg.n_samples,
        "n_unscored": agg.n_unscored,
        "ungradable_items": sum(j.met is None for g in gradings for j in g.judgements),
        "graded_items": sum(j.met is not None for g in gradings for j in g.judgements),
        "missing_judgements": sum(g.missing_judgements for g in gradings),
        "duplicate_judgements": sum(g.duplicate_judgements for g in gradings),
        "metrics": msgspec.to_builtins(agg.metrics),
        "examples": [{"prompt_id": g.prompt_id, "score": g.score} for g in gradings],
    }


# ------------------------------------------------------------------ driver


async def evaluate_healthbench(settings: EvalSettings, progress: Progress) -> tuple[Aggregate, Path]:
    """Sample, grade and score; writes responses, gradings, results.json and report.md under ``settings.out``."""
    examples, report = load_healthbench(settings.data, skip_invalid=settings.skip_invalid)
    if settings.limit is not None:
        examples = examples[: settings.limit]
    if not examples:
        raise ValueError(f"{report.path}: no examples to evaluate")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if not settings.resume:
        for name in ("responses.jsonl", "gradings.jsonl", "items.jsonl"):
            (out / name).unlink(missing_ok=True)
    engines = Engines(settings)
    try:
        return await _sample_and_grade(settings, examples, report.path, report.skipped, out, engines, progress)
    finally:
        engines.release()


async def _sample_and_grade(settings: EvalSettings, examples: list[HealthBenchExample], data_path: str,
                            skipped: int, out: Path, engines: Engines,
                            progress: Progress) -> tuple[Aggregate, Path]:
    """Phases: re-use finished work, sample the rest, grade the rest, aggregate, report."""
    started = time.perf_counter()
    by_id = {ex.prompt_id: ex for ex in examples}
    responses_path, gradings_path = out / "responses.jsonl", out / "gradings.jsonl"
    responses = {r.prompt_id: r.response for r in _read_jsonl(responses_path, _Response) if r.prompt_id in by_id}
    done = {g.prompt_id: g for g in _read_jsonl(gradings_path, Grading) if g.prompt_id in by_id}
    todo = [ex for ex in examples if ex.prompt_id not in responses and ex.prompt_id not in done]
    if todo:
        with progress(len(todo), "sampling") as bar:
            fresh = await sample_policy(todo, settings, engines, bar)
        grader_model = settings.grader.partition(":")[2] if settings.grader.startswith("vllm:") else None
        engines.release(keep=("vllm", grader_model) if grader_model else None)
        with responses_path.open("a", encoding="utf-8") as f:
            for pid, text in fresh.items():
                f.write(json.dumps({"prompt_id": pid, "response": text}) + "\n")
        responses.update(fresh)
    for pid, g in done.items():
        responses.setdefault(pid, g.response)

    to_grade = [ex for ex in examples if ex.prompt_id not in done]
    llm_stats: dict[str, int] = {}
    if to_grade:
        judge = _make_judge(settings, engines)
        with gradings_path.open("a", encoding="utf-8") as sink, (out / "items.jsonl").open("a", encoding="utf-8") \
                as items_sink, progress(len(to_grade), "grading") as bar:
            for g in await grade_all(to_grade, responses, judge, sink, bar, items_sink):
                done[g.prompt_id] = g
        llm_stats = {**getattr(judge, "stats", {}), **{f"client_{k}": v for k, v in
                                                       getattr(getattr(judge, "llm", None), "stats", {}).items()}}
    gradings = [done[ex.prompt_id] for ex in examples]
    agg = aggregate([g.metrics for g in gradings], seed=settings.seed)
    shown = {"data": data_path, "policy": settings.policy, "grader": settings.grader, "engine": settings.engine,
             "max_tokens": settings.max_tokens, "temperature": settings.temperature, "examples": len(examples),
             "skipped_records": skipped, "resumed_gradings": len(examples) - len(to_grade),
             "seconds": round(time.perf_counter() - started, 1)}
    results = {**results_dict(agg, gradings, shown), "judge_stats": llm_stats}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_report(agg, gradings, by_id, shown, settings.worst))
    return agg, out / "report.md"
