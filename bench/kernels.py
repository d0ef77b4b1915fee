"""Benchmark and check verimed's kernels: fused_logprob vs naive torch, torch.compile, Liger and the GEMM floor.

    python bench/kernels.py                 # CUDA: checks, then the timing table -> bench/RESULTS.md
    python bench/kernels.py --check-only    # correctness only (what it does on CPU anyway)
    python bench/kernels.py --shapes 8192,5120,152064 --repeats 5 --no-compile
    TRITON_INTERPRET=1 python bench/kernels.py --skip-checks --time-on-cpu --shapes 48,32,300 \
        --repeats 1 --dtype float16 --advantages 64 --results -    # CPU smoke of the timing code

Needs only torch (+ triton on CUDA; Liger-Kernel for its rows, carried as a wheel):
GPU hosts have nothing else. On CUDA it times, per (N, H, V) in bf16, forward and
forward+backward (median of repeats, CUDA events) and the peak extra memory above
the inputs of: the fused Triton kernel (log-prob + entropy), the naive path (logits
-> fp32 log_softmax -> gather, entropy from the same), torch.compile of that naive
path and Liger-Kernel's fused linear cross entropy (loss only, no entropy), next to
the 3-GEMM floor timed at the same shape (logits, grad-input, grad-weight in cuBLAS);
then the targets (fused faster than compile and Liger, <= 1 GiB workspace) and the
advantage kernel at 1M samples in groups of 16 against vectorised torch. On CPU it
checks the torch reference (and the Triton kernels when TRITON_INTERPRET=1) against
a float64 reference.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from verimed.kernels import fused_logprob, grpo_advantages  # noqa: E402
from verimed.kernels.fused_logprob import naive_logprob  # noqa: E402

PAPER_SHAPES = [(8192, 5120, 152064), (16384, 4096, 151936), (32768, 2048, 151936)]
GiB = 2**30


# ------------------------------------------------------------------ correctness


def _rel(x, y) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


def check_logprob(device: str, backend: str, shapes, dtype=torch.float32, tol=1e-5, **triton_opts) -> list[str]:
    """Outputs and gradients of fused_logprob vs the float64 naive path; returns failures.

    ``triton_opts`` (v_per_split, dz_chunk_cols) call the Triton path directly with
    small splits / chunks, so the split combine and the d_hidden accumulation over
    backward chunks are checked at shapes where the defaults would use one of each.
    """
    failures = []
    for n, h, v in shapes:
        gen = torch.Generator().manual_seed(n * 31 + v)
        hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(device)
        weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.25).to(device)
        targets = torch.randint(0, v, (n,), generator=gen).to(device)
        if n > 2:
            targets[1] = -100
        g1, g2 = torch.randn(n, generator=gen, dtype=torch.float64).to(device), torch.randn(n, generator=gen, dtype=torch.float64).to(device)
        hx, wx = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        h64, w64 = hx.detach().double().requires_grad_(), wx.detach().double().requires_grad_()
        lp64, ent64 = naive_logprob(h64, w64, targets, 0.8)
        (lp64 * g1 + ent64 * g2).sum().backward()
        if triton_opts:
            from verimed.kernels.fused_logprob_triton import fused_logprob_triton

            lp, ent = fused_logprob_triton(hx, wx, targets, 0.8, **triton_opts)
        else:
            lp, ent = fused_logprob(hx, wx, targets, 0.8, backend=backend)
        (lp * g1.float() + ent * g2.float()).sum().backward()
        errs = {"logprob": _rel(lp, lp64), "entropy": _rel(ent, ent64), "d_hidden": _rel(hx.grad, h64.grad), "d_weight": _rel(wx.grad, w64.grad)}
        worst = max(errs, key=errs.get)
        status = "ok" if errs[worst] <= tol else "FAIL"
        opts = "".join(f", {k}={x}" for k, x in triton_opts.items())
        print(f"  fused_logprob[{backend}, {str(dtype).split('.')[-1]}{opts}] N={n} H={h} V={v}: worst rel err {worst} {errs[worst]:.2e} (tol {tol:g}) {status}")
        if status != "ok":
            failures.append(f"fused_logprob {backend} {dtype} {(n, h, v)} {worst}={errs[worst]:.2e}")
    return failures


def check_advantages(device: str, backend: str) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 17, (64,), generator=gen)
    n_seq = int(sizes.sum())
    cu_groups = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(device)
    scores = (torch.randint(0, 6, (n_seq,), generator=gen) / 5.0).to(device)
    lengths = torch.randint(1, 400, (n_seq,), generator=gen).to(device)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(0, 50, (n_seq,), generator=gen).cumsum(0)]).to(device)
    failures = []
    for mode in ("mean", "std", "none"):
        got = grpo_advantages(scores, cu_groups, lengths, cu_seqlens, mode, backend=backend)
        want = grpo_advantages(scores.cpu(), cu_groups.cpu(), lengths.cpu(), cu_seqlens.cpu(), mode, backend="torch")
        err = (got.cpu() - want).abs().max().item() if want.numel() else 0.0
        status = "ok" if err <= 1e-4 else "FAIL"
        print(f"  grpo_advantages[{backend}] mode={mode}: max abs err {err:.2e} {status}")
        if status != "ok":
            failures.append(f"grpo_advantages {backend} {mode} err={err:.2e}")
    return failures


def run_checks(device: str, triton_backend: bool) -> list[str]:
    small = [(1, 16, 37), (7, 24, 100), (37, 64, 257)]
    print(f"correctness on {device}:")
    failures = check_logprob(device, "torch", small)
    if triton_backend:
        failures += check_logprob(device, "triton", small)
        if device == "cuda":
            failures += check_logprob(device, "triton", [(513, 512, 32011), (64, 1024, 151936)])
            failures += check_logprob(device, "triton", [(257, 256, 5003)], dtype=torch.bfloat16, tol=2e-3)
            chunked = dict(v_per_split=1024, dz_chunk_cols=768)  # 5 splits, 7 backward chunks
            failures += check_logprob(device, "triton", [(300, 256, 5003)], **chunked)
            failures += check_logprob(device, "triton", [(300, 256, 5003)], dtype=torch.bfloat16, tol=2e-3, **chunked)
        failures += check_advantages(device, "triton")
    return failures


# ------------------------------------------------------------------ timing
# Everything below runs on CUDA for the figures; on CPU (``--device cpu``, with
# TRITON_INTERPRET=1) the same code runs at toy shapes as a smoke test: wall-clock
# times, no memory figures.


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, warmup: int = 2, device: str = "cuda") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_gib(fn, device: str, result_bytes=lambda: 0) -> float | None:
    """Peak allocated above what was allocated before ``fn``, less ``result_bytes()`` after it (None on CPU)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - result_bytes()) / GiB


