"""One GPU learner step without Ray: a ~1.5B Qwen2 under FSDP2, packed 16k-token rows, fused vs torch head.

    python bench/gpu_learner.py                    # CUDA: the table -> bench/RESULTS.md (~1-2 min on an H200, untimed yet)
    python bench/gpu_learner.py --tiny --steps 1   # CPU smoke of the same code (tests/test_gpu_learner.py)

The model is Qwen2.5-1.5B's architecture (28 layers, hidden 1536, GQA 12/2
heads, vocab 151936, tied embeddings) written as a transformers config.json
and built by :class:`verimed.core.train.learner.Learner` itself with
``random_init=True``: on the meta device, ``fully_shard`` per block and on the
root (world size 1, NCCL), materialised and randomly initialised shard by shard,
bf16 compute with fp32 master weights and reduction. No download.

The batch is GRPO-shaped (``--groups`` x ``--group-size`` sequences of
``--prompt`` + ``--response`` random tokens), packed by the learner into rows of
``trainer.micro_batch_tokens`` = 16384 tokens; behaviour log-probs near
-ln V (what a random model gives) so the importance weights are ~1 and the loss
depends on the log-probs. ``trainer.lr`` is 1e-12: AdamW's update (≈ lr per
weight) is below the fp32 resolution of weights of size ~0.02 (ulp ≈ 2e-9), so
every step sees the same weights and the two heads' steps compute the same loss
(compared below); the optimizer still runs, so the time is a training step's.

Per configuration (LM head ``triton`` = the fused kernel, ``torch`` = the
chunked torch reference; attention ``sdpa`` = the GPU default, transformers'
block-diagonal mask from restarting position ids, or ``segments`` = verimed's
per-sequence attention with shared prompts): median step time, tokens/s,
MFU (model flops: 6·P_blocks·T + 6·L·H·Σn² attention + 6·V·H·N_loss head, over
``--peak-tflops``), peak memory, loss and grad norm.

The packing check: three sequences packed in one row vs each run alone through
the policy's forward with the attention the GPU path uses; the final hidden
states of each must agree to bf16 accuracy (relative error ≤ 5e-2 on CUDA:
the GEMMs of a 4k row and of a 1k sequence tile and round differently; ≤ 1e-4 in
fp32 on CPU), and a control — the same tokens as ONE sequence, so the later
ones do attend to the earlier — must differ by ≥ 5× that error (the check
can fail).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learner_step import grpo_batch  # noqa: E402

# Qwen2.5-1.5B's shape (its config.json), no weights.
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02)
TINY = dict(QWEN2_1_5B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM (spec sheet)


def write_model_config(out_dir: Path, shape: dict) -> Path:
    from transformers import Qwen2Config

    Qwen2Config(**shape).save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_attention(learner, kind: str) -> None:
    """``sdpa``: transformers' mask from restarting position ids (the GPU default); ``segments``: verimed's."""
    from verimed.core.train.attention import use_segment_attention

    lm = learner.model.lm
    if kind == "segments":
        use_segment_attention(lm)
    else:
        lm.set_attn_implementation(kind)
    learner.model.segment_attention = kind == "segments"


def step_flops(batch, shape: dict, share_prompts: bool) -> float:
    """Model flops of one training step (forward + backward = 3 x forward) on ``batch``.

    Linear layers 2·P_blocks per token forward; causal attention 2·H·n² per layer
    and sequence (QKᵀ and AV, half the square); the LM head 2·V·H per loss token.
    Prompts shared by a group's samples are counted once when the row shares them.
    """
    h, inter, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    p_blocks = layers * (h * h * 2 + h * kv * 2 + 3 * h * inter)  # q, o, k, v, gate/up/down
    cu, mask = batch.cu_seqlens.numpy(), batch.loss_mask.numpy()
    lengths = np.diff(cu).astype(np.float64)
    tokens, attn = lengths.sum(), (lengths**2).sum()
    if share_prompts:  # each group's prompt once: the responses' tokens plus one prompt per group
        responses = np.array([mask[cu[s]:cu[s + 1]].sum() for s in range(len(lengths))])
        prompts = lengths - responses
        tokens = responses.sum() + prompts.sum() / (len(lengths) / batch.num_groups)
    loss_tokens = float(mask.sum())
    forward = 2 * p_blocks * tokens + 2 * layers * h * attn + 2 * v * h * loss_tokens
    return 3 * forward


@contextlib.contextmanager
def kernel_backend(head: str):
    """The LM head's backend for the duration (verimed.kernels reads VERIMED_KERNELS at each call)."""
    before = os.environ.get("VERIMED_KERNELS")
    os.environ["VERIMED_KERNELS"] = head
    try:
        yield
    finally:
        if before is None:
            del os.environ["VERIMED_KERNELS"]
        else:
            os.environ["VERIMED_KERNELS"] = before


