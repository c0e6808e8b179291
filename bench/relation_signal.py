"""How much a shapes model's loss at t = T (zero terminal SNR) can gain from reading the relation.

    python bench/relation_signal.py [--model PATH] [--images 24000]

At zero SNR the noisy latent is pure noise, the v target is -x0, and the best prediction is
-E[x0 | caption]: the loss gain from a caption part is how far it moves that conditional mean. On the
two-object images among the first `--images` of the spec's training split, in the model's VAE latent
space, this prints
  - the gain of knowing the colours (unordered) over knowing nothing;
  - the gain of knowing the relation and which colour is named first, over the unordered colours;
  - the model's own loss at t = T with the captions as written and with the opposite relation;
  - the layout prior, data against model: E[x0 | red left of blue] - E[x0 | red right of blue] by
    latent column (rows and shapes averaged), and the same difference of the model's mean clean-image
    estimate at t = T (over `--noise` draws) for "a red square to the left of / to the right of a
    blue square". The data's changes sign between the halves; a relation-blind model's is flat.
A model that reads relations closes part of the second gap; `eval --relation-loss-gap` shows the
model's side alone. The gains are split-half estimates (the data split in two by index parity, the
means of one half against those of the other), which the groups' finite sizes do not bias upwards.
"""

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import sample
from jaxdiff.data import shapes
from jaxdiff.eval import prompt_adherence


def split_half_gain(latents: np.ndarray, fine: list, coarse: list) -> float:
    """E ||E[x | fine group] - E[x | coarse group]||^2 per value, estimated as the mean product of
    the two halves' differences (each half's means carry independent sampling noise)."""
    half = np.arange(len(latents)) % 2

    def means(keys):
        groups = collections.defaultdict(lambda: ([], []))
        for i, k in enumerate(keys):
            groups[k][half[i]].append(i)
        # a group seen in one half only has no independent estimate: left out
        return {k: tuple(latents[idx].mean(0) for idx in g) for k, g in groups.items() if all(g)}

    mf, mc = means(fine), means(coarse)
    return float(np.mean([np.mean((mf[f][0] - mc[c][0]) * (mf[f][1] - mc[c][1]))
                          for f, c in zip(fine, coarse) if f in mf and c in mc]))


def mean_clean_estimate(pipe, caption: str, shape: tuple, draws: int) -> np.ndarray:
    """The model's clean-latent estimate at its last timestep, averaged over `draws` noise inputs:
    at zero terminal SNR, its estimate of E[x0 | caption], the layout it starts sampling from."""
    from jaxdiff import text
    from jaxdiff.sampling import schedules

    models, params = pipe.models, pipe.params
    ids = tuple(jnp.asarray(text.tokenize(tok, [caption] * 64)) for tok in pipe.tokenizers)
    cond = sample.encode_prompt(models, params["text_encoders"], ids)
    alphas_cumprod = schedules.alphas_cumprod(pipe.configs.scheduler)
    ac = jnp.float32(alphas_cumprod[-1])
    t = jnp.full((64,), len(alphas_cumprod) - 1, jnp.float32)

    @jax.jit
    def x0(key):
        noisy = jax.random.normal(key, (64, *shape))
        pred = sample.apply_unet(models, params["unet"], noisy, t, cond)
        # x0 = sqrt(ac) x_t - sqrt(1 - ac) v, or (x_t - sqrt(1 - ac) eps) / sqrt(ac). Not
        # loop.denoiser: it works in sigma space, where zero terminal SNR is sigma = inf.
        return (jnp.sqrt(ac) * noisy - jnp.sqrt(1 - ac) * pred if models.prediction_type == "v_prediction"
                else (noisy - jnp.sqrt(1 - ac) * pred) / jnp.sqrt(ac)).mean(0)

    return np.mean([np.asarray(x0(jax.random.key(i))) for i in range(max(1, draws // 64))], 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a diffusers folder (default: the bundled model)")
    p.add_argument("--images", type=int, default=24000)
    p.add_argument("--noise", type=int, default=512, help="noise draws for the model's mean at t = T")
    args = p.parse_args()

    pipe = jaxdiff.load(args.model)
    models, params = pipe.models, pipe.params
    size = pipe.default_size()[0]
    images, ordered, unordered = [], [], []
    for i in range(args.images):
        image, caption = shapes.sample(i, "train", size)
        labels, relation = shapes.parse_caption(caption)
        if relation is not None:
            (c1, _), (c2, _) = labels
            images.append(image)
            ordered.append((c1, c2, relation))
            unordered.append(tuple(sorted((c1, c2))))
    encode = jax.jit(lambda x: sample.encode_images(models, params["vae"], x))
    latents = np.concatenate([np.asarray(encode(jnp.asarray(np.stack(images[i:i + 512]) / 255.0, jnp.float32)))
                              for i in range(0, len(images), 512)])
    nothing = [()] * len(latents)
    print(f"{len(latents)} two-object images; latent variance {latents.var():.4f}")
    print(f"loss gain at t=T of the colours, over nothing:            {split_half_gain(latents, unordered, nothing):.4f}")
    print(f"loss gain at t=T of the relation and order, over colours: {split_half_gain(latents, ordered, unordered):.4f}")
    np.set_printoptions(precision=2, suppress=True, linewidth=200)
    data_mean = lambda relation: latents[[key == ("red", "blue", relation) for key in ordered]].mean(0)
    model_mean = lambda relation: mean_clean_estimate(pipe, f"a red square {relation} a blue square",
                                                      latents.shape[1:], args.noise)
    print("layout prior, left-of minus right-of (red, blue), by latent column, one row per channel")
    for name, mean in (("data", data_mean), ("model at t=T", model_mean)):
        print(f"{name}:\n", (mean("to the left of") - mean("to the right of")).mean(0).T)
    (written, flipped), = prompt_adherence.relation_loss_gap(pipe, timesteps=(999,)).values()
    print(f"the model's loss at t=999 (256 validation images): as written {written:.4f}, "
          f"opposite relation {flipped:.4f} (gap {flipped - written:+.4f})")


if __name__ == "__main__":
    main()