def matmul_tflops(repeats: int = 10) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, repeats, warmup=3)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def gemm_floor_ms(n: int, h: int, v: int, repeats: int, device: str, dtype=torch.bfloat16) -> tuple[float, float]:
    """(fwd, fwd+bwd) ms of the LM head's GEMMs alone (bf16 by default): logits = X·Wᵀ [N, V];
    backward dX = dZ·W [N, H] and dW = dZᵀ·X [V, H]. No softmax, no extra pass: any
    log-prob head needs at least these three products."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, h, device=device, generator=gen).to(dtype)
    w = torch.randn(v, h, device=device, generator=gen).to(dtype)
    dz = torch.randn(n, v, device=device, generator=gen).to(dtype)
    logits = _median_ms(lambda: x @ w.T, repeats, device=device)
    d_x = _median_ms(lambda: dz @ w, repeats, device=device)
    d_w = _median_ms(lambda: dz.T @ x, repeats, device=device)
    del x, w, dz
    if device == "cuda":
        torch.cuda.empty_cache()
    return logits, logits + d_x + d_w


def _naive(hidden, weight, targets):
    return naive_logprob(hidden, weight, targets, 1.0)


def _fused(hidden, weight, targets):
    return fused_logprob(hidden, weight, targets, 1.0, backend="triton")


def liger_methods() -> dict:
    """Liger-Kernel's fused linear cross entropy, when installed (carried as a wheel to GPU hosts).

    It computes the loss -logprob only, no entropy: ``sum`` is its fast path (the
    gradients are computed in the forward); ``none`` returns per-token losses, what a
    per-token policy-gradient weight needs (its backward recomputes the chunks).
    The zero entropy returned here costs nothing and carries no gradient.
    """
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        print(f"  Liger-Kernel not importable ({exc}): its rows are left out")
        return {}

    def make(reduction):
        def liger(hidden, weight, targets):
            loss = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction=reduction)
            return -loss, torch.zeros((), device=hidden.device)
        return liger

    return {"liger FLCE sum (no entropy)": make("sum"), "liger FLCE none (no entropy)": make("none")}


def bench_method(fn, hidden, weight, targets, g_lp, g_ent, repeats, device):
    """(fwd ms, fwd+bwd ms, fwd GiB, fwd+bwd GiB, logprob) or None entries on OOM.

    fwd+bwd GiB leaves out the hidden and weight grads themselves (1.5 GiB at the
    first paper shape), which every method must return: it is the workspace.
    """
    def fwd():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    def fwd_bwd():
        hidden.grad = weight.grad = None
        lp, ent = fn(hidden, weight, targets)
        (lp * g_lp + ent * g_ent).sum().backward()

    def grad_bytes():
        return sum(g.numel() * g.element_size() for g in (hidden.grad, weight.grad) if g is not None)

    out = {}
    for name, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        try:
            step()  # compile / autotune (Triton's benchmarking buffers) before measuring memory
            hidden.grad = weight.grad = None
            out[name + "_gib"] = _peak_extra_gib(step, device, grad_bytes if name == "fwd_bwd" else lambda: 0)
            out[name + "_ms"] = _median_ms(step, repeats, device=device)
        except torch.cuda.OutOfMemoryError:
            out[name + "_gib"] = out[name + "_ms"] = "OOM"
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    try:
        lp = fwd()[0]
        out["logprob"] = lp if lp.dim() == 1 else None  # a summed loss has no per-token values
    except torch.cuda.OutOfMemoryError:
        out["logprob"] = None
    return out


def bench_shape(n, h, v, repeats, use_compile, use_liger, device="cuda", dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    g_lp, g_ent = torch.randn(n, device=device, generator=gen), torch.randn(n, device=device, generator=gen)
    methods = {"fused (triton)": _fused, "naive torch": _naive}
    if use_compile:
        torch._dynamo.reset()
        methods["torch.compile(naive)"] = torch.compile(_naive, dynamic=False)
    if use_liger:
        methods.update(liger_methods())
    rows = {}
    for name, fn in methods.items():
        rows[name] = bench_method(fn, hidden, weight, targets, g_lp, g_ent, repeats, device)
        print(f"    {name}: {_fmt_row(rows[name])}", flush=True)
    fused_lp = rows["fused (triton)"]["logprob"]
    for r in rows.values():
        other = r.pop("logprob")
        r["max_abs_diff"] = None if other is None or fused_lp is None else (other.float() - fused_lp).abs().max().item()
    del hidden, weight
    if device == "cuda":
        torch.cuda.empty_cache()
    floor = gemm_floor_ms(n, h, v, repeats, device, dtype)
    print(f"    3-GEMM floor: fwd {floor[0]:.2f} ms, fwd+bwd {floor[1]:.2f} ms", flush=True)
    return rows, floor


def _f(x, spec):
    """A figure, "OOM" (ran out of memory) or "-" (not measured: memory on CPU)."""
    return "-" if x is None else x if isinstance(x, str) else format(x, spec)


def _ms(x) -> float | None:
    return x if isinstance(x, float) else None


def _fmt_row(r):
    return (f"fwd {_f(r.get('fwd_ms'), '.2f')} ms / {_f(r.get('fwd_gib'), '.2f')} GiB, "
            f"fwd+bwd {_f(r.get('fwd_bwd_ms'), '.2f')} ms / {_f(r.get('fwd_bwd_gib'), '.2f')} GiB")


def tuned_configs_line() -> str:
    """The tiles Triton's autotuner chose per hidden size (a diagnostic for the next tuning pass)."""
    from verimed.kernels import fused_logprob_triton as ft

    fwd, bwd = ft._kernels("tuned")
    chosen = [f"{name} {key[0]}: {cfg}" for name, kern in (("fwd", fwd), ("bwd_dz", bwd))
              for key, cfg in getattr(kern, "cache", {}).items()]
    return "\nAutotuned tiles (by H): " + ("; ".join(chosen) or "none recorded") + "\n"


