"""ADM ImageNet-64 on one accelerator: diffjax against guided-diffusion's own code, same run.

    python benchmarks/adm64_accelerator.py [--batch 64] [--sample_batch 128] [--steps 10]
        [--cache DIR] [--variants default,threefry_kernel,autotune_1] [--budget_s 540]
        [--profile N] [--smoke] [--out DIR]

Run on the machine with the GPU (or TPU); never part of the tests. Each measurement runs in
its own Python process, one after another, and the summary table comes last:

  * ``flops`` (CPU, concurrently with the rest; it uses no accelerator): XLA's cost analysis
    of the lowered, uncompiled diffjax train step of experiments/imagenet64.py at --batch on
    the CPU backend (where convolutions are counted and attention is XLA's), per image.
  * ``peer``: guided-diffusion's own code (the ``guided_diffusion`` package of
    guided-diffusion-sdk; ``--peer_path`` adds its folder to sys.path): ``create_model_and_
    diffusion`` with the ADM-64 flags of its README (fp16, MixedPrecisionTrainer, AdamW lr
    3e-4, EMA 0.9999, uniform timesteps, hybrid loss), the train step timed with CUDA
    synchronisation; DDIM-25 (``timestep_respacing="ddim25"``, ``ddim_sample_loop``), and
    peak memory (``torch.cuda.max_memory_allocated``).
  * ``diffjax`` per variant, cold: a fresh process with an empty persistent compilation cache
    (--cache/VARIANT): seconds from process start to the end of the first train step, and
    its parts, as ``diffjax.main``'s loop starts (``loop.CompilingStep``: imports and
    backend; the step traced and lowered; then at once the state's initialisation and the
    step's compilation in a thread), the
    step's steady-state time (median of --steps after 2 warm-up steps), peak device memory
    (``memory_stats()["peak_bytes_in_use"]``), and for the first variant DDIM-25 at
    --sample_batch (no guidance; compile time and images/s). With --profile N, the first
    variant also traces N train steps with the JAX profiler and sums the device's time per
    HLO op, by kind (convolution, attention, matmul, reductions, elementwise, copies) and by
    pass (forward, backward, the rest), from the ops' metadata (benchmarks/step_profile.py);
    the trace stays beside the cache (--cache/VARIANT_trace). The synthetic batch is on the
    device already, so the input pipeline is not measured here (benchmarks/train_step.py
    does that).
  * ``diffjax`` warm: the first variant again in a new process on the now-filled cache: the
    time to the first step of a restarted run (a resumed run restores instead of initialising;
    initialisation is the same order of cost as reading the checkpoint).

MFU = FLOPs per image x images/s / the device's peak dense bf16 rate (H100 SXM and H200:
989 TFLOP/s; --peak_tflops for others). The diffjax processes run with ``diffjax.main``'s XLA
options (``parallel.xla_defaults``: on GPU, cuBLAS for matmuls). Start-up is also split into
JAX's parts (``reporting.CompileTimes``: tracing, lowering, compiling, compilation-cache
reads) for the state's initialisation and the step's compilation together. Variants (model, XLA and JAX options
on top of experiments/imagenet64.py): ``default`` (as shipped: attention_impl auto, i.e. cuDNN
flash attention on GPU), ``xla_attention`` (attention_impl=xla), ``triton_gemm``
(``--xla_gpu_enable_triton_gemm=true``: autotuned Triton matmuls), ``remat_dots`` (remat with
the "dots" policy), ``threefry_kernel`` (``jax_threefry_gpu_kernel_lowering``: each threefry
call one CUDA kernel, the same random bits; a cold start lead), ``autotune_1``
(``--xla_gpu_autotune_level=1``: autotuning without initialising and checking buffers; a cold
start lead). Variants run in the order given while
--budget_s allows (each is skipped, with a note, when its estimate would overrun).
Results: a JSON per process and summary.json under --out, the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0, "TPU v5": 459.0, "TPU v6 lite": 918.0}
VARIANTS = {
    "default": ([], {}),
    "xla_attention": (["--config.model.attention_impl=xla"], {}),
    "triton_gemm": ([], {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}),
    "remat_dots": (["--config.model.remat=True", "--config.model.remat_policy=dots"], {}),
    # start-up leads: threefry as one CUDA kernel per call (same bits; the init program
    # has ~200 of them), and conv/GEMM autotuning without its buffer init and checks
    "threefry_kernel": ([], {"JAX_THREEFRY_GPU_KERNEL_LOWERING": "true"}),
    "autotune_1": ([], {"XLA_FLAGS": "--xla_gpu_autotune_level=1"}),
}


def _config(args, overrides: list[str]):
    """experiments/imagenet64.py (:smoke for --smoke) at --batch with ``overrides``."""
    sys.path.insert(0, REPO)
    from diffjax import configlib

    c = configlib.load_config_file("experiments/imagenet64.py" + (":smoke" if args.smoke else ""))
    c.data.batch_size = args.batch
    for item in overrides:
        name, value = item[len("--config."):].split("=", 1)
        section, field = name.split(".", 1)
        target = c[section]
        while "." in field:
            head, field = field.split(".", 1)
            target = target[head]
        target[field] = type(target[field])(value == "True" if value in ("True", "False")
                                            else value)
    return c


def _write(args, name: str, record: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------ FLOPs (CPU)

def role_flops(args) -> None:
    """XLA's FLOP count of the uncompiled train step on the CPU backend, per image."""
    import jax

    from diffjax import experiment, parallel
    from diffjax.train import loop

    c = _config(args, ["--config.model.attention_impl=xla"])
    mesh = parallel.make_mesh(jax.devices()[:1])
    exp = experiment.build(c, num_devices=1)
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    state = trainer.abstract_state()
    batch = _abstract_batch(c)
    lowered = trainer.train_step.lower(state, batch)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = lowered.as_text()
    _write(args, "flops", {"role": "flops", "batch": args.batch,
                           "flops_per_image": float(cost["flops"]) / args.batch,
                           "convolutions": hlo.count("stablehlo.convolution")})


