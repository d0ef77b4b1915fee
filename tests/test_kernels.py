"""Kernel parity: fused_logprob and grpo_advantages (torch reference and Triton under TRITON_INTERPRET=1).

Run: .venv/bin/python -m pytest tests/test_kernels.py -q
Gradients are checked against a float64 textbook path (relative error <= 1e-5 in fp32).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import torch  # does not import triton

if not torch.cuda.is_available():
    # triton.jit (its stdlib included) picks interpreter vs compiler when triton is
    # first imported, so this must precede any triton import in the session.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from verimed.core.config import GRPOConfig
from verimed.kernels import fused_logprob, grpo_advantages, grpo_sequence_advantages, resolve_backend
from verimed.kernels.fused_logprob import fused_logprob_reference, naive_logprob

# (N, H, V): N = 1, V not a multiple of any tile, odd sizes
SHAPES = [(1, 8, 37), (2, 16, 64), (7, 24, 100), (37, 40, 130), (19, 33, 257)]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y).norm() / y.norm().clamp_min(1e-30)).item()


def _problem(n, h, v, seed, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.25
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore and n > 2:
        targets[1] = -100
    g_lp, g_ent = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, g_lp, g_ent


def _check_against_fp64(fn, n, h, v, seed, temperature=0.7, tol=1e-5):
    hidden, weight, targets, g_lp, g_ent = _problem(n, h, v, seed)
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp64, ent64 = naive_logprob(h64, w64, targets, temperature)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    lp, ent = fn(h32, w32, targets, temperature)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
    for name, got, want in [("logprob", lp, lp64), ("entropy", ent, ent64), ("d_hidden", h32.grad, h64.grad), ("d_weight", w32.grad, w64.grad)]:
        assert _rel(got, want) <= tol, (name, _rel(got, want))
    if n > 2:  # ignored row: zero outputs, zero gradient
        assert lp[1].item() == 0.0 and ent[1].item() == 0.0 and h32.grad[1].abs().max().item() == 0.0


@pytest.mark.parametrize("n,h,v", SHAPES)
def test_reference_matches_fp64(n, h, v):
    # a tiny chunk budget forces several row chunks
    _check_against_fp64(lambda *a: fused_logprob_reference(*a, chunk_bytes=3 * 4 * v * 3), n, h, v, seed=n * 7 + v)


def test_reference_random_shapes_and_dispatch():
    rng = np.random.default_rng(0)
    for i in range(4):
        n, h, v = int(rng.integers(1, 40)), int(rng.integers(1, 48)), int(rng.integers(2, 300))
        _check_against_fp64(lambda *a: fused_logprob(*a), n, h, v, seed=i, temperature=float(rng.uniform(0.5, 1.5)))
    assert resolve_backend(torch.device("cpu")) == "torch"


def test_reference_bf16_inputs_fp32_accumulation():
    hidden, weight, targets, _, _ = _problem(9, 64, 200, seed=3)
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    lp, ent = fused_logprob_reference(hb, wb, targets)
    lp_ref, ent_ref = naive_logprob(hb.detach().double(), wb.detach().double(), targets)
    assert lp.dtype == torch.float32
    assert _rel(lp, lp_ref) < 1e-5 and _rel(ent, ent_ref) < 1e-5  # same bf16 inputs, fp32 maths
    lp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad.float()).all()


def test_input_errors():
    h, w = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="targets must be"):
        fused_logprob(h, w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fused_logprob(h, torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob(h, w, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fused_logprob(h, w, torch.zeros(3, dtype=torch.long), backend="cuda")


# ------------------------------------------------------------- advantages


def _groups(seed, n_groups=5):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_groups)
    # coarse scores so ties and the P80 boundary are exercised
    scores = rng.integers(0, 6, sizes.sum()) / 5.0
    lengths = rng.integers(1, 300, sizes.sum())
    return sizes, scores, lengths


def _numpy_group(x, lengths, cfg):
    """An fp64 oracle written from the formula (paper eq. 3, DESIGN §3), independent of the kernels."""
    p80 = np.quantile(x, 0.2)
    bonus = cfg.length_coef / np.sqrt(np.maximum(lengths.astype(np.float64), 1.0))
    r = x + np.where((p80 > cfg.length_threshold) & (x >= p80), bonus, 0.0)
    centred = r - r.mean()
    if cfg.advantage == "mean":
        return r, centred
    if cfg.advantage == "std":
        return r, centred / ((r.std(ddof=1) if r.size > 1 else 0.0) + 1e-6)
    return r, np.zeros_like(r)


def _numpy_expected(sizes, scores, lengths, cfg):
    rewards, adv, start = [], [], 0
    for g in sizes:
        r, a = _numpy_group(scores[start:start + g], lengths[start:start + g], cfg)
        rewards.append(r), adv.append(a)
        start += g
    return np.concatenate(rewards), np.concatenate(adv)


def _run_advantages(backend, mode, seed):
    sizes, scores, lengths = _groups(seed)
    cu_groups = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]))
    seq_tokens = np.random.default_rng(seed + 1).integers(0, 6, len(scores))
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(seq_tokens)]))
    st, lt = torch.tensor(scores, dtype=torch.float32), torch.tensor(lengths)
    cfg = GRPOConfig(advantage=mode)
    rewards, adv = grpo_sequence_advantages(st, cu_groups, lt, mode, cfg.length_coef, cfg.length_threshold, backend=backend)
    exp_r, exp_a = _numpy_expected(sizes, scores, lengths, cfg)
    np.testing.assert_allclose(rewards.numpy(), exp_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv.numpy(), exp_a, rtol=1e-4, atol=1e-4)
    tokens = grpo_advantages(st, cu_groups, lt, cu_seqlens, mode, cfg.length_coef, cfg.length_threshold, backend=backend)
    np.testing.assert_allclose(tokens.numpy(), np.repeat(exp_a, seq_tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["mean", "std", "none"])
def test_advantages_reference_matches_numpy(mode):
    for seed in range(4):
        _run_advantages("torch", mode, seed)


def test_advantages_layout_errors():
    s = torch.zeros(4)
    with pytest.raises(ValueError, match="cu_groups"):
        grpo_advantages(s, torch.tensor([0, 3]), torch.ones(4), torch.arange(5), backend="torch")
    with pytest.raises(ValueError, match="mode"):
        grpo_advantages(s, torch.tensor([0, 4]), torch.ones(4), torch.arange(5), mode="max", backend="torch")


# ------------------------------------------------------- Triton (interpreter)


@pytest.fixture
def interpreted_triton(monkeypatch):
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    if not isinstance(triton.language.standard.zeros, triton.runtime.interpreter.InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")
    name = "verimed.kernels.fused_logprob_triton"
    module = sys.modules.get(name)
    # triton.jit chooses interpreter vs compiler at import time
    module = importlib.import_module(name) if module is None else module
    if not module.interpreted():
        module = importlib.reload(module)
    from verimed.kernels import advantages

    advantages._triton_kernels.cache_clear()
    yield module
    advantages._triton_kernels.cache_clear()


@pytest.mark.parametrize("n,h,v", SHAPES)
def test_triton_interpreted_matches_fp64(interpreted_triton, n, h, v):
    # small split / chunk sizes cover the split combine and several backward chunks
    fn = lambda *a: interpreted_triton.fused_logprob_triton(*a, v_per_split=48, dz_chunk_cols=40)  # noqa: E731
    _check_against_fp64(fn, n, h, v, seed=n + v)


def test_triton_interpreted_half_inputs(interpreted_triton):
    # fp16 covers the low-precision backward: dz stored in the input dtype, d_weight written
    # straight into it by the GEMM, d_hidden accumulated in fp32 over several chunks.
    # (bf16 tl.dot is wrong in the interpreter itself, so bf16 is checked on CUDA only.)
    hidden, weight, targets, g_lp, g_ent = _problem(37, 40, 300, seed=4)
    hx, wx = hidden.half().requires_grad_(), weight.half().requires_grad_()
    lp, ent = interpreted_triton.fused_logprob_triton(hx, wx, targets, 0.7, v_per_split=48, dz_chunk_cols=64)
    (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
    assert hx.grad.dtype == torch.float16 and wx.grad.dtype == torch.float16
    h64, w64 = hx.detach().double().requires_grad_(), wx.detach().double().requires_grad_()
    lp64, ent64 = naive_logprob(h64, w64, targets, 0.7)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    for name, got, want, tol in [("logprob", lp, lp64, 1e-6), ("entropy", ent, ent64, 1e-6),
                                 ("d_hidden", hx.grad, h64.grad, 2e-3), ("d_weight", wx.grad, w64.grad, 2e-3)]:
        assert _rel(got, want) <= tol, (name, _rel(got, want))


def test_default_v_per_split_fills_the_gpu_with_few_splits(interpreted_triton):
    split = interpreted_triton.default_v_per_split
    for n, v in [(1, 37), (7, 1000), (512, 151936), (8192, 152064), (16384, 151936), (32768, 151936), (10**6, 32000)]:
        per = split(n, v)
        n_splits = -(-v // per)
        assert per % 256 == 0 and per >= min(v, 256)
        assert n_splits * per >= v and (n_splits - 1) * per < v  # every split has columns
        row_blocks = -(-n // 128)
        # enough programs when the vocabulary allows it, and never more splits than needed
        assert row_blocks * n_splits >= min(interpreted_triton.TARGET_PROGRAMS, row_blocks * (-(-v // 1024))) * 0.9
        assert n_splits == 1 or row_blocks * (n_splits - 1) < interpreted_triton.TARGET_PROGRAMS
    assert split(8192, 152064) == 9728  # 16 splits x 64 row blocks = 1024 programs


def test_tuned_launch_setup_matches_the_kernels(interpreted_triton):
    # the autotuned path runs only on CUDA: check here that every config names only the
    # kernel's own constexprs and that the 1-D grids cover every tile exactly
    fwd, bwd = interpreted_triton._kernels("tuned")
    for tuner, body in ((fwd, interpreted_triton._fwd_body), (bwd, interpreted_triton._bwd_dz_body)):
        assert len(tuner.configs) >= 4
        for cfg in tuner.configs:
            assert set(cfg.kwargs) <= set(body.arg_names), (body.__name__, cfg.kwargs)
            assert {"BLOCK_N", "BLOCK_V", "BLOCK_H"} <= set(cfg.kwargs)
        assert ("GROUP_N" in tuner.configs[0].kwargs) == (body is interpreted_triton._bwd_dz_body)
    grid = interpreted_triton._grid("tuned", 8192, 16)
    assert grid({"BLOCK_N": 128, "BLOCK_V": 256}) == (64 * 16,)
    grid = interpreted_triton._grid("tuned", 1000, lambda block_v: -(-5000 // block_v))
    assert grid({"BLOCK_N": 64, "BLOCK_V": 128}) == (16 * 40,)


def test_triton_dispatch_and_default_split(interpreted_triton, monkeypatch):
    monkeypatch.setenv("VERIMED_KERNELS", "triton")
    _check_against_fp64(lambda *a: fused_logprob(*a), 5, 20, 131, seed=11, temperature=1.0)


@pytest.mark.parametrize("mode", ["mean", "std", "none"])
def test_triton_advantages_interpreted(interpreted_triton, mode):
    for seed in range(2):
        _run_advantages("triton", mode, seed)


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend(torch.device("cpu"), "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_bf16_matches_reference():
    hidden, weight, targets, _, _ = _problem(257, 256, 5003, seed=5)
    hb, wb = hidden.bfloat16().cuda(), weight.bfloat16().cuda()
    lp, ent = fused_logprob(hb, wb, targets.cuda(), backend="triton")
    lp_ref, ent_ref = naive_logprob(hb.double(), wb.double(), targets.cuda())
    assert _rel(lp, lp_ref) < 1e-4 and _rel(ent, ent_ref) < 1e-4
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"


def test_kernels_and_bench_need_only_torch():
    """GPU hosts have torch + triton only: verimed.kernels and bench/kernels.py must not pull msgspec/yaml/ray."""
    code = ("import sys, runpy; sys.argv = ['kernels.py', '--check-only']; import verimed.kernels; "
            "runpy.run_path('bench/kernels.py', run_name='not_main'); "
            "bad = [m for m in ('msgspec', 'yaml', 'ray', 'vllm', 'verimed.core') if m in sys.modules]; "
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env | {"PYTHONPATH": root}, check=True, timeout=120)


def test_triton_kernels_compile_for_hopper_without_spills():
    """The GPU compiler (never run by the interpreter) builds every autotune tile for sm_90:
    no compile error, no register spill, pipelined loads, wgmma (bench/triton_compile.py)."""
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("triton without its NVIDIA backend binaries")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "bench/triton_compile.py", "--arch", "90"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "all kernels compile cleanly" in proc.stdout


def _bench_kernels_module():
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return runpy.run_path(os.path.join(root, "bench", "kernels.py"), run_name="not_main")


@pytest.mark.parametrize("group_size", [1, 2, 7, 16])
@pytest.mark.parametrize("mode", ["mean", "std", "none"])
def test_bench_vectorised_advantages_match_the_reference(group_size, mode):
    """bench/kernels.py's torch baseline at 1M samples (equal groups, vectorised) = the product's reference."""
    bench = _bench_kernels_module()
    gen = torch.Generator().manual_seed(group_size)
    n = group_size * 9
    scores = torch.randint(0, 11, (n,), generator=gen) / 10.0
    lengths = torch.randint(1, 60, (n,), generator=gen)
    cu_groups = torch.arange(0, n + 1, group_size)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    want = grpo_advantages(scores, cu_groups, lengths, cu_seqlens, mode, backend="torch")
    got = bench["advantages_equal_groups_torch"](scores, lengths, lengths, group_size, mode)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

