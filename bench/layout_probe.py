"""Can a U-Net architecture turn a caption into a layout at t = T? A screen on clean synthetic targets.

    python bench/layout_probe.py [--unet VARIANT] [--set FIELD=JSON ...] [--target ramp] [--steps 300]
                                 [--text MODEL] [--train-text] [--centred-codes]

At zero terminal SNR the U-Net's input at t = T is pure noise and its best output is -E[x0 | caption]:
for "a red ... to the left of a blue ..." that puts red on the left and blue on the right. The real
objective buries that layout in the variance of x0 (bench/relation_signal.py: 0.024 of a loss of
0.9). Here a freshly initialised shapes U-Net (`configs/shapes_unet.py`, or `--unet VARIANT` of
it) with a random text encoder (or `--text MODEL`'s) is trained at t = T alone on noise-free targets
built from the caption of a random scene of the spec, so what is measured is the architecture, not
the data's noise:
  - constant: +0.3 everywhere for "to the left of" / "above", -0.3 for the opposite, 0 for one object
    (the caption reaches the output at all);
  - ramp:     the same sign times a ramp along the relation's axis, -0.5 to 0.5 (the caption becomes
    a field that differs by position: the layout prior of the relation alone);
  - binding:  the ramp times (u(colour 1) - u(colour 2)), u a fixed random 4-vector per colour (each
    named colour on its own side: the shape of the real E[x0 | caption]);
  - first, second: the ramp times u(colour 1), or times -u(colour 2): one object's half of binding,
    which, unlike binding, has a part that is the same for every colour unless `--centred-codes`.
It prints the fraction of the target's variance left unexplained on 256 held-out captions (fixed
noise) every `--every` steps: 1 is a model that predicts 0, 0 is the target.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for configs/
from configs import shapes_unet  # noqa: E402
from jaxdiff import components, sample  # noqa: E402
from jaxdiff import text  # noqa: E402
from jaxdiff.data import shapes  # noqa: E402
from jaxdiff.models.unet import CONFIG_FIELDS  # noqa: E402
from jaxdiff.train import loop, step as step_lib  # noqa: E402

TARGETS = ("constant", "ramp", "binding", "first", "second")


def relation_axis(relation: str) -> tuple[int, float]:
    """(axis of NHWC latents without the batch: 0 rows, 1 columns; +1 when the relation puts the first
    object on that axis's low side (left, top), else -1), read from the spec's meaning of it."""
    along_x = shapes.relation_gap((1.0, 0.0), (0.0, 0.0), relation)
    along_y = shapes.relation_gap((0.0, 1.0), (0.0, 0.0), relation)
    return (1, -along_x) if along_x else (0, -along_y)


def targets(scenes, target: str, latent_shape: tuple, colour_codes: np.ndarray) -> np.ndarray:
    """[B, h, w, c] targets for `scenes` (see the module docstring)."""
    h, w, c = latent_shape
    colours = list(shapes.COLOURS)
    out = np.zeros((len(scenes), h, w, c), np.float32)
    for i, scene in enumerate(scenes):
        if scene.relation is None:
            continue
        axis, sign = relation_axis(scene.relation)
        n = (h, w)[axis]
        ramp = (0.5 - (np.arange(n) + 0.5) / n) * sign  # + on the first object's side
        field = ramp[:, None] if axis == 0 else ramp[None, :]
        if target == "constant":
            out[i] = 0.3 * sign
        elif target == "ramp":
            out[i] = np.broadcast_to(field[..., None], (h, w, c))
        else:
            first, second = (colour_codes[colours.index(o.colour)] for o in scene.objects)
            code = {"binding": first - second, "first": first, "second": -second}[target]
            out[i] = field[..., None] * code
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", default=None, help=f"a variant of configs/shapes_unet.py {shapes_unet.VARIANTS}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a field of the U-Net's diffusers config, e.g. --set conv_out_kernel=17 "
                         "--set addition_embed_type='\"text\"' (repeatable)")
    ap.add_argument("--target", default="ramp", choices=TARGETS)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--train-text", action="store_true", help="train the text encoder too (default: frozen)")
    ap.add_argument("--text", default=None, metavar="MODEL",
                    help="start from this model's text encoder and tokenizer (a diffusers folder or a run "
                         "directory, e.g. a configs/shapes_clip.py run) instead of a random one")
    ap.add_argument("--centred-codes", action="store_true",
                    help="colour codes with zero mean over the colours: no part of first/second is the "
                         "same for every colour (binding has none either way)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    config = shapes_unet.get_config(args.unet)
    config.init.path = ""  # every component random; the VAE is not used
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or field not in CONFIG_FIELDS:
            ap.error(f"--set {item!r}: expected FIELD=JSON with FIELD a UNet2DConditionModel config field")
        config.model.unet[field] = json.loads(value)
    if args.text:
        config.init.path, config.init.components = args.text, ("text_encoders",)
    configs, params, tokenizers = loop.build_pipeline(config)
    models = components.build_models(configs)
    latent_shape = (*models.sample_size, models.latent_channels)
    t_last = float(configs.scheduler["num_train_timesteps"] - 1)
    codes = np.random.default_rng(args.seed + 1).normal(size=(len(shapes.COLOURS), latent_shape[-1]))
    if args.centred_codes:
        codes -= codes.mean(axis=0)

    def batch(rng, n):
        scenes = [shapes.random_scene(rng) for _ in range(n)]
        ids = tuple(jnp.asarray(text.tokenize(tok, [shapes.caption(s) for s in scenes])) for tok in tokenizers)
        noise = rng.standard_normal((n, *latent_shape)).astype(np.float32)
        return ids, jnp.asarray(noise), jnp.asarray(targets(scenes, args.target, latent_shape, codes))

    trained = ("unet", "text_encoders") if args.train_text else ("unet",)
    fixed = {k: v for k, v in params.items() if k not in trained}
    trainable = {k: params[k] for k in trained}

    def loss_fn(p, ids, noise, target):
        p = {**fixed, **p}
        cond = sample.encode_prompt(models, p["text_encoders"], ids)
        t = jnp.full((noise.shape[0],), t_last, jnp.float32)
        return jnp.mean((sample.apply_unet(models, p["unet"], noise, t, cond) - target) ** 2)

    # The training recipe's optimizer (AdamW, global-norm clipping) at a constant rate after warm-up.
    config.train.learning_rate, config.train.lr_schedule, config.train.warmup_steps = args.lr, "constant", 50
    optimizer = step_lib.make_optimizer(config)
    opt_state = optimizer.init(trainable)

    @jax.jit
    def step(p, opt_state, ids, noise, target):
        updates, opt_state = optimizer.update(jax.grad(loss_fn)(p, ids, noise, target), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    held_out = batch(np.random.default_rng(10_000 + args.seed), 256)
    baseline = float(jnp.mean(held_out[2] ** 2))
    evaluate = jax.jit(loss_fn)
    rng = np.random.default_rng(args.seed)
    name = " ".join([args.unet or "default"] + args.set)
    text_name = f"{args.text}'s" if args.text else "random"
    print(f"U-Net {name!r}, target {args.target!r}, {text_name} text encoder "
          f"{'trained' if args.train_text else 'frozen'}, "
          f"{'centred ' if args.centred_codes else ''}colour codes, "
          f"batch {args.batch}, lr {args.lr}: fraction of the target's variance unexplained")
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        trainable, opt_state = step(trainable, opt_state, *batch(rng, args.batch))
        if i % args.every == 0 or i == args.steps:
            print(f"  step {i:5d}: {float(evaluate(trainable, *held_out)) / baseline:.3f}   "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