def _abstract_batch(c):
    import jax
    import jax.numpy as jnp

    b, s, ch = c.data.batch_size, c.data.image_size, c.data.channels
    return {"image": jax.ShapeDtypeStruct((b, s, s, ch), jnp.float32),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32)}


# -------------------------------------------------------------------------------- diffjax

def role_diffjax(args) -> None:
    """One process: start -> first step (cold or warm cache), steady step, memory, DDIM-25."""
    t_start = float(os.environ["BENCH_T0"])
    from diffjax import parallel

    parallel.xla_defaults()  # what diffjax.main runs with (a variant's XLA_FLAGS win)
    import jax
    import numpy as np

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as main
    from diffjax import experiment, generate
    from diffjax.train import loop, reporting

    rec = {"role": "diffjax", "variant": args.variant, "warm": args.warm, "batch": args.batch,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    c = _config(args, VARIANTS[args.variant][0])
    mesh = parallel.make_mesh()
    exp = experiment.build(c, num_devices=parallel.num_data_shards(mesh))
    rec["imports_and_backend_s"] = time.time() - t_start
    if not args.warm and jax.default_backend() == "gpu":
        rec["attention_check"] = _attention_check()
    trainer = loop.Trainer(exp.task, exp.optim, exp.train, mesh)
    rng = np.random.default_rng(0)
    b, s = args.batch, c.data.image_size
    host = {"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
            "label": rng.integers(0, 1000, (b,)).astype(np.int32)}
    batch = jax.device_put(host, parallel.data_sharding(mesh))
    # As diffjax.main's loop starts: the step lowered, then compiled in a thread while the
    # state is created (seconds after the process started at which each was done).
    t0 = time.time() - t_start
    with reporting.CompileTimes() as times:
        compiling = loop.CompilingStep(trainer, batch, t_start)
        state = jax.block_until_ready(trainer.new_state())
        init_at = time.time() - t_start
        step = compiling.result(otherwise=None)
    lowered_at, compiled_at = (compiling.times[k] for k in ("step lowered at",
                                                            "step compiled at"))
    rec["lower_s"] = lowered_at - t0
    rec["init_s"] = init_at - lowered_at
    rec["compile_s"] = compiled_at - lowered_at
    rec["startup_jax_s"] = times.seconds()  # tracing, lowering, compiling, cache reads
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    rec["first_step_s"] = time.perf_counter() - t0
    rec["start_to_first_step_s"] = time.time() - t_start
    rec["first_loss"] = float(metrics["loss"])
    if args.warm:  # the restart measurement ends here
        _write(args, f"diffjax_{args.variant}_warm", rec)
        return
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    rec["step_s"] = sorted(times)[len(times) // 2]
    rec["step_s_all"] = times
    rec["images_per_s"] = b / rec["step_s"]
    rec["loss_after"] = float(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    rec["peak_bytes"] = stats.get("peak_bytes_in_use")
    import step_profile  # benchmarks/, beside this script

    if args.profile and args.variant == args.variants.split(",")[0]:
        rec["profile"], (state, _) = step_profile.profile(
            step, (state, batch), args.profile, args.cache.rstrip("/") + "_trace", donate=True)
    hlo = step.as_text()
    rec["hlo"] = {"all_reduce": hlo.count("all-reduce-start") or hlo.count(" all-reduce("),
                  "cudnn_fmha": hlo.count("__cudnn$fmha"),
                  "convolutions": hlo.count("custom_call_target=\"__cudnn$conv"),
                  # the optimiser's share of what compiles and loads (start-up)
                  "kernels_by_pass": step_profile.kernel_counts(hlo)}
    ema = state.ema_params[0]
    del state, step
    if args.sample_batch and args.variant == args.variants.split(",")[0]:  # (variants: start-up
        c.guidance.type = "none"                                              # and step only)
        c.sampler.name, c.sampler.num_steps = "ddim", 25
        c.sampler.batch_size = args.sample_batch
        exp = experiment.build(c, num_devices=parallel.num_data_shards(mesh), mode="sample")
        gen = generate.Generator(exp.task, exp.sampling, mesh, batch_size=args.sample_batch)
        t0 = time.perf_counter()
        gen(ema, args.sample_batch, jax.random.PRNGKey(1))
        first = time.perf_counter() - t0
        runs = []
        for i in range(2):
            t0 = time.perf_counter()
            images, _ = gen(ema, args.sample_batch, jax.random.PRNGKey(2 + i))
            jax.block_until_ready(images)
            runs.append(time.perf_counter() - t0)
        rec["sample_compile_s"] = first - min(runs)
        rec["sample_images_per_s"] = args.sample_batch / min(runs)
        rec["sample_finite"] = bool(np.isfinite(np.asarray(images)).all())
    _write(args, f"diffjax_{args.variant}", rec)


def _attention_check() -> dict:
    """cuDNN's flash attention against XLA's on the ADM-64 shapes at 32x32 (6 heads of 64
    channels), bf16 inputs, and both against float32: relative L2 errors of the output and of
    the gradient of a random projection of it (the gradients the train step takes)."""
    import jax
    import jax.numpy as jnp

    from diffjax.models import layers

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (8, 1024, 6, 64), jnp.float32) for kk in keys[:3])
    proj = jax.random.normal(keys[3], (8, 1024, 6, 64), jnp.float32)

    def run(impl, dtype):
        def f(q, k, v):
            out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype),
                                               v.astype(dtype), implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * proj), out.astype(jnp.float32)
        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    ref_out, ref_g = run("xla", jnp.float32)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    result = {}
    for impl in ("xla", "cudnn"):
        try:
            out, g = run(impl, jnp.bfloat16)
        except Exception as e:  # noqa: BLE001 - report, don't stop the benchmark
            result[impl] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        result[impl] = {"out_rel": rel(out, ref_out),
                        "grad_rel": [rel(a, b) for a, b in zip(g, ref_g)]}
    result["auto_resolves_to"] = layers.attention_implementation("auto", jnp.bfloat16, 64)
    return result