def time_config(learner, batch, head: str, attention: str, steps: int, shape: dict, peak_tflops: float,
                cuda: bool) -> dict:
    """One warm-up and ``steps`` timed training steps with this LM head and attention."""
    set_attention(learner, attention)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    learner.train_step(batch)  # warm-up: Triton autotuning, allocator, NCCL
    times, metrics = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics.append(learner.train_step(batch))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    flops = step_flops(batch, shape, attention == "segments")
    row = {"head": head, "attention": attention, "step_s": step, "times": times,
           "tokens_per_s": float(len(batch.input_ids)) / step,
           "mfu": flops / step / (peak_tflops * 1e12),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "loss": metrics[0]["loss/policy"], "losses": [m["loss/policy"] for m in metrics],
           "grad_norm": metrics[0]["train/grad_norm"]}
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
    print(f"  head={head} attention={attention}: step {step:.3f} s ({' '.join(f'{t:.3f}' for t in times)}), "
          f"{row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.1%}, peak {peak}, "
          f"loss {row['loss']:.6g}, grad norm {row['grad_norm']:.6g}", flush=True)
    return row


def _final_hidden(learner, seqs: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The final-norm output [R, H] of ``seqs`` packed in one row, through the policy's own forward."""
    from verimed.core.train.policy import packed_logprobs

    captured = []
    hook = learner.model.lm.model.norm.register_forward_hook(lambda m, i, out: captured.append(out[0].float()))
    try:
        with torch.no_grad(), kernel_backend("torch"):  # the head's output is not looked at
            packed_logprobs(learner.model, seqs, 1.0, device)
    finally:
        hook.remove()
    return captured[0]


def packing_check(learner, attention: str, lengths: list[int], vocab: int, device: torch.device, tol: float) -> dict:
    """Packed row vs each sequence alone (see the module docstring); returns errors and verdict."""
    set_attention(learner, attention)
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, vocab, n) for n in lengths]
    packed = _final_hidden(learner, seqs, device)
    one_sequence = _final_hidden(learner, [np.concatenate(seqs)], device)
    errors, control, start = [], [], 0
    for s in seqs:
        alone = _final_hidden(learner, [s], device)
        scale = alone.norm().clamp_min(1e-30)
        errors.append(float((packed[start:start + len(s)] - alone).norm() / scale))
        control.append(float((one_sequence[start:start + len(s)] - alone).norm() / scale))
        start += len(s)
    worst, control_later = max(errors), min(control[1:])  # the first sequence sees nothing before it either way
    ok = worst <= tol and control_later >= 5 * max(worst, 1e-7)
    print(f"  packing ({attention}, lengths {lengths}): rel err packed vs alone {' '.join(f'{e:.1e}' for e in errors)} "
          f"(tol {tol:g}); one-sequence control {' '.join(f'{c:.1e}' for c in control)} -> {'ok' if ok else 'FAIL'}",
          flush=True)
    return {"attention": attention, "errors": errors, "control": control, "tol": tol, "ok": ok}


