"""Triton ``fused_logprob``: online log-sum-exp over vocabulary tiles, recompute in backward.

Same maths and contract as the torch reference in ``fused_logprob.py``:
hidden [N, H], weight [V, H] (bf16/fp16/fp32, fp32 accumulation), targets [N]
-> (logprob [N] fp32, entropy [N] fp32), ignore_index rows -> 0, no gradient.

Forward (``_fwd_body``), one program per (row block, vocabulary split): it
computes logit tiles z = h @ w.T / T for BLOCK_N rows over its split of the
vocabulary (V_PER_SPLIT columns, tile by tile) and keeps running

    m = max z,  s = sum exp(z - m),  t = sum exp(z - m) * (z - m)

rescaling when the max grows: t <- a (t + s (m_old - m_new)), s <- a s with
a = exp(m_old - m_new) (t relative to m keeps entropy free of cancellation).
The programs of split 0 also gather the target logit z_y = h . w[y] / T. A
[splits, N] combine finishes
(M = max m_i, S = sum s_i e^(m_i - M), T = sum e^(m_i - M) (t_i + s_i (m_i - M)))
lse = M + log S, entropy = log S - T / S, logprob = z_y - lse. Only O(N * splits)
floats are stored, never N x V.

Backward, per vocabulary chunk of Vc columns: ``_bwd_dz_body`` recomputes
the logit tiles and writes dL/dz for the chunk ([N, Vc] in the input dtype,
Vc sized to a memory budget), then two cuBLAS GEMMs give
d_hidden += dz @ w[chunk] (fp32 accumulator, in place) and d_weight[chunk] = dz.T @ h.
So the backward is one fused recompute plus two matmuls, with no atomics.

Launch order is what keeps these kernels compute-bound: h ([N, H], 84 MB at
N = 8192, H = 5120) is larger than an H100's L2, so the programs running at one
time must share a few row blocks. The forward puts a row block's splits next to
each other (a wave streams W once for the row blocks it holds, h stays in L2) and
uses as few splits as fill the GPU; the dz kernel walks GROUP_N row blocks across
all column blocks before moving on (the grouped order of Triton's matmul tutorial).
Without that every column block re-reads all of h from HBM, ~100 GB per pass at
the first benchmark shape, more than the matmul itself takes.

Runs on CUDA; under ``TRITON_INTERPRET=1`` it also runs on CPU tensors with a
fixed small config (autotune does not work in the interpreter).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from verimed.kernels.fused_logprob import check_inputs

DZ_CHUNK_BYTES = 384 * 2**20  # budget of the [N, Vc] dz buffer in backward
TARGET_PROGRAMS = 1024  # forward programs to aim for (~8 per SM on an H100/H200)
SPLIT_ROWS = 128  # row block assumed when choosing splits (the tuned configs' usual BLOCK_N)
MIN_V_PER_SPLIT = 1024


def interpreted() -> bool:
    """Whether this module's kernels were built for the interpreter.

    ``triton.jit`` decides at decoration time, so TRITON_INTERPRET=1 must be set
    before this module is first imported (tests reload it after setting it).
    """
    return INTERPRETED


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
NEG_BIG = tl.constexpr(-1.0e30)  # a constexpr object: jit code may read it as a global


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, HD, stride_hn, stride_wv,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    """acc[BLOCK_N, BLOCK_V] = hidden[rows] @ weight[cols].T in fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, HD, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < HD
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None], mask=col_mask[None, :] & kmask[:, None], other=0.0)
        if IEEE:  # fp32 inputs: no TF32 rounding, so fp32 results match the reference
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    return acc


