"""Seconds to generate a batch of 8 images after compilation (issue target: < 5 s on a 2-core CPU).

    python bench/generate_speed.py [--model PATH] [--batch 8] [--repeats 5]

Prints the compile time, each timed call, and the median against the 5 s target as a ratio.
"""

import argparse
import statistics
import time

import jax

import jaxdiff


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the bundled model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target-s", type=float, default=5.0)
    args = p.parse_args()

    pipe = jaxdiff.load(args.model)
    prompts = ["a red circle above a blue square"] * args.batch
    t0 = time.perf_counter()
    pipe.generate(prompts, seed=0)
    print(f"devices: {jax.devices()}  defaults: {pipe.defaults}")
    print(f"first call (compile + run): {time.perf_counter() - t0:.2f} s")
    times = []
    for seed in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        pipe.generate(prompts, seed=seed)
        times.append(time.perf_counter() - t0)
        print(f"batch of {args.batch}: {times[-1]:.3f} s")
    median = statistics.median(times)
    print(f"median {median:.3f} s; target {args.target_s:.1f} s; ratio median/target = {median / args.target_s:.2f}")


if __name__ == "__main__":
    main()