# ------------------------------------------------------------------------ guided-diffusion

def role_peer(args) -> None:
    """guided-diffusion's own model, diffusion, fp16 trainer and DDIM sampler."""
    t_start = float(os.environ["BENCH_T0"])
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    import copy

    import torch as th
    from guided_diffusion import script_util
    from guided_diffusion.fp16_util import MixedPrecisionTrainer
    from guided_diffusion.nn import update_ema
    from guided_diffusion.resample import UniformSampler

    cuda = th.cuda.is_available()
    dev = th.device("cuda" if cuda else "cpu")
    opts = script_util.model_and_diffusion_defaults()
    opts.update(image_size=64, num_channels=192, num_res_blocks=3, num_head_channels=64,
                attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000,
                dropout=0.1, learn_sigma=True, noise_schedule="cosine", resblock_updown=True,
                use_new_attention_order=True, use_fp16=cuda, use_scale_shift_norm=True)
    if args.smoke:
        opts.update(num_channels=32, num_res_blocks=1, num_head_channels=32)
    model, diffusion = script_util.create_model_and_diffusion(**opts)
    model.to(dev)
    if cuda:
        model.convert_to_fp16()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=cuda)
    opt = th.optim.AdamW(trainer.master_params, lr=3e-4, weight_decay=0.0)
    ema = copy.deepcopy(trainer.master_params)
    sampler = UniformSampler(diffusion)
    rec = {"role": "peer", "batch": args.batch, "torch": th.__version__,
           "device": th.cuda.get_device_name() if cuda else "cpu",
           "params": sum(p.numel() for p in model.parameters()),
           "setup_s": time.time() - t_start}
    g = th.Generator(device="cpu").manual_seed(0)
    x = (th.rand(args.batch, 3, 64, 64, generator=g) * 2 - 1).to(dev)
    y = th.randint(0, 1000, (args.batch,), generator=g).to(dev)

    def train_step():
        trainer.zero_grad()
        t, weights = sampler.sample(args.batch, dev)
        losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y})
        loss = (losses["loss"] * weights).mean()
        trainer.backward(loss)
        if trainer.optimize(opt):
            update_ema(ema, trainer.master_params, rate=0.9999)
        return loss

    sync = th.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        train_step()
    sync()
    if cuda:
        th.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - t0)
    rec["step_s"] = sorted(times)[len(times) // 2]
    rec["step_s_all"] = times
    rec["images_per_s"] = args.batch / rec["step_s"]
    rec["loss"] = float(loss)
    rec["peak_bytes"] = th.cuda.max_memory_allocated() if cuda else None
    if args.sample_batch:
        opts.update(timestep_respacing="ddim25")
        _, ddim = script_util.create_model_and_diffusion(**opts)
        model.eval()
        yb = th.randint(0, 1000, (args.sample_batch,), generator=g).to(dev)
        runs = []
        with th.no_grad():
            for i in range(3):
                t0 = time.perf_counter()
                out = ddim.ddim_sample_loop(model, (args.sample_batch, 3, 64, 64),
                                            model_kwargs={"y": yb}, device=dev)
                sync()
                runs.append(time.perf_counter() - t0)
        rec["sample_images_per_s"] = args.sample_batch / min(runs[1:])
        rec["sample_first_s"] = runs[0]
        rec["sample_finite"] = bool(th.isfinite(out).all())
    _write(args, "peer", rec)


# --------------------------------------------------------------------------------- driver

def _spawn(args, role: str, extra: list[str], env: dict[str, str], timeout: float,
           background: bool = False):
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--batch", str(args.batch),
           "--sample_batch", str(args.sample_batch), "--steps", str(args.steps),
           "--profile", str(args.profile), "--variants", args.variants,
           "--out", args.out, "--peer_path", args.peer_path] + (["--smoke"] if args.smoke else [])
    full_env = dict(os.environ, BENCH_T0=repr(time.time()), PYTHONUNBUFFERED="1", **env)
    if background:
        return subprocess.Popen(cmd + extra, env=full_env, cwd=REPO)
    try:
        return subprocess.run(cmd + extra, env=full_env, cwd=REPO, timeout=max(timeout, 1), check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"[{role} {extra}] stopped after {timeout:.0f} s (budget)", flush=True)
        return 124


