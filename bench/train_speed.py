"""Training steps/s on 1, 2, 4 and 8 devices for the same global batch, with the ratio to 1 device.

    python bench/train_speed.py [--config configs/shapes_unet.py[:tiny]] [--batch 32] [--steps 10]
        [--devices 1,2,4,8] [--fsdp 1] [--platform cpu|cuda]

Each device count runs in its own process (on CPU, forced host devices: XLA_FLAGS must be set before
jax is imported; on GPU/TPU hosts pass counts up to the real device count). It times the jitted,
sharded `train_step` alone on one fixed batch, after a compile-and-warm-up step, so data loading does
not blur the scaling. On a CPU the fake devices share the same cores: the ratios there measure sharding
overhead, not speed-up.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config_path: str, batch: int, steps: int, fsdp: int) -> dict:
    """steps/s of the train step on this process's devices."""
    import time

    import jax
    import numpy as np
    sys.path.insert(0, ROOT)
    from jaxdiff import parallel
    from jaxdiff import components, sample
    from jaxdiff.train import loop, step as step_lib

    import importlib.util
    path, _, arg = config_path.partition(":")  # configs/NAME.py[:ARG], as main.py train takes it
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.init.path, config.init.components = "", ()  # random weights: speed only
    config.init.calibrate_scaling_factor = False
    config.train.batch_size = batch

    configs, params, tokenizers = loop.build_pipeline(config)
    models = components.build_models(configs)
    optimizer = step_lib.make_optimizer(config)
    mesh = parallel.make_mesh(-1, fsdp)
    state, train_step = loop.sharded_training(models, params, config, optimizer, mesh)

    rng = np.random.default_rng(0)
    res = config.data.resolution
    ids = tuple(rng.integers(0, 20, (batch, config.model.max_length)).astype(np.int32) for _ in tokenizers)
    host = {"images": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32), "ids": ids,
            "empty_ids": tuple(np.zeros_like(i) for i in ids), "weights": np.ones(batch, np.float32)}
    if models.family.micro_conditioning:
        host["time_ids"] = sample.micro_conditioning_ids(res, res, batch)
    batch_arrays = parallel.host_batch_to_global(host, mesh)
    key = jax.random.key(0)
    state, metrics = train_step(state, batch_arrays, key)  # compile and warm up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch_arrays, key)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - t0
    return {"devices": jax.device_count(), "steps_per_s": steps / seconds,
            "platform": jax.devices()[0].platform}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes_unet.py")
    p.add_argument("--batch", type=int, default=32, help="global batch, the same for every device count")
    p.add_argument("--steps", type=int, default=10, help="timed steps per device count")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (must divide every device count)")
    p.add_argument("--platform", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: forced host devices; cuda: the first N GPUs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(measure(args.config, args.batch, args.steps, args.fsdp)))
        return

    results = []
    for n in [int(d) for d in args.devices.split(",")]:
        env = {**os.environ, "JAX_PLATFORMS": args.platform}
        if args.platform == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n} " + env.get("XLA_FLAGS", "")
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(n)))
        out = subprocess.run([sys.executable, __file__, "--child", "--config", args.config, "--batch",
                              str(args.batch), "--steps", str(args.steps), "--fsdp", str(args.fsdp)],
                             env=env, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{n} devices failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['devices']} {r['platform']} device(s): {r['steps_per_s']:.3f} steps/s "
              f"(ratio to 1 device: {r['steps_per_s'] / results[0]['steps_per_s']:.2f})", flush=True)


if __name__ == "__main__":
    main()
