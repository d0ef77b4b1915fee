"""Compile verimed's Triton kernels for a GPU architecture without a GPU, and check the machine code.

    python bench/triton_compile.py              # sm_90 (H100/H200), every autotune tile + the fixed one
    python bench/triton_compile.py --arch 100   # another architecture

The interpreter (TRITON_INTERPRET=1) checks the maths on CPU but never runs
Triton's GPU compiler. This script does: it compiles each kernel ahead of time for
``GPUTarget("cuda", arch, 32)`` with the same specialisation the JIT applies at
launch (pointers and integer arguments divisible by 16, as at the paper shapes),
then reads the cubin's resource usage. For every tile of the fused log-prob
kernels it fails when a tile

  - does not compile (a shape or type error the interpreter lets through),
  - spills registers to local memory (stack > 0: the tile is too big),
  - is not software-pipelined (no cp.async copies: each K step would wait on HBM),
  - needs more shared memory than an SM has (227 KiB on sm_90),
  - on sm_90, does not use wgmma (Hopper's tensor-core instructions).

Needs triton with its NVIDIA backend (ptxas and cuobjdump ship in the wheel);
TRITON_INTERPRET must be unset (tests run this in a subprocess).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from verimed.kernels import advantages  # noqa: E402
from verimed.kernels import fused_logprob_triton as flt  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 100: 227 * 1024, 80: 163 * 1024}
# integer arguments the JIT sees divisible by 16 at the paper shapes (H, strides, N, V)
DIV16_INTS = {"HD", "stride_hn", "stride_wv", "stride_dz", "N", "V", "V_PER_SPLIT"}

LOGPROB_FWD_TYPES = dict(h_ptr="*{dt}", w_ptr="*{dt}", t_ptr="*i64", m_ptr="*fp32", s_ptr="*fp32", ez_ptr="*fp32",
                         zt_ptr="*fp32", N="i32", V="i32", HD="i32", stride_hn="i32", stride_wv="i32", inv_temp="fp32",
                         V_PER_SPLIT="i32")
LOGPROB_BWD_TYPES = dict(h_ptr="*{dt}", w_ptr="*{dt}", t_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", glp_ptr="*fp32",
                         gent_ptr="*fp32", dz_ptr="*{dt}", N="i32", HD="i32", stride_hn="i32", stride_wv="i32",
                         stride_dz="i32", v_lo="i32", v_hi="i32", inv_temp="fp32")
GROUP_TYPES = dict(scores_ptr="*fp32", lengths_ptr="*i64", cu_groups_ptr="*i64", rew_ptr="*fp32", adv_ptr="*fp32",
                   length_coef="fp32", length_threshold="fp32", eps="fp32")
BROADCAST_TYPES = dict(val_ptr="*fp32", cu_ptr="*i64", out_ptr="*fp32")


@dataclass
class Compiled:
    label: str
    regs: int
    spill_bytes: int
    shared_bytes: int
    async_copies: int
    wgmma: bool
    error: str = ""


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_kernel(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int, label: str) -> Compiled:
    """Compile ``fn`` for sm_<arch> as the JIT would at launch; read registers, spills, shared memory."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types[name]
        if types[name].startswith("*") or name in DIV16_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # noqa: BLE001 - any compiler failure is the finding
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        where = lines[0] if lines else ""
        return Compiled(label, 0, 0, 0, 0, False, error=f"{type(exc).__name__} {where} {lines[-1][:300] if lines else ''}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", usage)
    if not found:
        raise RuntimeError(f"{label}: cannot read cuobjdump -res-usage output:\n{usage}")
    ptx = kernel.asm["ptx"]
    return Compiled(label, regs=int(found.group(1)), spill_bytes=int(found.group(2)),
                    shared_bytes=max(int(found.group(3)), int(getattr(kernel.metadata, "shared", 0) or 0)),
                    async_copies=ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk"),
                    wgmma="wgmma" in ptx)


def logprob_tiles(arch: int, dtypes=("bf16", "fp16")) -> list[Compiled]:
    """Every autotune tile and the fixed small-problem tile of both fused log-prob kernels."""
    out = []
    fixed = tuple(flt.FIXED_GPU_CONFIG[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")) + (
        flt.FIXED_GPU_LAUNCH["num_warps"], flt.FIXED_GPU_LAUNCH["num_stages"])
    for dt in dtypes:
        for fn, types, tiles, grouped in ((flt._fwd_body, LOGPROB_FWD_TYPES, flt.FWD_TILES, False),
                                          (flt._bwd_dz_body, LOGPROB_BWD_TYPES, flt.BWD_TILES, True)):
            for bn, bv, bh, warps, stages in [*tiles, fixed]:
                consts = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, IEEE=False, **({"GROUP_N": flt.GROUP_N} if grouped else {}))
                typed = {k: v.format(dt=dt) for k, v in types.items()}
                label = f"{fn.__name__} {dt} {bn}x{bv}x{bh} warps={warps} stages={stages}"
                out.append(compile_kernel(fn, typed, consts, warps, stages, arch, label))
    return out


def advantage_kernels(arch: int) -> list[Compiled]:
    group_kernel, broadcast_kernel = advantages._triton_kernels()
    out = [compile_kernel(group_kernel, GROUP_TYPES, dict(MODE=mode, BLOCK_G=16), 4, 1, arch, f"group_kernel MODE={mode}")
           for mode in sorted(set(advantages.MODES.values()))]
    out.append(compile_kernel(broadcast_kernel, BROADCAST_TYPES, dict(BLOCK_T=256), 4, 1, arch, "broadcast_kernel"))
    return out


def problems(c: Compiled, arch: int, gemm: bool) -> list[str]:
    if c.error:
        return [f"does not compile: {c.error}"]
    found = []
    if c.spill_bytes:
        found.append(f"spills {c.spill_bytes} B of registers")
    if c.shared_bytes > SHARED_LIMIT.get(arch, 227 * 1024):
        found.append(f"needs {c.shared_bytes} B shared memory")
    if gemm and not c.async_copies:
        found.append("loads are not pipelined (no cp.async)")
    if gemm and arch == 90 and not c.wgmma:
        found.append("no wgmma")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter never runs the GPU compiler")
        return 2
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failures = 0
    for gemm, results in ((True, logprob_tiles(args.arch)), (False, advantage_kernels(args.arch))):
        for c in results:
            found = problems(c, args.arch, gemm)
            failures += bool(found)
            detail = "; ".join(found) if found else "ok"
            print(f"  {c.label}: regs {c.regs}, spill {c.spill_bytes} B, shared {c.shared_bytes // 1024} KiB, "
                  f"cp.async {c.async_copies}, wgmma {c.wgmma} -> {detail}")
    print("all kernels compile cleanly" if not failures else f"{failures} kernel(s) with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
