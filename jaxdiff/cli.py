"""jaxdiff command line: `jaxdiff {generate,eval,export,train} ...` (or `python main.py ...`).

Thin on purpose: parse the arguments, hand over to the library. Each command imports what it uses,
so importing this module adds nothing heavy (and never TensorFlow: only `train`'s data pipeline does).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jaxdiff
from jaxdiff.train import run_config

PROG = "jaxdiff"
DESCRIPTION = "Stable Diffusion in JAX/Flax: generate images, score them, train and export models."


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default at the end of its help; an option whose default is None (or an empty
    list) says in its own help what it falls back to ("(default: the model folder's)")."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default is None or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return help
        return super()._get_help_string(action)


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


# -- generate --------------------------------------------------------------------------------------

def _generate_parser(sub, common):
    p = sub.add_parser("generate", parents=[common], formatter_class=_HelpFormatter,
                       help="text to image: write PNGs", description="Text to image: write PNGs and print "
                       "their paths.")
    p.add_argument("prompt_args", nargs="*", metavar="PROMPT", help="prompt(s); or use --prompt")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeatable, after the positional ones; default: none)")
    p.add_argument("--negative-prompt", default=None,
                   help="one negative prompt for every prompt (default: none, the empty prompt)")
    p.add_argument("--model", default=None, metavar="FOLDER",
                   help="a diffusers pipeline folder (default: the bundled shapes model)")
    _add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's sample size)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's sample size)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="out", metavar="DIR",
                   help="output folder (created first; images already there are kept, new ones numbered on)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="refuse images of more pixels than this (0: no cap; a request that cannot fit in "
                        "memory is refused anyway)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="compute dtype of the models (bf16 keeps the params in bf16 too; the sampler and "
                        "the images stay float32)")
    return p


def generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxdiff.images import prepare_out_dir, save_pngs

    prompts = list(args.prompt_args) + list(args.prompt)
    if not prompts:
        raise ValueError("generate: give a prompt (positional or --prompt)")
    prepare_out_dir(args.out)  # a bad --out fails now, not after the generation
    logging.info("devices: %s", jax.devices())
    pipe = jaxdiff.load(args.model, dtype=getattr(jnp, DTYPES[args.dtype]))
    images = pipe.generate(prompts, negative_prompts=args.negative_prompt, height=args.height,
                           width=args.width, steps=args.steps, guidance_scale=args.cfg,
                           sampler=args.sampler, seed=args.seed, num_images_per_prompt=args.batch,
                           guidance_rescale=args.guidance_rescale, max_pixels=args.max_pixels or None)
    for path in save_pngs(images, args.out):
        print(path)
    return 0


def _add_sampling_args(p):
    """How to sample (each defaults to the model folder's setting)."""
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model folder's)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the model folder's)")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="0-1: pull the guided prediction back to the conditional one's std (0.7 for "
                        "zero-terminal-SNR models; default: the model folder's, else 0)")
    p.add_argument("--sampler", default=None,
                   help="a sampler, e.g. ddim, euler_a, dpmpp_2m_karras (an unknown name lists them; "
                        "default: the model folder's)")


# -- eval ------------------------------------------------------------------------------------------

def _eval_parser(sub, common):
    p = sub.add_parser("eval", parents=[common], formatter_class=_HelpFormatter,
                       help="prompt adherence on random shapes captions",
                       description="Prompt adherence on random shapes captions: draw them and score "
                       "the images with the shapes detector.")
    p.add_argument("--model", default=None, metavar="FOLDER",
                   help="a diffusers pipeline folder (default: the bundled shapes model)")
    p.add_argument("--n", type=int, default=200, help="number of captions")
    p.add_argument("--seed", type=int, default=0, help="random seed of the captions and the noise")
    _add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="images drawn at once")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="also write the images and captions to this folder (default: not written)")
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


# -- export ----------------------------------------------------------------------------------------

def _export_parser(sub, common):
    p = sub.add_parser("export", parents=[common], formatter_class=_HelpFormatter,
                       help="write a training run's newest checkpoint as a diffusers folder",
                       description="Write a training run's newest checkpoint as a diffusers folder "
                       "(EMA weights unless --raw).")
    p.add_argument("ckpt_dir", help="the run directory (--workdir of train)")
    p.add_argument("out_dir", help="the diffusers folder to write")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--vae-decoder", default=None, metavar="RUN",
                   help="take the VAE from this run: a decoder-only fine-tune of the VAE the run was "
                        "trained on (configs/shapes_vae.py:decoder); its encoder must be the same "
                        "(default: the run's own VAE)")
    p.add_argument("--sampler", default=None, help="the folder's default sampler (default: the run config's)")
    p.add_argument("--steps", type=int, default=None,
                   help="the folder's default step count (default: the run config's)")
    p.add_argument("--cfg", type=float, default=None,
                   help="the folder's default guidance scale (default: the run config's)")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT_DIR holds")


