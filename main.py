"""jaxdiff command line: `python main.py generate ...` (train, eval and export come with training).

Thin on purpose: parse flags, log the devices, hand over to the library.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _generate_parser(sub):
    p = sub.add_parser("generate", help="text to image: write PNGs")
    p.add_argument("prompt_args", nargs="*", metavar="PROMPT", help="prompt(s); or use --prompt")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None, help="one negative prompt for every prompt")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale")
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16")
    return p


def generate(args) -> int:
    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff.images import save_pngs

    prompts = list(args.prompt_args) + list(args.prompt)
    if not prompts:
        raise SystemExit("generate: give a prompt (positional or --prompt)")
    logging.info("devices: %s", jax.devices())
    pipe = jaxdiff.load(args.model, dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    images = pipe.generate(prompts, negative_prompts=args.negative_prompt, height=args.height,
                           width=args.width, steps=args.steps, guidance_scale=args.cfg,
                           sampler=args.sampler, seed=args.seed, num_images_per_prompt=args.batch)
    for path in save_pngs(images, args.out):
        print(path)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"generate": generate}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
