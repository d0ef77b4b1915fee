"""Benchmark and check verimed's kernels: fused_logprob vs the naive torch path and torch.compile.

    python bench/kernels.py                 # CUDA: checks, then the timing table -> bench/RESULTS.md
    python bench/kernels.py --check-only    # correctness only (what it does on CPU anyway)
    python bench/kernels.py --shapes 8192,5120,152064 --repeats 5 --no-compile

Needs only torch (+ triton on CUDA): GPU hosts have nothing else. On CUDA it
times, per (N, H, V) in bf16, forward and forward+backward (median of repeats,
CUDA events) and the peak extra memory above the inputs of: the fused Triton
kernel, the naive path (logits -> fp32 log_softmax -> gather, entropy from the
same) and torch.compile of that naive path, next to the matmul floor
(2NHV flops forward, 6NHV forward+backward, at the bf16 GEMM rate measured in
the same run). On CPU it checks the torch reference (and the Triton kernels when
TRITON_INTERPRET=1) against a float64 reference.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
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


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_gib(fn, result_bytes=lambda: 0) -> float:
    """Peak allocated above what was allocated before ``fn``, less ``result_bytes()`` after it."""
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


def _naive(hidden, weight, targets):
    return naive_logprob(hidden, weight, targets, 1.0)


def _fused(hidden, weight, targets):
    return fused_logprob(hidden, weight, targets, 1.0, backend="triton")


def bench_method(fn, hidden, weight, targets, g_lp, g_ent, repeats):
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
            out[name + "_gib"] = _peak_extra_gib(step, grad_bytes if name == "fwd_bwd" else lambda: 0)
            out[name + "_ms"] = _median_ms(step, repeats)
        except torch.cuda.OutOfMemoryError:
            out[name + "_gib"] = out[name + "_ms"] = None
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
    try:
        out["logprob"] = fwd()[0]
    except torch.cuda.OutOfMemoryError:
        out["logprob"] = None
    return out


def bench_shape(n, h, v, repeats, use_compile):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=gen) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)
    methods = {"fused (triton)": _fused, "naive torch": _naive}
    if use_compile:
        torch._dynamo.reset()
        methods["torch.compile(naive)"] = torch.compile(_naive, dynamic=False)
    rows = {}
    for name, fn in methods.items():
        rows[name] = bench_method(fn, hidden, weight, targets, g_lp, g_ent, repeats)
        print(f"    {name}: {_fmt_row(rows[name])}", flush=True)
    fused_lp = rows["fused (triton)"]["logprob"]
    for r in rows.values():
        other = r.pop("logprob")
        r["max_abs_diff"] = None if other is None or fused_lp is None else (other.float() - fused_lp).abs().max().item()
    del hidden, weight
    torch.cuda.empty_cache()
    return rows


def _f(x, spec):
    return "OOM" if x is None else format(x, spec)


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


def markdown_table(results, tflops, gpu, header) -> str:
    lines = [header, "", f"bf16 matmul rate measured: {tflops:.0f} TFLOP/s (8192^3 GEMM). Floor = 2NHV (fwd) / 6NHV (fwd+bwd) flops at that rate.",
             "Peak extra memory = max allocated above the inputs; fwd+bwd leaves out the hidden/weight grads every method returns (the workspace).", "",
             "| N, H, V | method | fwd ms | fwd+bwd ms | fwd extra GiB | fwd+bwd extra GiB | max abs Δlogp vs fused |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (n, h, v), rows in results.items():
        flops = 2 * n * h * v
        lines.append(f"| {n}, {h}, {v} | matmul floor | {flops / tflops / 1e9:.2f} | {3 * flops / tflops / 1e9:.2f} | | | |")
        for name, r in rows.items():
            diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            lines.append(f"| {n}, {h}, {v} | {name} | {_f(r['fwd_ms'], '.2f')} | {_f(r['fwd_bwd_ms'], '.2f')} | "
                         f"{_f(r['fwd_gib'], '.2f')} | {_f(r['fwd_bwd_gib'], '.2f')} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-only", action="store_true", help="correctness checks only")
    ap.add_argument("--shapes", nargs="*", help="N,H,V triples (default: the three paper-scale shapes)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--skip-checks", action="store_true", help="time without re-running the correctness checks")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    triton_ok = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    failures = [] if args.skip_checks and cuda else run_checks(device, triton_ok)
    if failures:
        print("CHECKS FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    if args.check_only or not cuda:
        return 0
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else PAPER_SHAPES
    gpu = torch.cuda.get_device_name()
    tflops = matmul_tflops()
    print(f"{gpu}: bf16 matmul {tflops:.0f} TFLOP/s")
    results = {}
    for shape in shapes:
        print(f"  shape N,H,V = {shape}", flush=True)
        results[shape] = bench_shape(*shape, args.repeats, not args.no_compile)
    import triton

    header = (f"## fused_logprob on {gpu} — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
              f"(torch {torch.__version__}, triton {triton.__version__}, median of {args.repeats})")
    table = markdown_table(results, tflops, gpu, header) + tuned_configs_line()
    print("\n" + table)
    with open(args.results, "a") as fh:
        fh.write("\n" + table)
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