@triton.jit
def _fwd_body(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, ez_ptr, zt_ptr, N, V, HD, stride_hn, stride_wv, inv_temp,
              V_PER_SPLIT, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    # 1-D grid, a row block's splits adjacent: programs that run together share h rows
    pid = tl.program_id(0)
    n_splits = tl.cdiv(V, V_PER_SPLIT)
    pid_n = pid // n_splits
    pid_v = pid % n_splits
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    # Finite stand-in for -inf (masked columns, the empty running max): exp() of it is 0
    # and 0 * it is 0, so the tile update needs no NaN guards. Registers bound the tile
    # size here; this and gathering z_y outside the loop took a 128 x 128 tile from
    # 255 registers (spilling) to ~200 on sm_90.
    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    v_start = pid_v * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        # cols < v_end: a tile may run past this split's end into the next split's columns
        col_mask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, HD, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
        z = tl.where(col_mask[None, :], z * inv_temp, NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zc = z - m_new[:, None]
        p = tl.exp(zc)
        # t is kept relative to the running max: t = sum exp(z - m) (z - m)
        t = alpha * (t + s * (m - m_new)) + tl.sum(p * zc, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    out = pid_v * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(ez_ptr + out, t, mask=row_mask)
    if pid_v == 0:
        # target logit z_y = h . w[y] / T, once per row (a gather, not a compare on every tile)
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        has_t = row_mask & (tgt >= 0)
        zt = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, HD, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            kmask = ks < HD
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=has_t[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + tgt[:, None] * stride_wv + ks[None, :], mask=has_t[:, None] & kmask[None, :], other=0.0)
            zt += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
        tl.store(zt_ptr + rows, zt * inv_temp, mask=row_mask)


@triton.jit
def _bwd_dz_body(h_ptr, w_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, HD, stride_hn, stride_wv,
                 stride_dz, v_lo, v_hi, inv_temp,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                 IEEE: tl.constexpr):
    # grouped order: GROUP_N row blocks sweep every column block before the next group
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(v_hi - v_lo, BLOCK_V)
    first = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    cols32 = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = cols32.to(tl.int64)
    col_mask = cols32 < v_hi
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, HD, stride_hn, stride_wv,
                     BLOCK_N, BLOCK_V, BLOCK_H, IEEE) * inv_temp
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1).to(tl.int32)  # vocabulary ids fit int32
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)  # host zeroed ignored rows
    g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
    # dz = -p (g_lp + g_ent (log p + ent)) + g_lp [v = y], with the per-row part folded first
    row_coef = g_lp + g_ent * ent
    logp = z - lse[:, None]
    dz = -tl.exp(logp) * (row_coef[:, None] + g_ent[:, None] * logp)
    dz += tl.where(cols32[None, :] == tgt[:, None], g_lp[:, None], 0.0)
    ptrs = dz_ptr + rows[:, None] * stride_dz + (cols - v_lo)[None, :]
    tl.store(ptrs, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) that compile for sm_90 (Hopper) with
# wgmma, pipelined loads and no register spills under triton 3.6 and 3.9
# (bench/triton_compile.py checks all three). Left out because they spill: 256 x 128
# tiles, and in the dz kernel (its epilogue holds more per element) 128 x 256 tiles and
# 128 x 128 with 4 warps.
FWD_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 32, 8, 4),
    (64, 256, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4),
]
BWD_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 32, 8, 4),
    (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
]
GROUP_N = 8
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}
INTERPRET_GROUP_N = 2  # several groups and a partial one at test shapes
FIXED_GPU_CONFIG = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32}
FIXED_GPU_LAUNCH = {"num_warps": 4, "num_stages": 2}
TUNE_MIN_WORK = 2**26  # N * V below this: fixed config (tuning tiny problems costs more than it saves)


def _configs(grouped: bool) -> list[triton.Config]:
    extra = {"GROUP_N": GROUP_N} if grouped else {}
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, **extra}, num_warps=w, num_stages=st)
            for bn, bv, bh, w, st in (BWD_TILES if grouped else FWD_TILES)]


def _mode(n_rows: int, vocab: int) -> str:
    if INTERPRETED:
        return "interp"
    return "tuned" if n_rows * vocab >= TUNE_MIN_WORK else "fixed"


