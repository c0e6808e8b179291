"""jaxdiff against diffusers on one GPU: whole text-to-image, SD 1.5 at 512x512 and SDXL at
1024x1024, batch 1 and 8, in about 8 minutes on an H100/H200.

    python bench/gpu_suite.py --out DIR [--cases sd15-b1,sd15-b8,sdxl-b1,sdxl-b8] [--steps 30]
                              [--repeats 2] [--peak-tflops 989] [--budget-s 480] [--quick]

Each architecture is built with random weights from the configs in bench/common.py (nothing is
downloaded), directly on the GPU in float16 (diffusers' StableDiffusion(XL)Pipeline, SDPA attention);
it is saved with `save_pretrained` to a temporary folder and loaded with
`jaxdiff.load(folder, dtype=jnp.bfloat16)`. jaxdiff computes in bfloat16, not float16 (and keeps its
params in whatever dtype `load` gives them: bfloat16 since 2026-12-04, float32 before; the report
states what it found), so the two are not the same precision, only the same width. Both sample with the same scheduler (jaxdiff's `--sampler`, default euler, and
its diffusers counterpart), the same prompt, the same starting noise, `--steps` steps and guidance 7.5.

Per case (ARCH-bBATCH): one warm-up call of each library (jaxdiff's compiles), then `--repeats`
timed calls of each, interleaved; seconds per image are medians. Also per case:

- jaxdiff compile s: its first call minus its median call;
- device peak memory: torch `max_memory_allocated()` (reset per case) and jax
  `memory_stats()["peak_bytes_in_use"]` (the worker process's peak so far: each architecture runs in
  its own process, its cases smallest first; jax's allocator is not preallocating here);
- FLOPs from XLA's cost analysis of jaxdiff's own programs, lowered, not compiled (`sample.apply_unet`
  at 2 rows: one image's U-Net step under guidance; `sample.decode`; `sample.encode_prompt`), with
  `torch.utils.flop_counter` on diffusers' U-Net as a cross-check (XLA counts a fused cuDNN attention
  kernel as 0: the U-Net step takes the larger count), and the model FLOPs utilisation of each
  library: FLOPs per call / median seconds / `--peak-tflops` (default 989, H100/H200 dense
  bf16/fp16). The same FLOPs are used for both libraries.

Every case is guarded: an error (out of memory, say) is recorded with its message and the others
still run; each architecture runs in a child process, so even a crash loses only its own cases.
Cases that would start after `--budget-s` are skipped (recorded as such). Results go to
`OUT/results.json` and `OUT/results.md` (and `OUT/results.jsonl`, one line per case as it finishes);
progress lines carry timestamps and are flushed; on SIGTERM the parent writes the reports of what
finished and exits with 124. Exit status 1 when a case failed or did not run, else 0.

`--quick` runs tiny models of the same architectures at 64x64, batch 1 and 2, 2 steps: a smoke test
that runs on a CPU in under a minute (tests/test_bench_smoke.py).

jaxdiff's persistent compilation cache is off (JAXDIFF_COMPILE_CACHE=0) unless `--compile-cache`,
so each first call includes a full compile.

Needs jax, flax, torch, transformers, safetensors and diffusers; not ml_collections. jaxdiff is
imported from this checkout if it is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# Before jax is imported: jax and torch share the GPU, so jax must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

DEFAULT_CASES = "sd15-b1,sd15-b8,sdxl-b1,sdxl-b8"
QUICK_CASES = "sd15-b1,sd15-b2,sdxl-b1,sdxl-b2"
DEFAULT_SIZES = {"sd15": 512, "sdxl": 1024}


def parse_case(name: str) -> tuple[str, int]:
    arch, _, batch = name.strip().partition("-b")
    if arch not in common.ARCHS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"bad case {name!r}: expected ARCH-bBATCH with ARCH one of "
                                         f"{', '.join(common.ARCHS)}, e.g. sdxl-b8")
    return arch, int(batch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_suite_out", help="folder for results.json, results.md, results.jsonl")
    p.add_argument("--cases", default=None, help=f"comma-separated ARCH-bBATCH (default {DEFAULT_CASES}; "
                                                 f"--quick: {QUICK_CASES})")
    p.add_argument("--quick", action="store_true", help="tiny models, 64x64, 2 steps: a smoke test")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per library (default 2; --quick 1)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size-sd15", type=int, default=None, help="default 512 (--quick 64)")
    p.add_argument("--size-sdxl", type=int, default=None, help="default 1024 (--quick 64)")
    p.add_argument("--jax-dtype", choices=("bf16", "fp32"), default="bf16", help="jaxdiff's compute dtype")
    p.add_argument("--torch-dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="diffusers' dtype (default fp16 on a GPU, fp32 on a CPU)")
    p.add_argument("--compile-cache", action="store_true", help="leave jaxdiff's persistent compilation cache on")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak, for MFU")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no case after this many seconds")
    p.add_argument("--grace-s", type=float, default=90.0,
                   help="a worker still running this long after the budget is killed")
    p.add_argument("--in-process", action="store_true", help="run every architecture in this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=common.ARCHS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = [parse_case(c) for c in (args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)).split(",")]
    args.steps = args.steps or (2 if args.quick else 30)
    args.repeats = (1 if args.quick else 2) if args.repeats is None else args.repeats
    return args


def case_name(arch: str, batch: int) -> str:
    return f"{arch}-b{batch}"


def short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"


# ------------------------------------------------------------------------------------------------
# The worker: one architecture, its cases smallest first


def component_flops(pipe, size: int) -> dict:
    """XLA's FLOP counts of jaxdiff's programs for one image under guidance, from lowered (not
    compiled) programs: the U-Net at 2 rows, the VAE decoder at 1, the text encoders at 2."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxdiff import sample

    models, params = pipe.models, pipe.params
    sds = jax.ShapeDtypeStruct
    h = size // models.vae_scale_factor
    ids = tuple(sds((2, t.model_max_length), jnp.int32) for t in pipe.tokenizers)
    time_ids = sds((2, 6), jnp.float32) if models.family.micro_conditioning else None
    encode = jax.jit(functools.partial(sample.encode_prompt, models))
    cond = jax.eval_shape(encode, params["text_encoders"], ids, time_ids)
    x = sds((2, h, h, models.latent_channels), jnp.float32)
    unet = jax.jit(functools.partial(sample.apply_unet, models)).lower(params["unet"], x, sds((2,), jnp.float32), cond)
    decode = jax.jit(functools.partial(sample.decode, models)).lower(
        params["vae"], sds((1, h, h, models.latent_channels), jnp.float32))
    return {"unet_step_cfg": common.xla_flops(unet), "vae_decode": common.xla_flops(decode),
            "text_encode_cfg": common.xla_flops(encode.lower(params["text_encoders"], ids, time_ids))}


