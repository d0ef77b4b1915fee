"""The driver's heap without Ray: GC-tracked objects per buffered group, and RSS over packing steps.

    .venv/bin/python bench/driver_heap.py                 # glibc's default mmap threshold
    .venv/bin/python bench/driver_heap.py --fixed-mmap    # the threshold Controller.run fixes

Builds 4096 synthetic groups as the engines return them (``group_samples``: G = 16 samples of
64 tokens, one 300-600-token prompt), then runs 30 steps of what ``Controller.step`` does to the
buffer: take B = 512 groups, pack them (``build_train_batch``) and pickle the batch in a worker
thread, refill with 512 new groups. Prints the tracked objects per group, a full collection's
time, and the RSS after every step (bench/RESULTS.md, tenth session).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's verimed
from verimed.actors.controller import fix_malloc_mmap_threshold  # noqa: E402
from verimed.core.rl.batch import build_train_batch  # noqa: E402
from verimed.core.rollout.engines import EngineOutput, group_samples  # noqa: E402
from verimed.core.tasks.groups import GroupResult  # noqa: E402
from verimed.core.types import Group, Prompt, Turn  # noqa: E402

GROUPS, B, G, STEPS = 4096, 512, 16, 30


def synthetic_group(draw: int, rng: np.random.Generator) -> GroupResult:
    outs = [EngineOutput(list(range(64)), np.zeros(64, np.float32), [0] * 64, "x" * 300, "length") for _ in range(G)]
    samples = group_samples(f"{draw}/0", rng.integers(0, 1000, int(rng.integers(300, 600))).tolist(), outs)
    group = Group(prompt=Prompt(index=draw, source="cases", messages=[Turn("user", "v" * 2000)], answer="a"),
                  samples=samples, rewards=[0.0] * G, rubric_scores=[0.0] * G)
    return GroupResult(group=group, advantages=np.zeros(G), kept=True, seconds={"generate": 1.0})


async def main(fixed_mmap: bool) -> None:
    if fixed_mmap and not fix_malloc_mmap_threshold():
        raise SystemExit("--fixed-mmap: this C library has no mallopt (not glibc)")
    rng = np.random.default_rng(0)
    gc.collect()
    tracked_before = len(gc.get_objects())
    buffer = [synthetic_group(d, rng) for d in range(GROUPS)]
    gc.collect()
    print(f"GC-tracked objects per group: {(len(gc.get_objects()) - tracked_before) / GROUPS:.1f}")
    t0 = time.perf_counter()
    gc.collect()
    print(f"full collection with {GROUPS} groups: {1e3 * (time.perf_counter() - t0):.0f} ms")
    process, rss, draw = psutil.Process(), [], GROUPS
    for step in range(STEPS):
        taken, buffer = buffer[:B], buffer[B:]
        batch = await asyncio.to_thread(build_train_batch, [r.group for r in taken], [r.advantages for r in taken], step)
        await asyncio.to_thread(pickle.dumps, batch, 5)
        del batch, taken
        buffer += [synthetic_group(draw + i, rng) for i in range(B)]
        draw += B
        rss.append(round(process.memory_info().rss / 2**20))
    print(f"RSS after each of {STEPS} steps (MiB): {rss}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixed-mmap", action="store_true", help="fix glibc's mmap threshold first (as Controller.run does)")
    asyncio.run(main(p.parse_args().fixed_mmap))
