"""jaxdiff command line: `python main.py {generate,train,eval,export} ...`.

Thin on purpose: parse flags, log the devices, hand over to the library.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _generate_parser(sub):
    p = sub.add_parser("generate", help="text to image: write PNGs")
    p.add_argument("prompt_args", nargs="*", metavar="PROMPT", help="prompt(s); or use --prompt")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None, help="one negative prompt for every prompt")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder (default: the bundled model)")
    _add_sampling_args(p)
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
                           sampler=args.sampler, seed=args.seed, num_images_per_prompt=args.batch,
                           guidance_rescale=args.guidance_rescale)
    for path in save_pngs(images, args.out):
        print(path)
    return 0


def _add_sampling_args(p):
    """How to sample (each defaults to the model folder's setting)."""
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="0-1: pull the guided prediction back to the conditional one's std (0.7 for "
                        "zero-terminal-SNR models; default: the model folder's, else 0)")
    p.add_argument("--sampler", default=None)


def _eval_parser(sub):
    p = sub.add_parser("eval", help="prompt adherence on random shapes captions")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder (default: the bundled model)")
    p.add_argument("--n", type=int, default=200, help="number of captions")
    p.add_argument("--seed", type=int, default=0)
    _add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save", default=None, help="also write the images and captions to this folder")
    p.add_argument("--relation-sensitivity", action="store_true",
                   help="also redraw each two-object caption with the opposite relation from the same "
                        "noise, and print how often the image changes (0: the relation is not read)")
    p.add_argument("--relation-loss-gap", action="store_true",
                   help="also print the U-Net's loss on two-object validation images at high noise with "
                        "each caption as written and with the opposite relation (equal: not read)")
    p.add_argument("--vae-roundtrip", action="store_true",
                   help="also score the VAE's reconstructions of N validation images: the ceiling the VAE "
                        "puts on adherence")


def evaluate(args) -> int:
    import jaxdiff
    from jaxdiff.eval import prompt_adherence
    from jaxdiff.images import save_pngs

    pipe = jaxdiff.load(args.model)
    sampling = dict(n=args.n, seed=args.seed, batch_size=args.batch_size, steps=args.steps,
                    guidance_scale=args.cfg, sampler=args.sampler, guidance_rescale=args.guidance_rescale)
    scores, captions, images = prompt_adherence.evaluate(pipe, **sampling)
    if args.save:
        save_pngs(images, args.save)
        with open(f"{args.save}/captions.txt", "w") as f:
            f.write("\n".join(captions) + "\n")
    print(prompt_adherence.format_scores(scores))
    if args.relation_sensitivity:
        s = prompt_adherence.relation_sensitivity(pipe, **sampling)
        print(f"relation sensitivity: {s['changed']:.3f} of {s['n']} images change when the relation is "
              f"reversed (mean |difference| {s['mean_difference']:.4f})")
    if args.relation_loss_gap:
        print("U-Net loss on two-object validation images, as written / with the opposite relation:")
        for t, (written, flipped) in prompt_adherence.relation_loss_gap(pipe, seed=args.seed).items():
            print(f"  t={t}: {written:.4f} / {flipped:.4f} (gap {flipped - written:+.4f})")
    if args.vae_roundtrip:
        print(f"VAE round trip of {args.n} validation images (what the decoder can draw at best):")
        print(prompt_adherence.format_scores(prompt_adherence.vae_roundtrip(pipe, n=args.n,
                                                                            batch_size=args.batch_size)))
    return 0


def _export_parser(sub):
    p = sub.add_parser("export", help="write a training run's newest checkpoint as a diffusers folder")
    p.add_argument("ckpt_dir", help="the run directory (--workdir of train)")
    p.add_argument("out_dir", help="the diffusers folder to write")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--vae-decoder", default=None, metavar="RUN",
                   help="take the VAE from this run: a decoder-only fine-tune of the VAE the run was "
                        "trained on (configs/shapes_vae.py:decoder); its encoder must be the same")
    p.add_argument("--sampler", default=None, help="the folder's default sampler (else the run config's)")
    p.add_argument("--steps", type=int, default=None, help="the folder's default step count")
    p.add_argument("--cfg", type=float, default=None, help="the folder's default guidance scale")
    p.add_argument("--overwrite", action="store_true")