def torch_unet_flops(ref, size: int) -> float | None:
    """FLOPs of one diffusers U-Net step for one image under guidance (2 rows), counted by
    torch.utils.flop_counter on random inputs: a cross-check of XLA's count."""
    import torch

    cfg = ref.unet.config
    h = size // ref.vae_scale_factor
    opts = dict(device=ref.device, dtype=ref.unet.dtype)
    x = torch.randn(2, cfg.in_channels, h, h, **opts)
    context = torch.randn(2, 77, cfg.cross_attention_dim, **opts)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, **opts), "time_ids": torch.randn(2, 6, **opts)}

    def step():
        with torch.inference_mode():
            ref.unet(x, torch.full((2,), 500.0, device=ref.device), encoder_hidden_states=context,
                     added_cond_kwargs=added)

    return common.torch_flops(step)


def device_memory():
    """(torch max_memory_allocated, jax peak_bytes_in_use) in bytes; None where not available."""
    import jax
    import torch

    torch_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    stats = jax.local_devices()[0].memory_stats() or {}
    return torch_peak, stats.get("peak_bytes_in_use")


def run_case(args, arch, batch, size, ref, pipe, flops, deadline) -> dict:
    import torch

    rec = dict(case=case_name(arch, batch), arch=arch, batch=batch, size=size, steps=args.steps,
               sampler=args.sampler, guidance=args.guidance, status="ok", errors={}, notes=[])
    case = common.Txt2Img(ref, pipe, batch, size, args.steps, args.guidance, args.sampler, seed=args.seed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = {"jaxdiff": [], "diffusers": []}
    calls = {"jaxdiff": case.jaxdiff, "diffusers": case.diffusers}
    images = {}

    def call(lib, label):
        if lib in rec["errors"]:
            return None
        try:
            t, images[lib] = common.timed(calls[lib])
            common.log(f"{rec['case']}: {lib} {label} {t:.2f} s ({t / batch:.3f} s/image)")
            return t
        except Exception as e:  # one library failing (out of memory, ...) leaves the other to run
            rec["errors"][lib] = f"{label}: {short_error(e)}"
            common.log(f"{rec['case']}: {lib} {label} FAILED: {rec['errors'][lib]}")
            traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    rec["jaxdiff_first_call_s"] = call("jaxdiff", "first call (compile + run)")
    if time.time() > deadline:
        rec["notes"].append("time budget: stopped after jaxdiff's first call")
        rec["diffusers_warmup_s"] = None
    else:
        rec["diffusers_warmup_s"] = call("diffusers", "warm-up")
    rec["max_pixel_diff"] = common.max_abs_diff(images.get("jaxdiff"), images.get("diffusers"))
    for r in range(args.repeats if rec["diffusers_warmup_s"] is not None or "diffusers" in rec["errors"] else 0):
        # A repeat starts only if it should end within the budget (its length: the last calls').
        last = sum(ts[-1] for ts in times.values() if ts) if r else (rec["diffusers_warmup_s"] or 0.0) * 2
        if time.time() > deadline or time.time() + last > deadline:
            rec["notes"].append(f"time budget: {r} of {args.repeats} repeats")
            common.log(f"{rec['case']}: stopping after {r} repeats (time budget)")
            break
        for lib in ("diffusers", "jaxdiff"):
            t = call(lib, f"run {r + 1}/{args.repeats}")
            if t is not None:
                times[lib].append(t)
    rec["times_diffusers_s"], rec["times_jaxdiff_s"] = times["diffusers"], times["jaxdiff"]
    med = {lib: common.median(ts) for lib, ts in times.items()}
    rec["diffusers_s_per_image"] = None if med["diffusers"] is None else med["diffusers"] / batch
    rec["jaxdiff_s_per_image"] = None if med["jaxdiff"] is None else med["jaxdiff"] / batch
    rec["diffusers_over_jaxdiff"] = (med["diffusers"] / med["jaxdiff"]
                                     if med["diffusers"] and med["jaxdiff"] else None)
    rec["jaxdiff_compile_s"] = (rec["jaxdiff_first_call_s"] - med["jaxdiff"]
                                if rec["jaxdiff_first_call_s"] is not None and med["jaxdiff"] else None)
    rec["torch_peak_bytes"], rec["jax_peak_bytes"] = device_memory()
    rec["jaxdiff_nonfinite_calls"] = case.nonfinite
    if case.nonfinite:
        rec["notes"].append(f"{case.nonfinite} jaxdiff call(s) gave non-finite pixels (random weights)")
    # The larger of the two counts: XLA's cost analysis counts a fused attention kernel (cuDNN) as 0,
    # torch's counter knows its SDPA kernels but may miss other ops.
    unet_flops = max(flops.get("unet_step_cfg") or 0.0, flops.get("torch_unet_step_cfg") or 0.0)
    if unet_flops:
        rec["unet_step_flops"] = batch * unet_flops
        per_call = batch * (args.steps * unet_flops + (flops.get("vae_decode") or 0)
                            + (flops.get("text_encode_cfg") or 0))
        rec["flops_per_call"] = per_call
        for lib in ("diffusers", "jaxdiff"):
            rec[f"mfu_{lib}"] = per_call / med[lib] / (args.peak_tflops * 1e12) if med[lib] else None
    if rec["errors"]:
        rec["status"] = "failed"
    elif any(n.startswith("time budget") for n in rec["notes"]):
        rec["status"] = "partial" if times["diffusers"] and times["jaxdiff"] else "skipped"
    return rec


def run_arch(args, arch: str, batches: list[int], deadline: float, sink) -> None:
    """Builds `arch` once and runs its cases (smallest batch first); `sink(record)` gets each
    case's record as it finishes, failures included."""
    common.ensure_jaxdiff_importable()
    import jax
    import torch

    import jaxdiff

    batches = sorted(batches)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tdtype_name = args.torch_dtype or ("fp16" if cuda else "fp32")
    size = (getattr(args, f"size_{arch}") or (64 if args.quick else DEFAULT_SIZES[arch]))
    setup = dict(arch=arch, size=size, torch_device=device, torch_dtype=tdtype_name,
                 jax_dtype=args.jax_dtype, jax_devices=[str(d) for d in jax.devices()],
                 jax_version=jax.__version__, torch_version=torch.__version__,
                 gpu=torch.cuda.get_device_name(0) if cuda else None)
    common.log(f"{arch}: {setup}")
    folder = None
    try:
        t, ref = common.timed(common.build_pipeline, arch, tiny=args.quick, device=device,
                              dtype=common.torch_dtype(tdtype_name), seed=args.seed)
        setup["build_s"] = t
        setup["params_m"] = {n: sum(p.numel() for p in getattr(ref, n).parameters()) / 1e6
                             for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(ref, n, None)}
        common.log(f"{arch}: diffusers pipeline built on {device} in {t:.1f} s; params (M) {setup['params_m']}")
        folder = tempfile.mkdtemp(prefix=f"gpu_suite_{arch}_")
        t, _ = common.timed(ref.save_pretrained, folder, safe_serialization=True)
        setup["save_s"], setup["folder_gb"] = t, common.folder_bytes(folder) / 1e9
        common.log(f"{arch}: saved ({setup['folder_gb']:.2f} GB) in {t:.1f} s; jaxdiff.load ...")
        t, pipe = common.timed(jaxdiff.load, folder, dtype=common.jax_dtype(args.jax_dtype))
        setup["jaxdiff_load_s"] = t
        setup["jaxdiff_param_dtypes"] = common.param_dtypes(pipe.params)
        setup["scheduler"] = common.use_counterpart_scheduler(ref, args.sampler, folder)
        common.log(f"{arch}: jaxdiff.load in {t:.1f} s, params {setup['jaxdiff_param_dtypes']}; "
                   f"diffusers scheduler {setup['scheduler']}")
    except Exception as e:
        traceback.print_exc()
        for b in batches:
            sink(dict(case=case_name(arch, b), arch=arch, batch=b, size=size, status="failed",
                      errors={"setup": short_error(e)}, setup=setup))
        return
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    try:
        t, flops = common.timed(component_flops, pipe, size)
        common.log(f"{arch}: FLOPs per image (XLA, lowered in {t:.1f} s): U-Net step with CFG "
                   f"{common.fmt_flops(flops['unet_step_cfg'])}, VAE decode {common.fmt_flops(flops['vae_decode'])}, "
                   f"text {common.fmt_flops(flops['text_encode_cfg'])}")
    except Exception as e:
        traceback.print_exc()
        flops, setup["flops_error"] = {}, short_error(e)
    try:
        flops["torch_unet_step_cfg"] = torch_unet_flops(ref, size)
        common.log(f"{arch}: torch's FLOP counter, U-Net step with CFG: "
                   f"{common.fmt_flops(flops['torch_unet_step_cfg'])}")
    except Exception as e:
        traceback.print_exc()
        setup["torch_flops_error"] = short_error(e)
    setup["flops"] = flops
    for b in batches:
        name = case_name(arch, b)
        if time.time() > deadline:
            common.log(f"{name}: skipped (time budget)")
            sink(dict(case=name, arch=arch, batch=b, size=size, status="skipped", errors={},
                      notes=["time budget"], setup=setup))
            continue
        common.log(f"{name}: start ({size}x{size}, batch {b}, {args.steps} steps)")
        try:
            rec = run_case(args, arch, b, size, ref, pipe, flops, deadline)
        except Exception as e:
            traceback.print_exc()
            rec = dict(case=name, arch=arch, batch=b, size=size, status="failed", errors={"case": short_error(e)})
        rec["setup"] = setup
        sink(rec)
        common.log(f"{name}: {rec['status']}")


# ------------------------------------------------------------------------------------------------
# The parent: one worker per architecture, then the tables


def gb(n):
    return None if n is None else n / 1e9


def read_records(jsonl: str) -> dict:
    """{case: its record}; a later line for a case replaces an earlier one."""
    records = {}
    if os.path.exists(jsonl):
        for line in open(jsonl):
            if line.strip():
                rec = json.loads(line)
                records[rec["case"]] = rec
    return records


def report_meta(args, records: dict, start: float) -> dict:
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), wall_s=time.time() - start,
                args={k: v for k, v in vars(args).items() if k not in ("worker", "deadline")},
                python=platform.python_version(), notes=report_notes(args, records))
    for rec in records.values():
        setup = rec.get("setup") or {}
        for key in ("gpu", "jax_version", "torch_version"):
            if meta.get(key) is None:
                meta[key] = setup.get(key)
    try:
        from importlib.metadata import version

        meta["diffusers_version"] = version("diffusers")
    except Exception:
        meta["diffusers_version"] = None
    return meta