@functools.lru_cache(maxsize=None)
def _kernels(mode: str):
    """(fwd, bwd_dz): autotuned for large GPU problems, fixed blocks otherwise."""
    if mode != "tuned":
        return _fwd_body, _bwd_dz_body
    # Key on what drives tile choice; N varies per micro-batch and is left out.
    fwd = triton.autotune(configs=_configs(grouped=False), key=["HD", "IEEE"])(_fwd_body)
    bwd = triton.autotune(configs=_configs(grouped=True), key=["HD", "IEEE"])(_bwd_dz_body)
    return fwd, bwd


def _launch_cfg(mode: str, grouped: bool) -> dict:
    if mode == "tuned":
        return {}
    if mode == "interp":
        return dict(INTERPRET_CONFIG, **({"GROUP_N": INTERPRET_GROUP_N} if grouped else {}))
    return dict(FIXED_GPU_CONFIG, **FIXED_GPU_LAUNCH, **({"GROUP_N": GROUP_N} if grouped else {}))


def _grid(mode: str, n_rows: int, blocks_per_row_block):
    """1-D grid: row blocks x ``blocks_per_row_block`` (an int or a function of BLOCK_V)."""
    def size(block_n, block_v):
        per = blocks_per_row_block(block_v) if callable(blocks_per_row_block) else blocks_per_row_block
        return (triton.cdiv(n_rows, block_n) * per,)

    if mode == "tuned":
        return lambda meta: size(meta["BLOCK_N"], meta["BLOCK_V"])
    cfg = _launch_cfg(mode, grouped=False)
    return size(cfg["BLOCK_N"], cfg["BLOCK_V"])


def default_v_per_split(n_rows: int, vocab: int) -> int:
    """Vocabulary columns per forward program: as few splits as give ~TARGET_PROGRAMS programs.

    Each wave of programs streams W once for the row blocks it holds, so fewer
    splits (more row blocks per wave) means less W traffic; small N needs more
    splits to fill the GPU. Rounded up to 256 (the largest BLOCK_V).
    """
    row_blocks = triton.cdiv(max(n_rows, 1), SPLIT_ROWS)
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, row_blocks), triton.cdiv(vocab, MIN_V_PER_SPLIT)))
    return triton.cdiv(triton.cdiv(vocab, splits), 256) * 256