def _read(args, name: str) -> dict | None:
    path = os.path.join(args.out, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def driver(args) -> None:
    t0 = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t0)
    flops = _spawn(args, "flops", [], {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""},
                   0, background=True)
    variants = [v for v in args.variants.split(",") if v]
    estimate = {"peer": 90, "cold": 420 if not args.smoke else 60, "warm": 120}
    if args.peer and left() > estimate["peer"] + estimate["cold"]:
        _spawn(args, "peer", [], {}, left() - estimate["cold"])
    for i, variant in enumerate(variants):
        cold_estimate = estimate["cold"] if i == 0 else _cold_estimate(args, variants[0])
        if left() < cold_estimate:
            print(f"[{variant}] skipped: {left():.0f} s left, a cold run needs ~"
                  f"{cold_estimate:.0f} s", flush=True)
            continue
        cache = os.path.join(args.cache, variant)
        shutil.rmtree(cache, ignore_errors=True)  # cold: an empty cache
        extra = ["--variant", variant, "--cache", cache]
        _spawn(args, "diffjax", extra, VARIANTS[variant][1], left())
        if i == 0 and left() > 30:
            _spawn(args, "diffjax", extra + ["--warm"], VARIANTS[variant][1], left())
    try:
        flops.wait(timeout=max(left(), 1))
    except subprocess.TimeoutExpired:
        flops.kill()
    _summary(args, variants)