WORKSPACE_LIMIT_GIB = 1.0


def verdicts(results) -> list[str]:
    """The issue's targets per shape: fused fwd+bwd faster than torch.compile and than Liger's
    fused linear CE (its fast ``sum`` path), with <= 1 GiB workspace beyond the gradients."""
    lines = []
    for (n, h, v), (rows, floor) in results.items():
        fused = rows["fused (triton)"]
        ms, gib = _ms(fused["fwd_bwd_ms"]), _ms(fused["fwd_bwd_gib"])
        parts, ok = [], ms is not None
        for rival in ("torch.compile(naive)", "liger FLCE sum (no entropy)"):
            other = rows.get(rival, {}).get("fwd_bwd_ms")  # "OOM" counts as slower
            if rival not in rows:
                parts.append(f"{rival}: not timed")
                continue
            faster = ms is not None and (_ms(other) is None or ms < other)
            ok &= faster
            parts.append(f"vs {rival} {_f(other, '.2f')} ms: {'faster' if faster else 'NOT faster'}")
        if gib is not None:
            ok &= gib <= WORKSPACE_LIMIT_GIB
            parts.append(f"workspace {gib:.2f} GiB ({'<=' if gib <= WORKSPACE_LIMIT_GIB else '>'} {WORKSPACE_LIMIT_GIB:g})")
        ratio = "" if ms is None else f", {ms / floor[1]:.2f}x the 3-GEMM floor"
        lines.append(f"- N,H,V = {n},{h},{v}: fused fwd+bwd {_f(ms, '.2f')} ms{ratio}; " + "; ".join(parts)
                     + (" -> PASS" if ok else " -> FAIL"))
    return lines


