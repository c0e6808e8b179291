"""Seconds per image of whole text-to-image generation: jaxdiff against diffusers, in one process,
same weights, prompt and starting noise.

    python bench/txt2img_speed.py [--arch sd15|sdxl] [--size 512] [--steps 20] [--sampler euler]
                                  [--guidance 7.5] [--batch 1] [--repeats 1] [--dtype fp32|bf16]
                                  [--compile-cache] [--tiny]

Builds a diffusers StableDiffusionPipeline (`--arch sd15`: SD 1.5's U-Net, VAE and CLIP ViT-L text
encoder) or StableDiffusionXLPipeline (`--arch sdxl`: SDXL base's U-Net, two text encoders and VAE)
with random weights in memory (configs in bench/common.py, nothing downloaded), saves it with
`save_pretrained` to a temporary folder and loads that with `jaxdiff.load`. diffusers samples with
the scheduler that jaxdiff's `--sampler` reproduces (`jaxdiff.sampling.schedules.counterpart`).
Both run once to warm up (jaxdiff's first call includes compilation), then `--repeats` times each,
interleaved; it prints each call, the medians in seconds per image, their ratio, and the largest
pixel difference between the two libraries' images (a check that they computed the same thing).
jaxdiff's persistent compilation cache is off unless `--compile-cache`, so that its first call
includes a full compile.

On a 2-core CPU this is slow: SD 1.5 at 512x512 and 20 steps takes minutes per image, hence one
timed repeat by default. `--arch sdxl` defaults to 1 step at 512x512, and needs about 30 GB of RAM
in float32 (two copies of 3.5 billion parameters). `--tiny` runs tiny models of the same
architecture at 64x64, to check the script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=common.ARCHS, default="sd15")
    p.add_argument("--size", type=int, default=None, help="image height and width (default 512; --tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="default: 20 (sd15), 1 (sdxl)")
    p.add_argument("--sampler", default="euler", help="a jaxdiff sampler name; diffusers uses its counterpart")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--repeats", type=int, default=1, help="timed calls of each library after one warm-up")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="jaxdiff.load's dtype and diffusers' model dtype")
    p.add_argument("--compile-cache", action="store_true",
                   help="leave jaxdiff's persistent compilation cache on (default off: the first call compiles)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--progress-every", type=int, default=5,
                   help="log every N diffusers steps (0: never); jaxdiff runs all steps in one compiled call")
    p.add_argument("--tiny", action="store_true", help="tiny models of the same architecture (checks the script)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size = args.size or (64 if args.tiny else 512)
    steps = args.steps or (20 if args.arch == "sd15" else 1)
    common.ensure_jaxdiff_importable()
    if not args.compile_cache:  # jaxdiff.load turns jax's persistent cache on; a cold compile is measured
        os.environ["JAXDIFF_COMPILE_CACHE"] = "0"

    import jax
    import torch

    import jaxdiff

    if args.threads:
        torch.set_num_threads(args.threads)
    common.log(f"jax {jax.__version__} on {jax.devices()}, torch {torch.__version__} with {torch.get_num_threads()} "
               f"threads; {args.arch}{' (tiny)' if args.tiny else ''} {size}x{size}, {steps} steps, "
               f"{args.sampler}, guidance {args.guidance}, batch {args.batch}, {args.dtype}")
    t, ref = common.timed(common.build_pipeline, args.arch, tiny=args.tiny, dtype=common.torch_dtype(args.dtype),
                          seed=args.seed)
    n_params = {name: sum(p.numel() for p in getattr(ref, name).parameters()) / 1e6
                for name in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(ref, name, None) is not None}
    common.log(f"diffusers pipeline built in {t:.1f} s; parameters (M): "
               + ", ".join(f"{k} {v:.1f}" for k, v in n_params.items()))
    folder = tempfile.mkdtemp(prefix=f"txt2img_{args.arch}_")
    try:
        t, _ = common.timed(ref.save_pretrained, folder, safe_serialization=True)
        common.log(f"saved to {folder} ({common.folder_bytes(folder) / 1e9:.2f} GB) in {t:.1f} s")
        t, pipe = common.timed(jaxdiff.load, folder, dtype=common.jax_dtype(args.dtype))
        common.log(f"jaxdiff.load in {t:.1f} s (params {common.param_dtypes(pipe.params)}); "
                   f"peak RSS {common.peak_rss_gb():.1f} GB")
        scheduler = common.use_counterpart_scheduler(ref, args.sampler, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    case = common.Txt2Img(ref, pipe, args.batch, size, steps, args.guidance, args.sampler, seed=args.seed,
                          progress_every=args.progress_every)

    common.log("jaxdiff first call (compile + run; one compiled call, no per-step progress)...")
    first_jax, img_jax = common.timed(case.jaxdiff)
    common.log(f"jaxdiff first call {first_jax:.2f} s; diffusers ({scheduler}) warm-up...")
    first_torch, img_torch = common.timed(case.diffusers)
    diff = common.max_abs_diff(img_jax, img_torch)
    common.log(f"diffusers warm-up {first_torch:.2f} s; max pixel difference {common.fmt(diff, '.2e')}")
    times_torch, times_jax = [], []
    for r in range(args.repeats):
        times_torch.append(common.timed(case.diffusers)[0])
        common.log(f"run {r + 1}/{args.repeats}: diffusers {times_torch[-1]:.2f} s")
        times_jax.append(common.timed(case.jaxdiff)[0])
        common.log(f"run {r + 1}/{args.repeats}: jaxdiff {times_jax[-1]:.2f} s")
    med_torch, med_jax = common.median(times_torch), common.median(times_jax)
    if med_torch is None:  # --repeats 0: the warm-up calls are all there is
        med_torch, med_jax = first_torch, None
    per = lambda s: common.fmt(None if s is None else s / args.batch, ".2f")
    compile_s = None if med_jax is None else first_jax - med_jax
    print()
    print(f"{args.arch}{' (tiny)' if args.tiny else ''} text-to-image, {size}x{size}, {steps} steps of {args.sampler} "
          f"(diffusers {scheduler}), guidance {args.guidance}, batch {args.batch}, {args.dtype}; medians of "
          f"{args.repeats}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print()
    print(common.markdown_table(
        ["case", "diffusers s/image", "jaxdiff s/image", "diffusers/jaxdiff", "jaxdiff first call s",
         "jaxdiff compile s (first - median)", "max pixel diff", "peak RSS GB"],
        [[f"{args.arch} {size}x{size} b{args.batch}", per(med_torch), per(med_jax),
          common.fmt(None if med_jax is None else med_torch / med_jax, ".2f"), f"{first_jax:.1f}",
          common.fmt(compile_s, ".1f"), common.fmt(diff, ".1e"), f"{common.peak_rss_gb():.1f}"]]))
    if case.nonfinite:
        print(f"note: {case.nonfinite} jaxdiff call(s) gave NaN or infinite pixels (random weights); timed anyway")


if __name__ == "__main__":
    main()
