"""CPU cost of one emulated engine decoding many sequences (the tick loop's own cost).

    python bench/emulated_engine.py --groups 64 --n 16 --time-scale 25
    git show REV:verimed/core/emulate/engine.py > /tmp/engine_rev.py
    python bench/emulated_engine.py --engine-file /tmp/engine_rev.py ...   # the same with another revision

Prints the process CPU seconds, wall seconds and ticks for ``groups`` requests of ``n`` samples each
(up to ``--max-tokens`` tokens, profile h100-qwen2.5-7b, the tiny model's tokenizer). 64 engines share
bench/scale.py's 2 cores, so CPU per tick there is CPU the controller does not get.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time

from verimed.core.emulate.profile import load_profile
from verimed.core.emulate.tokens import LightTokenizer
from verimed.core.models import resolve_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-file", help="an engine.py to load instead of verimed.core.emulate.engine")
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--n", type=int, default=16, help="samples per request")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--time-scale", type=float, default=25.0)
    args = p.parse_args()
    if args.engine_file:
        spec = importlib.util.spec_from_file_location("engine_under_test", args.engine_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import verimed.core.emulate.engine as module
    tokenizer = LightTokenizer(resolve_model_path("smollm2"))
    engine = module.EmulatedEngine(load_profile("h100-qwen2.5-7b"), tokenizer, time_scale=args.time_scale, seed=0)
    prompt = tokenizer.encode("Patient reports chest pain radiating to the left arm, sweating and nausea. " * 8)

    async def run():
        wall, cpu = time.perf_counter(), time.process_time()
        outs = await asyncio.gather(*[engine.generate(prompt, args.n, max_tokens=args.max_tokens, temperature=1.0,
                                                      seed=i) for i in range(args.groups)])
        return time.perf_counter() - wall, time.process_time() - cpu, sum(len(o.token_ids) for g in outs for o in g)

    wall, cpu, tokens = asyncio.run(run())
    print(f"{args.engine_file or 'verimed.core.emulate.engine'}: {args.groups}x{args.n} sequences, {tokens} tokens, "
          f"wall {wall:.2f} s, CPU {cpu:.2f} s, ticks {engine.ticks}")


if __name__ == "__main__":
    main()
