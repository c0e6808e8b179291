"""One multi-head attention call: jaxdiff's implementations and layouts against torch's SDPA.

    python bench/attention_speed.py [--shapes NAME,...] [--variants NAME,...] [--repeats 3]
    XLA_FLAGS=... python bench/attention_speed.py ...    (XLA flags are read when jax starts)

For each shape (SD1.5's attention calls: self-attention at each U-Net level, cross-attention over
77 tokens, the VAE mid-block's single head of 512, the text encoder's causal 77 tokens) it times,
interleaved in one process after a warm-up call each, and prints medians:

  torch      torch.nn.functional.scaled_dot_product_attention, with diffusers' views and transposes
             around it ([B, T, H*D] -> [B, H, T, D] -> back)
  dpa        jax.nn.dot_product_attention(implementation="xla") (the "xla" path; whole score matrix)
  bthd       einsum "bqhd,bkhd->bhqk" on the [B, T, H, D] views, float32 softmax, einsum back
  bhtd       the same after transposing to [B, H, T, D] first
  q<c>[k<k>][g<g>]  jaxdiff's chunked path, steps of g (default: the plan's) of the B*H slices
             times c queries against all keys (exact softmax), or with k, against chunks of k keys
             with an online softmax (flash style)
  chunked    the chunked path with the plan's chunks (attention._plan)
  auto       jaxdiff.models.attention.multihead_attention as shipped (what "auto" picks)

With --unet it times instead a whole SD1.5-architecture U-Net forward (diffusers'
UNet2DConditionModel(cross_attention_dim=768), its default config otherwise; random weights, the same
in both) at --latent x --latent latents, batch --batch, float32: diffusers-torch against jaxdiff with
the attention setting "xla" (jaxdiff before the chunked path: jax.nn.dot_product_attention
everywhere) and "auto", interleaved, medians of --repeats after a warm-up call each.

Every jax variant is jitted with its [B, T, H*D] reshapes, float32 inputs unless --dtype bfloat16;
"torch/x" is torch's median over the variant's (above 1: jax is faster). Calls shorter than 50 ms are
repeated within each sample (its mean per call). Each variant's output is
checked against dpa's (max abs difference) once.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxdiff.models import attention  # noqa: E402

# name -> (batch, query tokens, key tokens, heads, head_dim, causal). SD1.5 (8 heads; channels
# 320/640/1280 -> head_dim 40/80/160); 64x64 latents (512x512 images) have 4096/1024/256 tokens at
# the three attention levels, 32x32 latents 1024/256/64; batch 2 is one image with guidance.
SHAPES = {
    "self4096x40": (2, 4096, 4096, 8, 40, False),
    "self4096x40b4": (4, 4096, 4096, 8, 40, False),  # the probe of issue 26
    "self4096x80": (2, 4096, 4096, 8, 80, False),
    "self4096x160": (2, 4096, 4096, 8, 160, False),
    "self1024x40": (2, 1024, 1024, 8, 40, False),
    "self1024x80": (2, 1024, 1024, 8, 80, False),
    "self1024x160": (2, 1024, 1024, 8, 160, False),
    "self512x80": (2, 512, 512, 8, 80, False),
    "self256x80": (2, 256, 256, 8, 80, False),
    "self256x160": (2, 256, 256, 8, 160, False),
    "self64x160": (2, 64, 64, 8, 160, False),
    "cross4096x40": (2, 4096, 77, 8, 40, False),
    "cross1024x80": (2, 1024, 77, 8, 80, False),
    "vae4096x512": (1, 4096, 4096, 1, 512, False),
    "text77x64": (2, 77, 77, 12, 64, True),
}
DEFAULT_SHAPES = ("self4096x40", "self4096x40b4", "self1024x80", "self256x160", "self1024x40", "self4096x80",
                  "self4096x160", "self1024x160", "cross4096x40", "vae4096x512", "text77x64")


def jax_variants(names):
    def split(x, h):
        return x.reshape(x.shape[0], x.shape[1], h, -1)

    def dpa(q, k, v, h, causal):
        return jax.nn.dot_product_attention(split(q, h), split(k, h), split(v, h), is_causal=causal,
                                            implementation="xla").reshape(q.shape)

    def softmax_weights(s, causal):
        if causal:
            s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -1e30)
        return jax.nn.softmax(s, axis=-1)

    def bthd(q, k, v, h, causal):
        q4, k4, v4 = split(q, h), split(k, h), split(v, h)
        s = jnp.einsum("bqhd,bkhd->bhqk", q4 * q4.shape[-1] ** -0.5, k4, preferred_element_type=jnp.float32)
        p = softmax_weights(s, causal).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v4).reshape(q.shape)

    def bhtd(q, k, v, h, causal):
        q4, k4, v4 = (split(x, h).transpose(0, 2, 1, 3) for x in (q, k, v))
        s = jnp.einsum("bhqd,bhkd->bhqk", q4 * q4.shape[-1] ** -0.5, k4, preferred_element_type=jnp.float32)
        p = softmax_weights(s, causal).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v4).transpose(0, 2, 1, 3).reshape(q.shape)

    def chunked(qc, kc, g):
        def fn(q, k, v, h, causal):
            bh = q.shape[0] * h  # g, or the largest divisor of B * H below it
            group = None if g is None else max(d for d in range(1, min(g, bh) + 1) if bh % d == 0)
            return attention.chunked_attention(split(q, h), split(k, h), split(v, h), is_causal=causal,
                                               q_chunk=qc, kv_chunk=kc, group=group).reshape(q.shape)
        return fn

    def auto(q, k, v, h, causal):
        return attention.multihead_attention(q, k, v, h, is_causal=causal)

    fns = {"dpa": dpa, "bthd": bthd, "bhtd": bhtd, "auto": auto}
    out = {}
    for name in names:
        if name in fns:
            fn = fns[name]
        elif name == "chunked":
            fn = chunked(None, None, None)
        elif name.startswith("q"):
            m = re.fullmatch(r"q(\d+)(?:k(\d+))?(?:g(\d+))?", name)
            if not m:
                raise SystemExit(f"unknown variant {name}")
            qc, kc, g = m.groups()
            fn = chunked(int(qc), int(kc) if kc else 0, int(g) if g else None)
        else:
            raise SystemExit(f"unknown variant {name}")
        out[name] = jax.jit(fn, static_argnums=(3, 4))
    return out


def torch_sdpa(torch):
    import torch.nn.functional as F

    def fn(q, k, v, h, causal):  # diffusers' AttnProcessor2_0 around the kernel
        b = q.shape[0]
        q4, k4, v4 = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)
        return out.transpose(1, 2).reshape(b, -1, q.shape[-1])
    return fn


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def unet_speed(args):
    import json

    import diffusers
    import torch

    from jaxdiff.models.params import param_shapes
    from jaxdiff.models.unet import UNet2DConditionModel
    from jaxdiff.weights.convert import load_state_dict

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    torch_model = diffusers.UNet2DConditionModel(cross_attention_dim=768).eval()
    config = json.loads(torch_model.to_json_string())
    model = UNet2DConditionModel.from_config(config)
    tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = jax.device_put(load_state_dict(tensors, param_shapes(model), what="unet"))
    del tensors
    rng = np.random.default_rng(0)
    n = args.latent
    sample = rng.standard_normal((args.batch, n, n, 4), np.float32)
    timesteps = np.full((args.batch,), 500.0, np.float32)
    context = rng.standard_normal((args.batch, 77, 768), np.float32)
    ts, tt, tc = (torch.from_numpy(x) for x in (np.ascontiguousarray(sample.transpose(0, 3, 1, 2)), timesteps,
                                                  context))
    runs = {"torch": lambda: torch_model(ts, tt, encoder_hidden_states=tc).sample.numpy().transpose(0, 2, 3, 1)}
    for setting in args.settings.split(","):
        attention.set_implementation(setting)  # read when traced: one fresh jit per setting
        fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
        runs[f"jaxdiff {setting}"] = (lambda fn=fn: np.asarray(fn(params, sample, timesteps, context)))
        t_compile = timed(runs[f"jaxdiff {setting}"])
        print(f"jaxdiff {setting}: compile + first call {t_compile:.1f} s", flush=True)
    attention.set_implementation(None)
    outs = {name: run() for name, run in runs.items()}  # warm-up
    scale = float(np.abs(outs["torch"]).max())
    times = {name: [] for name in runs}
    for i in range(args.repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
            print(f"  run {i + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nSD1.5 U-Net forward, {args.batch}x{n}x{n}x4 latents, float32, median of {args.repeats}")
    print(f"{'':20} {'median s':>9} {'torch/x':>8} {'max|x-torch|/max|torch|':>24}")
    for name in runs:
        err = float(np.abs(outs[name] - outs["torch"]).max()) / scale
        print(f"{name:20} {med[name]:9.2f} {med['torch'] / med[name]:8.2f} {err:24.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"from {', '.join(SHAPES)}")
    ap.add_argument("--variants", default="dpa,bthd,bhtd,q512g1,q512g8,q512k512g2,q1024k512g1,auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--unet", action="store_true", help="time a whole SD1.5 U-Net forward instead")
    ap.add_argument("--latent", type=int, default=64, help="--unet: latent side")
    ap.add_argument("--batch", type=int, default=2, help="--unet: batch")
    ap.add_argument("--settings", default="xla,auto", help="--unet: jaxdiff attention settings to time")
    args = ap.parse_args()

    print(f"jax {jax.__version__} {jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"attention setting {attention.get_implementation()!r}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        print("; ".join(" ".join(line.split()) for line in lscpu if line.startswith(("Model name", "CPU(s)"))))
    except (OSError, IndexError):
        pass
    if args.unet:
        return unet_speed(args)
    torch = None
    if not args.no_torch:
        import torch
        torch.set_grad_enabled(False)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    dtype = jnp.dtype(args.dtype)
    variants = jax_variants(args.variants.split(","))
    header = f"{'shape':14} {'B':>2} {'Tq':>5} {'Tk':>5} {'H':>2} {'D':>3}  {'variant':10} {'median s':>9} " \
             f"{'torch/x':>8} {'max|x-dpa|':>10}"
    rows = []
    for shape_name in args.shapes.split(","):
        b, tq, tk, h, d, causal = SHAPES[shape_name]
        rng = np.random.default_rng(0)
        qn, kn, vn = (rng.standard_normal((b, t, h * d), np.float32) for t in (tq, tk, tk))
        q, k, v = (jnp.asarray(x, dtype) for x in (qn, kn, vn))
        runs = {}
        if torch is not None:
            tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
            tq_, tk_, tv_ = (torch.from_numpy(x).to(tdt) for x in (qn, kn, vn))
            sdpa = torch_sdpa(torch)
            runs["torch"] = lambda: sdpa(tq_, tk_, tv_, h, causal)
        for name, fn in variants.items():
            runs[name] = (lambda fn=fn: fn(q, k, v, h, causal).block_until_ready())
        ref = np.asarray(variants["dpa"](q, k, v, h, causal), np.float32) if "dpa" in variants else None
        errs, inner = {}, {}
        for name, run in runs.items():  # warm-up (compiles), and the check against dpa
            out = run()
            if ref is not None:
                out = out.float().numpy() if name == "torch" else np.asarray(out, np.float32)
                errs[name] = float(np.abs(out - ref).max())
            inner[name] = max(1, int(0.05 / timed(run)))  # calls per sample: samples of >= 50 ms
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(lambda: [run() for _ in range(inner[name])]) / inner[name])
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(header)
        for name in runs:
            ratio = f"{med['torch'] / med[name]:8.2f}" if "torch" in med else f"{'':8}"
            err = f"{errs[name]:10.1e}" if name in errs else ""
            line = (f"{shape_name:14} {b:2} {tq:5} {tk:5} {h:2} {d:3}  {name:10} {med[name]:9.4f} {ratio} {err}")
            rows.append(line)
            print(line, flush=True)
        if "auto" in variants:
            print(f"  auto picks {attention.implementation_for(tq, tk, d, dtype)!r}")
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
