"""Seconds to generate a batch of 8 images after compilation (issue target: < 5 s on a 2-core CPU).

    python bench/generate_speed.py [--model PATH] [--batch 8] [--repeats 5] [--no-diffusers]

Prints the compile time, each timed call, and the median against the 5 s target as a ratio. Where
diffusers and torch are installed (the test extras), it also times diffusers' StableDiffusionPipeline
on the same folder, with the same scheduler, steps, guidance and size, in this run, as the reference.
"""

import argparse
import statistics
import time

import jax

import jaxdiff
from jaxdiff.sampling import schedules


def median_seconds(run, repeats: int, label: str) -> float:
    times = []
    for seed in range(1, repeats + 1):
        t0 = time.perf_counter()
        run(seed)
        times.append(time.perf_counter() - t0)
        print(f"{label}: {times[-1]:.3f} s")
    return statistics.median(times)


def diffusers_seconds(pipe, prompts, repeats: int) -> float | None:
    try:
        import torch
        from diffusers import StableDiffusionPipeline
    except ImportError:
        print("diffusers/torch not installed: no reference")
        return None
    # diffusers samples with the folder's scheduler class: a like-for-like reference only where that is
    # the default sampler's counterpart.
    sampler, folder_class = pipe.defaults["sampler"], pipe.configs.scheduler.get("_class_name")
    if schedules.COUNTERPARTS[sampler][0] != folder_class:
        print(f"no reference: the folder's scheduler is {folder_class}, not the counterpart of {sampler}")
        return None
    ref = StableDiffusionPipeline.from_pretrained(pipe.path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    height, width = pipe.default_size()
    kw = dict(num_inference_steps=pipe.defaults["steps"], guidance_scale=pipe.defaults["guidance_scale"],
              height=height, width=width, output_type="np")
    print(f"diffusers {ref.scheduler.__class__.__name__}, torch threads {torch.get_num_threads()}")
    with torch.inference_mode():
        ref(prompts, generator=torch.Generator().manual_seed(0), **kw)  # warm-up
        return median_seconds(lambda s: ref(prompts, generator=torch.Generator().manual_seed(s), **kw),
                              repeats, f"diffusers batch of {len(prompts)}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the bundled model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target-s", type=float, default=5.0)
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference")
    args = p.parse_args()

    pipe = jaxdiff.load(args.model)
    prompts = ["a red circle above a blue square"] * args.batch
    t0 = time.perf_counter()
    pipe.generate(prompts, seed=0)
    print(f"devices: {jax.devices()}  defaults: {pipe.defaults}")
    print(f"first call (compile + run): {time.perf_counter() - t0:.2f} s")
    median = median_seconds(lambda s: pipe.generate(prompts, seed=s), args.repeats, f"batch of {args.batch}")
    print(f"median {median:.3f} s; target {args.target_s:.1f} s; ratio median/target = {median / args.target_s:.2f}")
    if not args.no_diffusers:
        ref = diffusers_seconds(pipe, prompts, args.repeats)
        if ref is not None:
            print(f"diffusers median {ref:.3f} s; ratio jaxdiff/diffusers = {median / ref:.2f}")


if __name__ == "__main__":
    main()