def export(args) -> int:
    from jaxdiff.train import loop
    from jaxdiff.weights import export as export_lib

    pipe = loop.restore_pipeline(args.ckpt_dir, use_ema=not args.raw)
    if args.vae_decoder:
        pipe = loop.with_vae_decoder(pipe, loop.restore_pipeline(args.vae_decoder))
    overrides = {"sampler": args.sampler, "steps": args.steps, "guidance_scale": args.cfg}
    pipe.defaults.update({k: v for k, v in overrides.items() if v is not None})
    pipe.prepare("", steps=pipe.defaults["steps"], sampler=pipe.defaults["sampler"])  # names a bad value
    print(export_lib.save(pipe, args.out_dir, overwrite=args.overwrite))
    return 0


def train(argv) -> int:
    """`main.py train --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]`."""
    from absl import flags
    from ml_collections import config_flags

    import jax

    from jaxdiff import parallel
    from jaxdiff.train import loop

    FLAGS = flags.FLAGS
    if "config" not in FLAGS:
        config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
        flags.DEFINE_string("workdir", None, "run directory; an existing run resumes from its newest checkpoint")
        flags.DEFINE_integer("until_step", None, "stop after this step (and its checkpoint) instead of at "
                             "config.train.steps; the learning-rate schedule still spans train.steps")
    argv = ["main.py train"] + list(argv)
    # config_flags finds the --config.KEY overrides in sys.argv, not in the list parsed, and absl keeps
    # values from an earlier parse: both matter when main() is called in-process (tests, notebooks).
    saved_argv, sys.argv = sys.argv, argv
    try:
        if FLAGS.is_parsed():
            FLAGS.unparse_flags()
        FLAGS(argv)
    except flags.Error as e:  # unknown flag or config key, bad value: name it, no traceback
        raise ValueError(str(e)) from None
    except (AttributeError, KeyError) as e:  # --config.KEY=VALUE for a KEY the config does not have
        while isinstance(e, BaseException) and e.args:  # ml_collections wraps its KeyError's message
            e = e.args[0]
        raise ValueError(f"no such config field: {' '.join(str(e).split())}") from None
    finally:
        sys.argv = saved_argv
    config = FLAGS.config
    if config is None or FLAGS.workdir is None:
        raise ValueError("train needs --config configs/NAME.py and --workdir DIR")
    try:
        config.get("mode")  # ml_collections raises a config file it could not load at first use
    except OSError as e:
        raise ValueError(f"cannot load --config: {' '.join(str(e).split())}") from None
    parallel.initialize_distributed()  # multi-host: from the environment (TPU pods, SLURM, JAXDIFF_*)
    logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    loop.train(config, FLAGS.workdir, until_step=FLAGS.until_step)
    return 0


def keep_compiled_programs() -> None:
    """Turn on jax's persistent compilation cache, in ~/.cache/jaxdiff/xla (XDG_CACHE_HOME is honoured).

    Compiling is most of a short command's time: the second `generate` of the bundled model takes 10 s
    instead of 16 on 2 cores, and a resumed or repeated training stage skips its train step's compile.
    XLA:CPU checks an entry's target CPU features before it loads it and compiles afresh on a mismatch
    (some Intel CPUs fail that check on every entry and log an error line for each: jax issue 38445).
    JAX_COMPILATION_CACHE_DIR, when set, wins (jax reads it itself: a folder all hosts of a pod share,
    or empty to turn the cache off).
    """
    import jax

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "jaxdiff", "xla"))
    jax.config.update("jax_compilation_cache_max_size", 1 << 30)  # least recently used entries go first


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    keep_compiled_programs()
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    sub.add_parser("train", help="train from a config (flags: --config, --workdir, --config.KEY=VALUE)",
                   add_help=False)
    if argv[:1] == ["train"]:  # absl owns the flags of `train` (ml_collections config overrides)
        return _report_errors(train, argv[1:])
    args = parser.parse_args(argv)
    return _report_errors({"generate": generate, "eval": evaluate, "export": export}[args.command], args)


def _report_errors(command, args) -> int:
    try:
        return command(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