@functools.lru_cache(maxsize=None)
def _inplace_addmm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``addmm(acc, a, b, out_dtype=fp32, out=acc)`` exists and is right on this device.

    Checked once on a small problem against an fp32 GEMM: torch versions differ in
    whether the out_dtype overload exists and accepts ``out`` aliasing ``acc``.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 96, device=device, generator=gen).to(dtype)
    b = torch.randn(96, 80, device=device, generator=gen).to(dtype)
    acc = torch.randn(64, 80, device=device, generator=gen)
    want = acc + a.float() @ b.float()
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-2))


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, fp32 accumulation; in place (no [N, H] temporary) where torch allows."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif not a.is_cuda:  # the interpreter's CPU tensors
        acc.addmm_(a.float(), b.float())
    elif _inplace_addmm_ok(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        try:  # an fp32 [N, H] temporary, still an fp32 product
            acc += torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no out_dtype overload
            acc += (a @ b).float()


class _TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, v_per_split, dz_chunk_cols):
        n_rows, hd = hidden.shape
        vocab = weight.shape[0]
        hidden, weight = hidden.contiguous(), weight.contiguous()
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, -1).to(torch.int64).contiguous()
        n_splits = triton.cdiv(vocab, v_per_split)
        part = torch.empty((3, n_splits, n_rows), dtype=torch.float32, device=hidden.device)
        z_target = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        mode = _mode(n_rows, vocab)
        fwd, _ = _kernels(mode)
        if n_rows > 0:
            fwd[_grid(mode, n_rows, n_splits)](
                hidden, weight, tgt, part[0], part[1], part[2], z_target, n_rows, vocab, hd,
                hidden.stride(0), weight.stride(0), 1.0 / temperature, v_per_split,
                IEEE=hidden.dtype == torch.float32, **_launch_cfg(mode, grouped=False))
        m, s, ez = part.unbind(0)
        big_m = m.max(dim=0).values
        scale = torch.exp(m - big_m)
        sum_s = (s * scale).sum(0)
        sum_t = (scale * (ez + s * (m - big_m))).sum(0)
        lse = big_m + torch.log(sum_s)
        entropy = torch.where(valid, torch.log(sum_s) - sum_t / sum_s, 0.0)
        logprob = torch.where(valid, z_target - lse, 0.0)
        ctx.save_for_backward(hidden, weight, tgt, valid, lse, entropy)
        ctx.temperature, ctx.dz_chunk_cols = temperature, dz_chunk_cols
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, tgt, valid, lse, entropy = ctx.saved_tensors
        n_rows, hd = hidden.shape
        vocab = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        zeros = torch.zeros_like(lse)
        g_lp = zeros if grad_logprob is None else torch.where(valid, grad_logprob.float(), 0.0).contiguous()
        g_ent = zeros if grad_entropy is None else torch.where(valid, grad_entropy.float(), 0.0).contiguous()
        cols = ctx.dz_chunk_cols or max(256, (DZ_CHUNK_BYTES // max(1, n_rows * hidden.element_size())) // 256 * 256)
        cols = min(cols, vocab)
        dz = torch.empty((n_rows, cols), dtype=hidden.dtype, device=hidden.device)
        d_hidden = torch.zeros((n_rows, hd), dtype=torch.float32, device=hidden.device) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        mode = _mode(n_rows, vocab)
        _, bwd = _kernels(mode)
        for v_lo in range(0, vocab, cols):
            v_hi = min(v_lo + cols, vocab)
            width = v_hi - v_lo
            if n_rows > 0:
                grid = _grid(mode, n_rows, lambda block_v, w=width: triton.cdiv(w, block_v))
                bwd[grid](hidden, weight, tgt, lse, entropy, g_lp, g_ent, dz, n_rows, hd, hidden.stride(0),
                          weight.stride(0), dz.stride(0), v_lo, v_hi, 1.0 / ctx.temperature,
                          IEEE=hidden.dtype == torch.float32, **_launch_cfg(mode, grouped=True))
            chunk = dz[:, :width]
            if need_h:
                _accumulate_mm(d_hidden, chunk, weight[v_lo:v_hi])
            if need_w:
                # straight into the weight dtype: the GEMM accumulates in fp32 and rounds once,
                # as .to(dtype) of an fp32 result would, without a [Vc, H] fp32 temporary
                torch.mm(chunk.T, hidden, out=d_weight[v_lo:v_hi])
        d_hidden = d_hidden.to(hidden.dtype) if need_h else None
        return d_hidden, d_weight, None, None, None, None, None


def fused_logprob_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    v_per_split: int | None = None,
    dz_chunk_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path: (logprob[N], entropy[N]) fp32 with autograd to hidden and weight.

    hidden [N, H], weight [V, H] in bf16/fp16/fp32 (fp64 is not supported: use the
    reference); ``v_per_split`` / ``dz_chunk_cols`` override the vocabulary split of the
    forward (default: ``default_v_per_split``) and the dz chunk of the backward (tests
    use small values to cover the combine and the accumulation over chunks).
    """
    check_inputs(hidden, weight, targets, temperature)
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fused_logprob (triton): dtype {hidden.dtype} not supported; use backend='torch'")
    if not hidden.is_cuda and not interpreted():
        raise ValueError("fused_logprob (triton): CPU tensors need TRITON_INTERPRET=1")
    if v_per_split is None:
        v_per_split = 2 * INTERPRET_CONFIG["BLOCK_V"] if interpreted() else default_v_per_split(hidden.shape[0], weight.shape[0])
    if v_per_split < 1:
        raise ValueError(f"fused_logprob (triton): v_per_split must be >= 1, got {v_per_split}")
    return _TritonLogprob.apply(hidden, weight, targets, float(temperature), int(ignore_index), int(v_per_split), dz_chunk_cols)
