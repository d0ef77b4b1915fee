"""Weight-sync throughput: the bucketed path against one raw broadcast of the same bytes.

    .venv/bin/python bench/weight_sync.py                      # SmolLM2 (fp32, both layouts) + synthetic 1.5B (bf16)
    .venv/bin/python bench/weight_sync.py --models smollm2 --buckets-mb 16,64 --repeats 2 --no-append

Two processes (sender = learner rank 0, receiver = one engine worker) form
a weight-sync group through :func:`verimed.core.rollout.weight_sync.make_group` on a
loopback TCPStore (gloo on CPU; NCCL when both see a GPU and ``--backend
nccl``). Per state dict it times, in the same run:

- raw: one ``broadcast`` of a single preallocated flat buffer of exactly the
  state dict's bytes (the transport's ceiling, no packing or unpacking);
- bucketed: :func:`broadcast_weights` -> :func:`receive_weights` (pack into
  double buffers, pipelined async broadcasts, receive every bucket, views),
  for each bucket size of the sweep.

Each time runs from a barrier to a barrier (the receiver has everything),
best of ``--repeats``. ``smollm2`` is the default model as the learner holds
it on one CPU rank: parameters flattened into one buffer
(:func:`verimed.core.train.learner.flatten_parameters`), so buckets are views;
``smollm2-separate`` is the same weights as separate tensors (what FSDP's
per-parameter ``full_tensor()`` yields with several ranks: packing is
exercised). The synthetic 1.5B model has Qwen2.5-1.5B's shapes
(hidden 1536, 28 layers, MLP 8960, GQA 2 kv heads, vocab 151936, tied) in
bf16 (2.9 GiB), as separate tensors (packing is exercised; peak ~10 GB over
both processes) or, as ``synthetic-1.5b-flat``, views into one buffer that the
raw baseline also broadcasts (zero-copy buckets; ~6 GB). The table is printed and
appended to bench/RESULTS.md with the machine, date and command.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from machine_info import cpu_model  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from verimed.core.rollout import weight_sync as ws  # noqa: E402

MB = 2**20


def qwen_1p5b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, layers, vocab, kv = 1536, 8960, 28, 151936, 256
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.q_proj.bias", (hidden,)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.v_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)), (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)), (p + "mlp.down_proj.weight", (hidden, inter))]
    return shapes + [("model.norm.weight", (hidden,))]


def synthetic_state(shapes, dtype: torch.dtype, flat_layout: bool) -> tuple[torch.Tensor | None, list]:
    """Named random tensors: separate allocations (like FSDP ``full_tensor()`` outputs: packing is
    exercised), or views into one flat buffer (a learner with a flat parameter buffer: zero-copy buckets)."""
    bits = torch.int16 if dtype.itemsize == 2 else torch.int32
    if not flat_layout:
        named = []
        for name, shape in shapes:
            t = torch.empty(shape, dtype=dtype)
            t.view(bits).random_(0, 2**14)  # cheap, non-constant
            named.append((name, t))
        return None, named
    total = sum(_numel(s) for _, s in shapes)
    flat = torch.empty(total, dtype=dtype)
    flat.view(bits).random_(0, 2**14)
    named, offset = [], 0
    for name, shape in shapes:
        n = _numel(shape)
        named.append((name, flat[offset: offset + n].view(shape)))
        offset += n
    return flat, named


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_model_state(name: str) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]]:
    if name in ("synthetic-1.5b", "synthetic-1.5b-flat"):
        return synthetic_state(qwen_1p5b_shapes(), torch.bfloat16, flat_layout=name.endswith("-flat"))
    from verimed.core.train.learner import flatten_parameters
    from verimed.core.models import load_causal_lm, resolve_model_path

    separate = name.endswith("-separate")
    model = load_causal_lm(resolve_model_path(name.removesuffix("-separate")), "float32")
    flat = None if separate else flatten_parameters(model)  # the learner's layout on one CPU rank
    return flat, [(n, p.detach()) for n, p in model.named_parameters()]


def _barrier(group) -> None:
    group.broadcast(torch.zeros(1), 0).wait()


def _worker(rank: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    group = ws.make_group("127.0.0.1", port, rank, 2, args.backend, timeout_s=600)
    for model in args.models:
        flat, named = load_model_state(model) if rank == 0 else (None, None)
        metas = None
        if rank == 0:
            metas = [ws.describe(named, 1, int(mb * MB)) for mb in args.buckets_mb]
        # Receiver learns the metas over the group itself (sizes only) by recomputing them from the sender's shapes.
        metas = _share_metas(group, rank, metas, device)
        nbytes = metas[0].num_bytes
        arena = ws.ReceiveArena(device)  # an engine keeps one across syncs,
        buffers = ws.SendBuffers(device)  # the learner too
        # raw baseline: one flat buffer of exactly nbytes (the "-flat" tensors are views into one;
        # the receiver reuses its arena's memory for it, to hold the model's bytes once)
        if rank == 0:
            raw = flat if flat is not None else torch.cat([t.reshape(-1) for _, t in named])
            raw = raw.view(torch.uint8).reshape(-1).to(device)
        else:
            arena.layout(metas[0])
            raw = arena.raw[:nbytes]
        runs = [("raw (1 flat buffer)", lambda: group.broadcast(raw, 0).wait(), 1)]
        for mb, meta in zip(args.buckets_mb, metas):
            if rank == 0:
                fn = (lambda m: lambda: ws.broadcast_weights(group, iter(named), m, device, buffers))(meta)
            else:
                fn = (lambda m: lambda: ws.receive_weights(group, m, device, arena=arena))(meta)
            runs.append((f"bucketed {mb:g} MB", fn, len(ws.bucket_plan(meta))))
        # Interleave the paths within each repeat: load from other processes hits all of them alike.
        best = [float("inf")] * len(runs)
        for _ in range(args.repeats):
            for j, (_, fn, _) in enumerate(runs):
                best[j] = min(best[j], _timed(group, fn))
        rows = [(label, nbytes, seconds, buckets) for (label, _, buckets), seconds in zip(runs, best)]
        if rank == 0:
            results.put((model, rows, len(metas[0].names)))
        del flat, named, arena, buffers, raw, runs


def _share_metas(group, rank: int, metas, device):
    """Send the metas (pickled) from rank 0 over the group: length, then bytes."""
    import pickle

    blob = pickle.dumps(metas) if rank == 0 else b""
    size = torch.tensor([len(blob)], dtype=torch.int64)
    group.broadcast(size, 0).wait()
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if rank == 0 else torch.empty(int(size), dtype=torch.uint8)
    group.broadcast(buf, 0).wait()
    return pickle.loads(buf.numpy().tobytes())


def _timed(group, fn) -> float:
    _barrier(group)
    start = time.perf_counter()
    fn()
    _barrier(group)
    return time.perf_counter() - start


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(results: list, args: argparse.Namespace) -> str:
    lines = [f"### Weight sync ({args.backend}, loopback, 1 sender -> 1 receiver)", "",
             f"- machine: {machine()}", f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
             f"- command: `{' '.join(['python', 'bench/weight_sync.py', *sys.argv[1:]])}`",
             f"- best of {args.repeats}; barrier to barrier; raw = one broadcast of one flat buffer of the same bytes, "
             "same run", "",
             "| state dict | tensors | path | buckets | MB | seconds | GB/s | vs raw |",
             "|---|---|---|---|---|---|---|---|"]
    for model, rows, ntensors in results:
        raw_rate = rows[0][1] / rows[0][2]
        for path, nbytes, seconds, buckets in rows:
            rate = nbytes / seconds
            lines.append(f"| {model} | {ntensors} | {path} | {buckets or 1} | {nbytes / MB:.0f} | {seconds:.3f} | "
                         f"{rate / 1e9:.2f} | {rate / raw_rate:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,smollm2-separate,synthetic-1.5b",
                    help="comma list: smollm2 | smollm2-separate | synthetic-1.5b | synthetic-1.5b-flat | an HF "
                         "directory (add -separate for separate tensors)")
    ap.add_argument("--buckets-mb", default="16,64,256", help="bucket-size sweep (MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--no-append", action="store_true", help="print only")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.buckets_mb = [float(b) for b in args.buckets_mb.split(",") if b]
    if args.repeats < 1 or not args.buckets_mb or not args.models:
        ap.error("need --repeats >= 1, at least one bucket size and one model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = [results.get() for _ in args.models]
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print(f"weight_sync bench: a worker failed ({[p.exitcode for p in procs]})", file=sys.stderr)
        return 1
    text = table(out, args)
    print(text)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