def _cold_estimate(args, first: str) -> float:
    rec = _read(args, f"diffjax_{first}")
    if rec is None:
        return 420.0
    return rec["start_to_first_step_s"] + 30  # later variants skip DDIM-25


def _summary(args, variants: list[str]) -> None:
    flops, peer = _read(args, "flops"), _read(args, "peer")
    fpi = flops["flops_per_image"] if flops else None
    rows = []
    kind = None
    for v in variants:
        rec = _read(args, f"diffjax_{v}")
        if rec is None:
            continue
        kind = rec["device"]
        warm = _read(args, f"diffjax_{v}_warm")
        rows.append((v, rec, warm))
    peak = args.peak_tflops or next((t for k, t in PEAK_TFLOPS.items() if kind and k in kind), 0)
    mfu = (lambda ips: ips * fpi / (peak * 1e12)) if fpi and peak else (lambda ips: float("nan"))
    gb = lambda b: b / 2**30 if b else float("nan")
    print(f"\nADM-64 train step, batch {args.batch}; device {kind}; peak {peak} TFLOP/s bf16; "
          f"FLOPs/image (XLA cost analysis, CPU) {fpi / 1e9 if fpi else float('nan'):.1f} G")
    print("| | step s | images/s | MFU | init s | compile s | start->1st step cold s | "
          "warm s | peak GiB | DDIM-25 images/s (compile s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v, rec, warm in rows:
        w = f"{warm['start_to_first_step_s']:.1f}" if warm else "-"
        print(f"| diffjax {v} | {rec['step_s']:.4f} | {rec['images_per_s']:.1f} | "
              f"{mfu(rec['images_per_s']):.1%} | {rec['init_s']:.1f} | {rec['compile_s']:.1f} | "
              f"{rec['start_to_first_step_s']:.1f} | {w} | {gb(rec['peak_bytes']):.1f} | "
              f"{rec.get('sample_images_per_s', float('nan')):.1f} "
              f"({rec.get('sample_compile_s', float('nan')):.1f}) |")
    print("\n| start-up parts, s | step: trace + lower | then at once: init | and: step compile "
          "| JAX: tracing / lowering / compiling / cache reads (both) | first loss |")
    print("|---|---|---|---|---|---|")
    parts = lambda d: " / ".join(f"{d[k]:.1f}" for k in ("tracing", "lowering", "compiling",
                                                          "cache reads")) if d else "-"
    for v, rec, warm in rows:
        for tag, r in (("cold", rec), ("warm", warm)):
            if r:
                print(f"| {v} {tag} | {r['lower_s']:.1f} | {r['init_s']:.1f} | "
                      f"{r['compile_s']:.1f} | {parts(r.get('startup_jax_s'))} | "
                      f"{r['first_loss']:.6f} |")
    for v, rec, _ in rows:
        h = rec.get("hlo") or {}
        print(f"{v} step HLO: {h.get('all_reduce')} all-reduces, {h.get('cudnn_fmha')} cuDNN "
              f"attention calls, {h.get('convolutions')} cuDNN convolutions; operations doing "
              f"work by pass: {h.get('kernels_by_pass')}")
    if peer:
        precision = "fp16" if peer.get("device", "cpu") != "cpu" else "fp32: no fp16 on CPU"
        print(f"| guided-diffusion ({precision}) | {peer['step_s']:.4f} | "
              f"{peer['images_per_s']:.1f} | "
              f"{mfu(peer['images_per_s']):.1%} | - | - | {peer['setup_s']:.1f} (setup) | - | "
              f"{gb(peer['peak_bytes']):.1f} | {peer.get('sample_images_per_s', float('nan')):.1f}"
              " |")
        for v, rec, _ in rows:
            print(f"ratio diffjax {v} / guided-diffusion: train images/s "
                  f"{rec['images_per_s'] / peer['images_per_s']:.2f}x, DDIM-25 images/s "
                  f"{rec.get('sample_images_per_s', 0) / peer.get('sample_images_per_s', 1):.2f}x"
                  f", peak memory {gb(rec['peak_bytes']) / gb(peer['peak_bytes']):.2f}x")
    for v, rec, _ in rows:
        if rec.get("profile"):
            import step_profile  # benchmarks/, beside this script

            print(f"\nwhere the {v} train step's time goes (device events, per step):")
            print(step_profile.format_summary(rec["profile"]))
    summary = {"flops": flops, "peer": peer, "peak_tflops": peak,
               "diffjax": {v: {"cold": rec, "warm": warm} for v, rec, warm in rows}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", default="driver", choices=("driver", "flops", "diffjax", "peer"))
    p.add_argument("--batch", type=int, default=None, help="train batch (64; --smoke: 2)")
    p.add_argument("--sample_batch", type=int, default=None,
                   help="DDIM-25 batch (128; --smoke: 2; 0: skip)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many train steps of the first variant (step_profile.py)")
    p.add_argument("--variants", default="default", help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--variant", default="default", choices=tuple(VARIANTS))
    p.add_argument("--warm", action="store_true")
    p.add_argument("--cache", default="/tmp/diffjax_bench_cache")
    p.add_argument("--no_peer", dest="peer", action="store_false")
    p.add_argument("--peer_path", default="", help="folder holding guided_diffusion/")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--budget_s", type=float, default=540.0)
    p.add_argument("--smoke", action="store_true", help="imagenet64:smoke, tiny peer (CPU)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/adm64_bench"))
    args = p.parse_args()
    # --smoke runs on CPU: ADM-64's batches would spend the whole budget in the peer alone
    if args.batch is None:
        args.batch = 2 if args.smoke else 64
    if args.sample_batch is None:
        args.sample_batch = 2 if args.smoke else 128
    {"driver": driver, "flops": role_flops, "diffjax": role_diffjax, "peer": role_peer}[
        args.role](args)


if __name__ == "__main__":
    main()