def export(args) -> int:
    from jaxdiff.train import loop
    from jaxdiff.weights import export as export_lib

    pipe = loop.restore_pipeline(args.ckpt_dir, use_ema=not args.raw)
    if args.vae_decoder:
        pipe = loop.with_vae_decoder(pipe, loop.restore_pipeline(args.vae_decoder))
    overrides = {"sampler": args.sampler, "steps": args.steps, "guidance_scale": args.cfg}
    pipe.defaults.update({k: v for k, v in overrides.items() if v is not None})
    export_lib.check_defaults(pipe.defaults)  # a NaN --cfg, an unknown sampler: named before writing
    pipe.prepare("", steps=pipe.defaults["steps"], sampler=pipe.defaults["sampler"])  # steps it cannot take
    print(export_lib.save(pipe, args.out_dir, overwrite=args.overwrite))
    return 0


# -- train -----------------------------------------------------------------------------------------

def _train_parser(sub, common):
    p = sub.add_parser(
        "train", parents=[common], formatter_class=_HelpFormatter,
        help="train from a config (--config, --workdir, --config.KEY=VALUE)",
        description="Train from a config file; an existing run directory resumes from its newest checkpoint.",
        epilog="Override any config field with --config.KEY=VALUE or --config.KEY VALUE, KEY dotted "
               "(--config.train.steps=100, --config.init.components='(\"vae\",\"text_encoders\")'): the "
               "value is read as the field's type (int, float, bool, str, tuple; others as a Python "
               "literal) and a key the config lacks is an error.")
    p.add_argument("--config", default=None, metavar="FILE[:ARG]",
                   help="the config file, configs/NAME.py or configs/NAME.py:VARIANT (required)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="the run directory; an existing run resumes from its newest checkpoint (required)")
    p.add_argument("--until-step", "--until_step", dest="until_step", type=int, default=None, metavar="N",
                   help="stop after this step (and its checkpoint) instead of at config.train.steps; the "
                        "learning-rate schedule still spans train.steps (default: config.train.steps)")
    return p


def train(args) -> int:
    if args.config is None or args.workdir is None:
        raise ValueError("train needs --config configs/NAME.py and --workdir DIR")
    config = run_config.load_config(args.config)
    run_config.override_config(config, args.config_overrides)
    config.lock()

    import jax

    from jaxdiff import parallel
    from jaxdiff.train import loop

    parallel.initialize_distributed()  # multi-host: from the environment (TPU pods, SLURM, JAXDIFF_*)
    logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    loop.train(config, args.workdir, until_step=args.until_step)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `jaxdiff` parser and its subcommands' parsers, by name."""
    verbose_help = "log at INFO: the devices, jax's backends, library notices (default: warnings only)"
    common = argparse.ArgumentParser(add_help=False)  # --verbose after the subcommand as well
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {jaxdiff.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,eval,export,train}")
    commands = {"generate": _generate_parser(sub, common), "eval": _eval_parser(sub, common),
                "export": _export_parser(sub, common), "train": _train_parser(sub, common)}
    return parser, commands


def _quiet_start(verbose: bool, command: str) -> None:
    """Logging as the command wants it. Without --verbose: warnings only (train: also its own progress
    lines, resumed from step N...), and none of the libraries' start-up notices (jax's "Unable to
    initialize backend 'tpu'", transformers' "PyTorch was not found", TensorFlow's C++ INFO lines)."""
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # read when TensorFlow is imported
        logging.getLogger("jax").setLevel(logging.WARNING)
    level = logging.INFO if verbose or command == "train" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, overrides = run_config.split_overrides(argv)
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if overrides and args.command != "train":
        commands[args.command].error("unrecognized arguments: "
                                     + " ".join(f"{run_config.OVERRIDE}{k}" for k, _ in overrides)
                                     + " (config overrides are for train)")
    args.config_overrides = overrides
    _quiet_start(args.verbose, args.command)
    command = {"generate": generate, "eval": evaluate, "export": export, "train": train}[args.command]
    return _report_errors(command, args)


# Errors that describe bad input or an unusable file: one line, exit 2. (WeightError, JSON and
# Unicode errors are ValueErrors; FileNotFoundError, PermissionError... are OSErrors.)
USER_ERRORS = (ValueError, OSError, NotImplementedError)


def _report_errors(command, args) -> int:
    """Runs the command; every exception becomes one line on stderr (a traceback only with --verbose)."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of jaxdiff's or a library's: still one line, and how to see more
        if args.verbose:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (jaxdiff --verbose shows the traceback)",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException, limit: int = 2000) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


if __name__ == "__main__":
    sys.exit(main())