def report_notes(args, records: dict) -> list[str]:
    loaded = sorted({(r.get("setup") or {}).get("jaxdiff_param_dtypes") for r in records.values()} - {None})
    torch_dtypes = sorted({(r.get("setup") or {}).get("torch_dtype") for r in records.values()} - {None})
    return [
        f"jaxdiff: jaxdiff.load(dtype={args.jax_dtype}): computes in {args.jax_dtype}; its params came back as "
        f"{' / '.join(loaded) or '(none loaded)'}; sampler arithmetic float32. diffusers: weights and compute "
        f"in {' / '.join(torch_dtypes) or args.torch_dtype or '-'}, SDPA attention (its default).",
        f"jaxdiff's persistent compilation cache: {'on' if args.compile_cache else 'off'}.",
        "Random weights (PyTorch default init), configs of the released models (bench/common.py).",
        "s/img: median seconds per call / batch; a call is text encoding, all steps with classifier-free "
        "guidance, VAE decoding and the copy of the images to the host as NumPy.",
        "jaxdiff compile s: first call minus median call.",
        "torch peak: max_memory_allocated, reset per case; jax peak: peak_bytes_in_use of the architecture's "
        "worker process so far (its cases run smallest batch first).",
        "FLOPs (the same for both libraries): a U-Net step is the larger of XLA's cost analysis of jaxdiff's "
        "lowered program (which counts a fused cuDNN attention kernel as 0) and torch.utils.flop_counter on "
        "diffusers' U-Net; decoding and text encoding are XLA's counts. U-Net FLOP/step is for the whole batch "
        "with guidance (2 x batch rows); MFU counts all steps, text encoding and decoding against the peak.",
        "max px diff: largest difference between the two libraries' images (pixels in [0, 1]); different "
        "precisions, so only a sanity check.",
        "status: ok; partial (the time budget cut repeats); skipped (the budget left no time); failed (the "
        "error is given).",
    ]


