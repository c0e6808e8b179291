"""Seconds per forward of the Stable Diffusion 1.5 U-Net: jaxdiff against diffusers, in one process,
same weights and inputs.

    python bench/unet_speed.py [--sizes 32,64] [--batches 2,4] [--repeats 3] [--dtype fp32|bf16]
                               [--threads N] [--no-cache] [--no-torch-flops] [--tiny]

The U-Net is diffusers' `UNet2DConditionModel(cross_attention_dim=768)` (SD 1.5's architecture) with
random weights, loaded into jaxdiff through its strict checkpoint conversion. Each case (latent
size x batch; batch 2 is one image under classifier-free guidance) runs jaxdiff (`jax.jit`, params as
arguments) and diffusers (`torch.inference_mode()`, its default SDPA attention) once to warm up,
then `--repeats` times each, interleaved (diffusers, jaxdiff, diffusers, ...), and takes medians.
Per case it also prints:

- `compile cold s`: jaxdiff's trace + lower + XLA compile of the forward, the first time in the
  process (it also writes the persistent compilation cache);
- `compile cached s`: the same after `jax.clear_caches()`, served from jax's persistent compilation
  cache (a fresh temporary `jax_compilation_cache_dir`, minimum compile time and entry size 0): what
  a second process would pay (`--no-cache`: not measured);
- `FLOPs`: one forward, from XLA's cost analysis of the compiled program; `torch FLOPs`: the same
  forward counted by `torch.utils.flop_counter` (a cross-check; 0 where it does not know an op);
- `GFLOP/s`: FLOPs / median seconds, for each library;
- `rel diff`: max |jaxdiff - diffusers| / max |diffusers| of the outputs (same weights, same inputs);
- `peak RSS GB`: the process's peak resident memory so far (`resource.getrusage` ru_maxrss), which
  only grows: cases run smallest first, so each row's value is mostly its own.

`--threads` sets torch's intra-op threads; jax's CPU backend sizes its own pool to the machine's
cores. bf16 (`--dtype bf16`): jaxdiff computes in bf16 and keeps bf16 params (as
`jaxdiff.load(dtype=jnp.bfloat16)` does), diffusers runs a bf16 copy of the model.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,64", help="latent sizes (image size / 8), comma-separated")
    p.add_argument("--batches", default="2,4", help="U-Net batch sizes (2 = one image with CFG)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each library per case")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-cache", action="store_true", help="skip the persistent-cache compile time")
    p.add_argument("--no-torch-flops", action="store_true", help="skip torch's FLOP counter")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net of the same block types (checks the script)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    common.ensure_jaxdiff_importable()

    import tempfile

    import jax
    import numpy as np
    import torch

    cache_dir = None
    if not args.no_cache:  # before any compilation, so every program of this process goes through it
        cache_dir = tempfile.mkdtemp(prefix="jax_cache_")
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = common.TINY_SD15_UNET if args.tiny else common.SD15_UNET
    common.log(f"jax {jax.__version__} on {jax.devices()}, torch {torch.__version__} with "
               f"{torch.get_num_threads()} threads; dtype {args.dtype}; building the U-Net")
    t_build, unet = common.timed(common.build_unet, config, seed=args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    common.log(f"diffusers U-Net: {n_params / 1e6:.1f}M params, built in {t_build:.1f} s; porting to jaxdiff")
    t_port, (model, params) = common.timed(common.port_unet, unet, common.jax_dtype(args.dtype))
    common.log(f"jaxdiff params ({common.param_dtypes(params)}) ready in {t_port:.1f} s; "
               f"peak RSS {common.peak_rss_gb():.2f} GB")
    if args.dtype == "bf16":
        unet = unet.to(torch.bfloat16)
    t_dtype = common.torch_dtype(args.dtype)
    ctx_dim = config["cross_attention_dim"]

    rows, results = [], []
    for size in sizes:
        for batch in batches:
            name = f"{size}x{size} b{batch}"
            rng = np.random.default_rng(args.seed + size * 100 + batch)
            x = rng.standard_normal((batch, 4, size, size), dtype=np.float32)
            ctx = rng.standard_normal((batch, 77, ctx_dim), dtype=np.float32)
            t = np.full((batch,), 500.0, np.float32)
            tx, tt, tc = (torch.from_numpy(a).to(t_dtype) for a in (x, t, ctx))
            jx = jax.numpy.asarray(x.transpose(0, 2, 3, 1))
            jt, jc = jax.numpy.asarray(t), jax.numpy.asarray(ctx)

            def torch_forward():
                with torch.inference_mode():
                    return unet(tx, tt, encoder_hidden_states=tc).sample

            forward = jax.jit(lambda p, a, b, c: model.apply({"params": p}, a, b, c))
            common.log(f"{name}: compiling jaxdiff")
            cold, compiled = common.timed(lambda: forward.lower(params, jx, jt, jc).compile())
            cached = None
            if cache_dir:
                jax.clear_caches()
                cached, compiled = common.timed(lambda: forward.lower(params, jx, jt, jc).compile())
            flops = common.xla_flops(compiled)
            common.log(f"{name}: compile cold {cold:.2f} s, cached {common.fmt(cached, '.2f')} s, "
                       f"{common.fmt_flops(flops)}FLOP per forward")

            def jax_forward():
                return compiled(params, jx, jt, jc).block_until_ready()

            t_warm_torch, out_torch = common.timed(torch_forward)
            t_warm_jax, out_jax = common.timed(jax_forward)
            ref = out_torch.float().numpy().transpose(0, 2, 3, 1)
            rel = float(np.abs(np.asarray(out_jax, np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30))
            common.log(f"{name}: warm-up diffusers {t_warm_torch:.3f} s, jaxdiff {t_warm_jax:.3f} s; "
                       f"rel diff {rel:.1e}")
            times_torch, times_jax = [], []
            for r in range(args.repeats):
                times_torch.append(common.timed(torch_forward)[0])
                times_jax.append(common.timed(jax_forward)[0])
                common.log(f"{name}: run {r + 1}/{args.repeats}: diffusers {times_torch[-1]:.3f} s, "
                           f"jaxdiff {times_jax[-1]:.3f} s")
            tflops = None if args.no_torch_flops else common.torch_flops(torch_forward)
            med_torch, med_jax = common.median(times_torch), common.median(times_jax)
            res = dict(case=name, size=size, batch=batch, diffusers_s=med_torch, jaxdiff_s=med_jax,
                       ratio=med_torch / med_jax, compile_cold_s=cold, compile_cached_s=cached,
                       xla_flops=flops, torch_flops=tflops, rel_diff=rel, peak_rss_gb=common.peak_rss_gb(),
                       times_diffusers=times_torch, times_jaxdiff=times_jax)
            results.append(res)
            gflops = lambda s: common.fmt(flops / s / 1e9, ".1f") if flops else "-"
            rows.append([name, f"{med_torch:.3f}", f"{med_jax:.3f}", f"{res['ratio']:.2f}", f"{cold:.1f}",
                         common.fmt(cached, ".1f"), common.fmt_flops(flops), gflops(med_jax), gflops(med_torch),
                         common.fmt_flops(tflops), f"{rel:.1e}", f"{res['peak_rss_gb']:.1f}"])

    print()
    print(f"SD1.5 U-Net forward ({'tiny ' if args.tiny else ''}{n_params / 1e6:.0f}M params), {args.dtype}, "
          f"medians of {args.repeats}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print()
    print(common.markdown_table(
        ["case", "diffusers s", "jaxdiff s", "torch/jaxdiff", "compile cold s", "compile cached s", "FLOPs (XLA)",
         "GFLOP/s jaxdiff", "GFLOP/s diffusers", "FLOPs (torch)", "rel diff", "peak RSS GB"], rows))
    return results


if __name__ == "__main__":
    main()