def markdown(args, gpu: str, rows: list[dict], losses: dict, checks: list[dict], loss_ok: bool | None, loss_rel: float,
             batch, n_params: int, sharding: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    lines = [f"## GPU learner step on {gpu} — {when} UTC (torch {torch.__version__}, `python bench/gpu_learner.py "
             f"{' '.join(sys.argv[1:])}`)", "",
             f"Qwen2 architecture, {n_params / 1e9:.2f}B parameters, random init, {sharding}. Batch: {args.groups} groups x {args.group_size} samples of "
             f"{args.prompt} + {args.response} tokens = {len(batch.input_ids)} tokens, rows of "
             f"{args.row_tokens}; median of {args.steps} steps after one warm-up; lr 1e-12 (same weights every step). "
             f"MFU against {args.peak_tflops:g} TFLOP/s.", "",
             "| head | attention | step s | tokens/s | MFU | peak GiB | loss | grad norm |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['head']} | {r['attention']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['mfu']:.1%} | {peak} | {r['loss']:.6g} | {r['grad_norm']:.4g} |")
    if loss_ok is not None:
        lines += ["", f"Loss, fused vs torch head (same weights, sdpa attention): relative difference {loss_rel:.1e} "
                  f"(tolerance {args.loss_tol:g}) -> {'ok' if loss_ok else 'FAIL'}."]
    if ("triton", "sdpa") in losses and ("triton", "segments") in losses:  # the same loss, prompts shared or not
        a, b = losses[("triton", "sdpa")], losses[("triton", "segments")]
        lines.append(f"Loss, segment attention (shared prompts) vs sdpa: relative difference "
                     f"{abs(a - b) / max(abs(a), 1e-12):.1e} (no bound: bf16 rows of other shapes round differently).")
    for c in checks:
        lines.append(f"Packing ({c['attention']}): packed vs alone rel err max {max(c['errors']):.1e} (tol {c['tol']:g}), "
                     f"one-sequence control min {min(c['control'][1:]):.1e} -> {'ok' if c['ok'] else 'FAIL'}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer model, 2 groups x 4 samples of 24 + 40 tokens, rows of 256 (CPU smoke test)")
    ap.add_argument("--groups", type=int)
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--response", type=int)
    ap.add_argument("--row-tokens", type=int, help="trainer.micro_batch_tokens")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--configs", nargs="+", default=["triton:sdpa", "torch:sdpa", "triton:segments"],
                    help="HEAD:ATTENTION pairs to time; the first two heads' losses are compared")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS)
    ap.add_argument("--loss-tol", type=float, default=1e-3, help="relative loss difference fused vs torch head")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="'-' to append nowhere")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    for spec in args.configs:
        head, _, attention = spec.partition(":")
        if head not in ("triton", "torch") or attention not in ("sdpa", "eager", "segments"):
            ap.error(f"--configs {spec!r}: expected HEAD:ATTENTION, HEAD triton|torch, ATTENTION sdpa|eager|segments")
    sizes = dict(groups=2, group_size=4, prompt=24, response=40, row_tokens=256) if args.tiny else \
        dict(groups=2, group_size=16, prompt=512, response=1536, row_tokens=16384)
    for key, default in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, default)

    from verimed.core.config import load_config
    from verimed.core.train.distributed import init_distributed
    from verimed.core.train.learner import Learner

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = TINY if args.tiny else QWEN2_1_5B
    init_distributed(0, 1, "127.0.0.1", free_port())  # NCCL on CUDA: FSDP2 at world size 1
    overrides = ["trainer.lr=1e-12", "trainer.warmup_steps=0", "trainer.minibatches=1",
                 f"trainer.micro_batch_tokens={args.row_tokens}",
                 f"trainer.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        learner = Learner(cfg, str(write_model_config(Path(tmp), shape)), 0, 1, random_init=True)
        sharded = hasattr(learner.model, "reshard")  # what fully_shard adds
        precision = "bf16 compute / fp32 master weights and reduction" if cuda else "fp32"
        sharding = f"FSDP2 world size 1, {precision}" if sharded else f"unsharded, {cfg.model.dtype}"
        print(f"built in {time.perf_counter() - start:.1f} s: {sharding}", flush=True)
    n_params = sum(p.numel() for p in learner.model.parameters())
    v = shape["vocab_size"]
    # Random weights give near-uniform softmax: log-probs ~ -ln V; behaviour near that keeps ratios ~ 1.
    batch = grpo_batch(args.groups, args.group_size, args.prompt, args.response, v,
                       behaviour_logprobs=(-math.log(v) - 0.2, -math.log(v) + 0.2))
    rows, failed = [], []
    for spec in args.configs:
        head, attention = spec.split(":")
        try:
            with kernel_backend(head):
                rows.append(time_config(learner, batch, head, attention, args.steps, shape, args.peak_tflops, cuda))
        except Exception as exc:  # an OOM or a kernel error in one configuration leaves the others their run
            traceback.print_exc()
            failed.append(f"{spec}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if cuda:
                torch.cuda.empty_cache()
    losses = {(r["head"], r["attention"]): r["loss"] for r in rows}
    fused, plain = losses.get(("triton", "sdpa")), losses.get(("torch", "sdpa"))
    compared = fused is not None and plain is not None
    loss_rel = abs(fused - plain) / max(abs(plain), 1e-12) if compared else float("nan")
    loss_ok = loss_rel <= args.loss_tol if compared else None  # None: not both heads timed
    tol = 5e-2 if cuda else 1e-4
    lengths = [300, 700, 1000] if not args.tiny else [30, 70, 100]
    checks = [packing_check(learner, att, lengths, v, device, tol)
              for att in dict.fromkeys(r["attention"] for r in rows)]
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    table = markdown(args, gpu, rows, losses, checks, loss_ok, loss_rel, batch, n_params, sharding)
    table += "".join(f"FAILED configuration {f}\n" for f in failed)
    print("\n" + table)
    if args.results != "-":
        with open(args.results, "a") as fh:
            fh.write("\n" + table)
        print(f"appended to {args.results}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks, "loss_rel": loss_rel}, indent=1))
    ok = loss_ok is not False and all(c["ok"] for c in checks) and not failed
    print("GPU LEARNER CHECKS " + ("PASSED" if ok else "FAILED"))
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