def write_reports(args, out: str, selected: list[str], records: dict, start: float) -> str:
    meta = report_meta(args, records, start)
    cases = [records.get(name) or dict(case=name, status="not run", errors={}) for name in selected]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, selected=selected, cases=cases), f, indent=1, default=str)
    rows = []
    for c in cases:
        rows.append([
            c["case"], f"{c.get('size', '-')}", f"{c.get('steps', args.steps)}",
            common.fmt(c.get("diffusers_s_per_image"), ".3f"), common.fmt(c.get("jaxdiff_s_per_image"), ".3f"),
            common.fmt(c.get("diffusers_over_jaxdiff"), ".2f"), common.fmt(c.get("jaxdiff_compile_s"), ".1f"),
            common.fmt(gb(c.get("torch_peak_bytes")), ".1f"), common.fmt(gb(c.get("jax_peak_bytes")), ".1f"),
            common.fmt_flops(c.get("unet_step_flops")), common.fmt(c.get("mfu_diffusers"), ".1%"),
            common.fmt(c.get("mfu_jaxdiff"), ".1%"), common.fmt(c.get("max_pixel_diff"), ".2f"),
            c["status"] + ("" if not c.get("errors") else ": " + "; ".join(f"{k}: {v}" for k, v in c["errors"].items()))
            + ("" if not c.get("notes") else " (" + "; ".join(c["notes"]) + ")")])
    table = common.markdown_table(
        ["case", "size", "steps", "diffusers s/img", "jaxdiff s/img", "diffusers/jaxdiff", "jaxdiff compile s",
         "torch peak GB", "jax peak GB", "U-Net FLOP/step", "MFU diffusers", "MFU jaxdiff", "max px diff",
         "status"], rows)
    setups = {}
    for c in cases:
        if c.get("setup") and c["setup"].get("arch") not in setups:
            setups[c["setup"]["arch"]] = c["setup"]
    arch_lines = []
    for arch, st in setups.items():
        fl = st.get("flops") or {}
        arch_lines.append(
            f"- {arch} at {st.get('size')}x{st.get('size')}: params (M) "
            + ", ".join(f"{k} {v:.4g}" for k, v in (st.get("params_m") or {}).items())
            + f"; per image with guidance: U-Net step {common.fmt_flops(fl.get('unet_step_cfg'))}FLOP (XLA), "
            f"{common.fmt_flops(fl.get('torch_unet_step_cfg'))}FLOP (torch's counter), VAE decode "
            f"{common.fmt_flops(fl.get('vae_decode'))}FLOP, text {common.fmt_flops(fl.get('text_encode_cfg'))}FLOP; "
            f"diffusers built in {common.fmt(st.get('build_s'), '.1f')} s, saved "
            f"({common.fmt(st.get('folder_gb'), '.1f')} GB) in {common.fmt(st.get('save_s'), '.1f')} s, "
            f"jaxdiff.load {common.fmt(st.get('jaxdiff_load_s'), '.1f')} s"
            + "".join(f"; {k}: {st[k]}" for k in ("flops_error", "torch_flops_error") if st.get(k)))
    text = "\n".join([
        f"# gpu_suite {meta['date']}", "",
        f"{meta.get('gpu') or 'no GPU'}; jax {meta.get('jax_version')}, torch {meta.get('torch_version')}, "
        f"diffusers {meta.get('diffusers_version')}; sampler {args.sampler}, guidance {args.guidance}, "
        f"medians of {args.repeats} after a warm-up; peak {args.peak_tflops:g} TFLOP/s for MFU"
        f"{'; --quick (tiny models)' if args.quick else ''}.", "",
        table, "", *arch_lines, "",
        *[f"- {n}" for n in meta["notes"]], ""])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.compile_cache:  # jaxdiff.load would turn jax's persistent cache on (workers inherit this)
        os.environ["JAXDIFF_COMPILE_CACHE"] = "0"
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "results.jsonl")

    def sink(rec):
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    if args.worker:  # a child: one architecture
        run_arch(args, args.worker, [b for a, b in args.cases if a == args.worker], args.deadline, sink)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skips jax's and torch's teardown (seconds); every record is already on disk

    start = time.time()
    deadline = start + args.budget_s
    open(jsonl, "w").close()
    selected = [case_name(a, b) for a, b in args.cases]
    common.log(f"gpu_suite: cases {selected}, {args.steps} steps, {args.repeats} repeats, budget {args.budget_s:.0f} s "
               f"(+{args.grace_s:.0f} s grace), out {out}; python {platform.python_version()}")
    children = []

    def finish(signum=None, frame=None) -> int:
        """Writes results.json and results.md from what results.jsonl holds so far."""
        for c in children:
            if c.poll() is None:
                c.kill()
        text = write_reports(args, out, selected, read_records(jsonl), start)
        if signum is not None:  # killed from outside (a timeout): keep what finished
            print(text, flush=True)
            common.log(f"gpu_suite: stopped by signal {signum}; partial results in {out}")
            sys.exit(124)
        return text

    signal.signal(signal.SIGTERM, finish)
    for arch in common.ARCHS:
        batches = [b for a, b in args.cases if a == arch]
        if not batches:
            continue
        if time.time() > deadline:
            for b in batches:
                sink(dict(case=case_name(arch, b), arch=arch, batch=b, status="skipped", errors={},
                          notes=["time budget"]))
            continue
        if args.in_process:
            run_arch(args, arch, batches, deadline, sink)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--worker", arch, "--cases", ",".join(case_name(arch, b) for b in batches),
               "--deadline", repr(deadline), "--out", out]
        child = subprocess.Popen(cmd)
        children.append(child)
        try:
            rc = child.wait(timeout=max(60.0, deadline + args.grace_s - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            rc = child.wait()
            common.log(f"{arch}: worker killed ({args.grace_s:.0f} s past the time budget)")
        if rc:
            common.log(f"{arch}: worker exited with status {rc}")
            done = set(read_records(jsonl))
            for b in batches:
                if case_name(arch, b) not in done:
                    sink(dict(case=case_name(arch, b), arch=arch, batch=b, status="failed",
                              errors={"worker": f"the {arch} worker exited with status {rc} before this case "
                                                f"finished (see its output above)"}))
        write_reports(args, out, selected, read_records(jsonl), start)  # after each architecture

    text = finish()
    print()
    print(text, flush=True)
    records = read_records(jsonl)
    statuses = [(records.get(n) or {}).get("status", "failed") for n in selected]
    common.log(f"gpu_suite: done in {time.time() - start:.0f} s: " + ", ".join(
        f"{n} {s}" for n, s in zip(selected, statuses)) + f"; results in {out}")
    return 0 if all(s in ("ok", "partial", "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