def markdown_table(results, tflops, gpu, header) -> str:
    lines = [header, "", f"bf16 matmul rate measured: {tflops:.0f} TFLOP/s (8192^3 GEMM). The 3-GEMM floor is timed at each shape: "
             "logits X·Wᵀ (fwd), plus dZ·W and dZᵀ·X (fwd+bwd), cuBLAS bf16.",
             "Peak extra memory = max allocated above the inputs; fwd+bwd leaves out the hidden/weight grads every method "
             "returns (the workspace). Liger's fused linear CE computes the loss only (no entropy); its `sum` path "
             "computes the gradients inside the forward (its fwd figures include them).", "",
             "| N, H, V | method | fwd ms | fwd+bwd ms | × floor | fwd extra GiB | fwd+bwd extra GiB | max abs Δlogp vs fused |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (n, h, v), (rows, floor) in results.items():
        lines.append(f"| {n}, {h}, {v} | 3-GEMM floor | {floor[0]:.2f} | {floor[1]:.2f} | 1.00 | | | |")
        for name, r in rows.items():
            diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            ratio = "" if _ms(r["fwd_bwd_ms"]) is None else f"{r['fwd_bwd_ms'] / floor[1]:.2f}"
            lines.append(f"| {n}, {h}, {v} | {name} | {_f(r['fwd_ms'], '.2f')} | {_f(r['fwd_bwd_ms'], '.2f')} | {ratio} | "
                         f"{_f(r['fwd_gib'], '.2f')} | {_f(r['fwd_bwd_gib'], '.2f')} | {diff} |")
    return "\n".join(lines + ["", "Targets (fused log-prob + entropy, fwd+bwd):"] + verdicts(results)) + "\n"


# ------------------------------------------------------------------ advantages at scale


def advantages_equal_groups_torch(scores, lengths, token_lengths, group_size, mode="mean", length_coef=4.0,
                                  length_threshold=0.5, eps=1e-6):
    """Token advantages for groups of one size, vectorised in torch (the fair baseline at scale;
    the reference in verimed.kernels.advantages loops over groups). Formula: advantages.py."""
    x = scores.float().view(-1, group_size)
    xs = x.sort(dim=1).values
    n1 = group_size - 1
    lo, hi = n1 // 5, min(n1 // 5 + 1, n1)
    q = (xs[:, lo] + ((n1 - 5 * lo) / 5.0) * (xs[:, hi] - xs[:, lo]))[:, None]
    bonus = length_coef / lengths.float().view(-1, group_size).clamp_min(1).sqrt()
    r = x + torch.where((q > length_threshold) & (x >= q), bonus, torch.zeros_like(x))
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "std":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        a = centred / (std + eps)
    elif mode == "mean":
        a = centred
    else:
        a = torch.zeros_like(r)
    return torch.repeat_interleave(a.flatten(), token_lengths)


def bench_advantages(n_samples: int, group_size: int, repeats: int, device: str) -> tuple[list[str], bool]:
    """The Triton advantage kernel vs vectorised torch: checked in every mode, timed in ``mean`` (the paper's)."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    scores = (torch.randint(0, 11, (n_samples,), generator=gen) / 10.0).to(device)
    lengths = torch.randint(1, 1025, (n_samples,), generator=gen).to(device)
    cu_groups = torch.arange(0, n_samples + 1, group_size, device=device)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long, device=device), lengths.cumsum(0)])
    ok, lines = True, []
    for mode in ("mean", "std", "none"):
        got = grpo_advantages(scores, cu_groups, lengths, cu_seqlens, mode, backend="triton")
        want = advantages_equal_groups_torch(scores, lengths, lengths, group_size, mode)
        err = (got - want).abs().max().item()
        ok &= err <= 1e-4
        lines.append(f"mode {mode}: max abs diff triton vs torch {err:.1e} (tol 1e-4)")
        del got, want
    triton_ms = _median_ms(lambda: grpo_advantages(scores, cu_groups, lengths, cu_seqlens, "mean", backend="triton"),
                           repeats, device=device)
    torch_ms = _median_ms(lambda: advantages_equal_groups_torch(scores, lengths, lengths, group_size), repeats,
                          device=device)
    tokens = int(cu_seqlens[-1])
    head = (f"grpo_advantages, {n_samples} samples in groups of {group_size}, {tokens} tokens (response lengths "
            f"1-1024): triton {triton_ms:.2f} ms, vectorised torch {torch_ms:.2f} ms (torch / triton {torch_ms / triton_ms:.3g}); "
            + "; ".join(lines) + (" -> ok" if ok else " -> FAIL"))
    print("  " + head, flush=True)
    return [head], ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-only", action="store_true", help="correctness checks only")
    ap.add_argument("--shapes", nargs="*", help="N,H,V triples (default: the three paper-scale shapes)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel's fused linear CE rows")
    ap.add_argument("--advantages", type=int, default=1 << 20, metavar="SAMPLES",
                    help="samples for the advantage kernel's timing, in groups of 16 (0: skip)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="inputs of the timed shapes (the CPU smoke test uses float16: the interpreter's bf16 dot is wrong)")
    ap.add_argument("--skip-checks", action="store_true", help="time without re-running the correctness checks")
    ap.add_argument("--time-on-cpu", action="store_true",
                    help="run the timing code on CPU (a smoke test at toy --shapes; needs TRITON_INTERPRET=1)")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")), help="'-': append nowhere")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    triton_ok = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    failures = [] if args.skip_checks else run_checks(device, triton_ok)
    if failures:
        print("CHECKS FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed" if not args.skip_checks else "checks skipped")
    if args.check_only or not (cuda or args.time_on_cpu):
        return 0
    if not triton_ok:
        print("timing needs the Triton kernels: CUDA, or TRITON_INTERPRET=1 with --time-on-cpu")
        return 2
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else PAPER_SHAPES
    gpu = torch.cuda.get_device_name() if cuda else "CPU (smoke test: interpreted Triton, wall-clock, no memory figures)"
    tflops = matmul_tflops() if cuda else float("nan")
    print(f"{gpu}: bf16 matmul {tflops:.0f} TFLOP/s")
    results = {}
    for shape in shapes:
        print(f"  shape N,H,V = {shape}", flush=True)
        results[shape] = bench_shape(*shape, args.repeats, not args.no_compile, not args.no_liger, device,
                                     getattr(torch, args.dtype))
    adv_lines, adv_ok = bench_advantages(args.advantages, 16, args.repeats, device) if args.advantages else ([], True)
    import triton

    header = (f"## fused_logprob on {gpu} — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
              f"({args.dtype}, torch {torch.__version__}, triton {triton.__version__}, median of {args.repeats}, "
              f"`python bench/kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}`)")
    table = markdown_table(results, tflops, gpu, header) + tuned_configs_line()
    if adv_lines:
        table += "\n" + "\n".join(adv_lines) + "\n"
    print("\n" + table)
    if args.results != "-":
        with open(args.results, "a") as fh:
            fh.write("\n" + table)
        print(f"appended to {args.results}")
    return 0 if adv_ok else 1


if __name__ == "__main__":
    sys.exit(main())
