"""Time one learner step of the default model on a GRPO-shaped batch (CPU or GPU).

    .venv/bin/python bench/learner_step.py                       # 2 threads, 4 groups x 4 samples, 250 + 64 tokens
    .venv/bin/python bench/learner_step.py --threads 1 2 --repeats 3
    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/learner_step.py   # the same batch on another commit

The batch: ``--groups`` prompts of ``--prompt`` random tokens, ``--group-size``
responses of ``--response`` tokens each (loss on the responses), random
behaviour log-probs and rewards — the shape of the CPU default's steps. It
builds one :class:`verimed.core.train.learner.Learner` (unsharded, no process
group) from ``configs/default.yaml`` and prints the median wall time of
``train_step`` after one warm-up step, per torch thread count. Only
``Learner(cfg, path)`` and ``train_step(batch)`` are used, so the script
runs unchanged against older commits (the baseline of a change).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last: PYTHONPATH (another checkout to time) and the install come first


def grpo_batch(groups: int, group_size: int, prompt: int, response: int, vocab: int, seed: int = 0,
               behaviour_logprobs: tuple[float, float] = (-9.0, -3.0)):
    """``behaviour_logprobs``: the range the engine's log-probs are drawn from (uniform)."""
    from verimed.core.rl.batch import build_train_batch
    from verimed.core.types import Array, Group, Prompt, Sample, Turn

    rng = np.random.default_rng(seed)
    out, advantages = [], []
    for g in range(groups):
        prompt_ids = rng.integers(0, vocab, prompt).astype(np.int32)
        samples = [Sample(uid=f"{g}/{i}", prompt_ids=Array.of(prompt_ids),
                          response_ids=Array.of(rng.integers(0, vocab, response).astype(np.int32)),
                          response_logprobs=Array.of(rng.uniform(*behaviour_logprobs, response).astype(np.float32)),
                          response_versions=Array.of(np.zeros(response, np.int32)), text="")
                   for i in range(group_size)]
        rewards = rng.uniform(0, 1, group_size).tolist()
        out.append(Group(prompt=Prompt(index=g, source="bench", messages=[Turn("user", "x")]), samples=samples,
                         rewards=rewards, rubric_scores=rewards))
        advantages.append(np.asarray(rewards) - np.mean(rewards))
    return build_train_batch(out, advantages, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=2, help="timed steps per thread count (after one warm-up)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt", type=int, default=250)
    p.add_argument("--response", type=int, default=64)
    args = p.parse_args()

    import verimed
    from verimed.core.config import load_config
    from verimed.core.models import resolve_model_path
    from verimed.core.train.learner import Learner

    cfg = load_config(args.config, [])
    learner = Learner(cfg, resolve_model_path(cfg.model.path, cfg.model.cache_dir))
    batch = grpo_batch(args.groups, args.group_size, args.prompt, args.response, vocab=40000)
    print(f"verimed from {Path(verimed.__file__).parent}; {args.groups} groups x {args.group_size} samples, "
          f"{args.prompt} + {args.response} tokens, {int(batch.loss_mask.numpy().sum())} loss tokens")
    for threads in args.threads:
        torch.set_num_threads(threads)
        learner.train_step(batch)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            learner.train_step(batch)
            times.append(time.perf_counter() - start)
        print(f"threads {threads}: step {statistics.median(times):.2f} s (median of {args.repeats}: "
              f"{' '.join(f'{t:.2f}' for t in times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
