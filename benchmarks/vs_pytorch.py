"""diffjax vs PyTorch (diffusers' UNet2DModel) on the same architectures, side by side on CPU.

    python benchmarks/vs_pytorch.py [--batch 16] [--adm_batch 4] [--steps 1] [--repeats 3]
                                    [--sample_steps 25] [--quick] [--json PATH]

Needs the ``bench`` extra (``bash launch/install.sh --bench``: torch, diffusers). For the
fashion_mnist model and the ADM ImageNet-64 architecture reduced in width
(``common.imagenet64_cpu_config``), measures in one process, diffjax first then PyTorch
(never concurrently), at the same batch, 2 threads each (XLA:CPU uses the 2 cores; torch
``set_num_threads(2)``):
  * train step: diffjax's real ``Trainer.train_step`` (timestep sampling, q_sample, the
    config's loss, backward, clipped AdamW, EMA) vs the same step written for the torch
    model (MSE on eps, clip_grad_norm_, AdamW, EMA via ``_foreach_lerp_``); with the
    ADM hybrid loss, diffjax also computes the VLB term (elementwise, cheap) the torch step
    leaves out;
  * forward: one inference-mode network call;
  * sampling: 25 DDIM steps (diffjax ``generate.make_sample_program``: one compiled scan; torch:
    diffusers' DDIMScheduler in a Python loop), both with x0 clipping and the config's
    guidance (fashion_mnist: classifier-free, conditional and null-label passes as one
    2 x batch call; ADM-64: none);
  * warm-up cost: diffjax lower+compile time; torch (eager) first call minus median call;
  * peak memory: peak RSS over the RSS before each side's phase (``common.PeakRSS``).
Times are medians of ``--repeats`` runs after ``--warmup`` untimed runs. Ratios are
diffjax / pytorch: below 1 means diffjax takes less time or memory.

PyTorch's OpenMP threads spin-wait by default; on a CPU shared with other jobs (load above
the core count) that made a fashion_mnist forward 50-100x slower here (1-2 s instead of
0.015 s), which would compare diffjax with a mis-configured peer. So this script sets
``OMP_WAIT_POLICY=PASSIVE`` before importing torch unless the variable is already set
(``--omp_active`` keeps OpenMP's default); the value used is printed and recorded.

Like ``diffjax.main``, the script starts over with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
where that gives malloc's large mappings transparent huge pages (``diffjax.hugepages``);
both sides run in that one process, so PyTorch has them too. ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=0`` keeps 4 KiB pages for both.
"""

from __future__ import annotations

import argparse
import math
import os

import jax
import numpy as np

import common


def diffusers_unet(c):
    """A ``diffusers.UNet2DModel`` with diffjax's ADM options of ``c`` (see module notes)."""
    from diffusers import UNet2DModel

    m, size = c.model, c.data.image_size
    chans = tuple(mult * m.model_channels for mult in m.channel_mult)
    down, up = [], []
    for level in range(len(chans)):
        attn = size // 2**level in tuple(m.attention_resolutions)
        plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if m.resblock_updown \
            else ("DownBlock2D", "UpBlock2D")
        down.append("AttnDownBlock2D" if attn else plain[0])
        up.insert(0, "AttnUpBlock2D" if attn else plain[1])
    if m.num_head_channels > 0:
        head_dim = m.num_head_channels
    else:  # num_heads heads at every attention level: exact when those levels share a width
        attn_chans = [ch for lv, ch in enumerate(chans)
                      if size // 2**lv in tuple(m.attention_resolutions)] or [chans[-1]]
        head_dim = attn_chans[0] // m.num_heads
    classes = None
    if m.class_cond:
        classes = c.data.num_classes + int(c.guidance.type == "classifier_free")
    learned = c.diffusion.variance_type in ("learned", "learned_range")
    updown = "resnet" if m.resblock_updown else "conv"
    return UNet2DModel(
        sample_size=size, in_channels=c.data.channels,
        out_channels=c.data.channels * (2 if learned else 1), down_block_types=tuple(down),
        up_block_types=tuple(up), block_out_channels=chans, layers_per_block=m.num_res_blocks,
        attention_head_dim=head_dim, norm_num_groups=m.norm_groups,
        attn_norm_num_groups=m.norm_groups, dropout=m.dropout, flip_sin_to_cos=True,
        freq_shift=0, downsample_type=updown, upsample_type=updown,
        resnet_time_scale_shift="scale_shift" if m.use_scale_shift_norm else "default",
        num_class_embeds=classes)


def torch_side(c, batch: int, steps: int, sample_steps: int, warmup: int, repeats: int) -> dict:
    """Train step, forward and DDIM sampling of the matching diffusers model (eager, CPU)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    from diffjax import experiment

    torch.manual_seed(0)
    ds = experiment.build(c, num_devices=1).schedule
    abar = torch.from_numpy(ds.alphas_cumprod.astype(np.float32))
    T, C = ds.num_timesteps, c.data.channels
    null = c.data.num_classes
    p_drop = c.guidance.label_dropout if c.guidance.type == "classifier_free" else 0.0
    sync = lambda out: out  # noqa: E731  eager CPU ops have finished when they return
    x0 = torch.from_numpy(common.random_batch(c, batch)["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.arange(batch) % max(c.data.num_classes, 1) if c.model.class_cond else None
    out: dict = {}
    with common.PeakRSS() as mem:
        model = diffusers_unet(c)
        params = [p for p in model.parameters()]
        out["params"] = sum(p.numel() for p in params)
        o = c.optim
        opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay)
        ema = [p.detach().clone() for p in params]

        def train():
            for _ in range(steps):
                t = torch.randint(0, T, (batch,))
                noise = torch.randn_like(x0)
                a = abar[t].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                yy = None if y is None else torch.where(torch.rand(batch) < p_drop, null, y)
                loss = F.mse_loss(model(xt, t, class_labels=yy).sample[:, :C], noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
                opt.step()
                with torch.no_grad():
                    torch._foreach_lerp_(ema, params, 1.0 - o.ema_decays[0])
            return loss

        model.train()
        out["train"] = common.time_calls(train, warmup=warmup, repeats=repeats, sync=sync)
        out["train_mb"] = mem.restart()
    del opt, ema
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=T, trained_betas=ds.betas, clip_sample=True,
                          set_alpha_to_one=False)
    cfg = c.guidance.type == "classifier_free"
    w = c.guidance.scale

    def forward():
        with torch.inference_mode():
            return model(x0, torch.full((batch,), T // 2), class_labels=y).sample

    def sample():
        sched.set_timesteps(sample_steps)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(x0.shape, generator=gen)
        with torch.inference_mode():
            for t in sched.timesteps:
                if cfg:
                    eps = model(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, null)])
                                ).sample[:, :C]
                    cond, uncond = eps.chunk(2)
                    eps = uncond + w * (cond - uncond)
                else:
                    eps = model(x, t, class_labels=y).sample[:, :C]
                x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    out["forward"] = common.time_calls(forward, warmup=warmup, repeats=repeats, sync=sync)
    with common.PeakRSS() as mem:
        out["sample"] = common.time_calls(sample, warmup=warmup, repeats=repeats, sync=sync)
    out["sample_mb"] = mem.increase_mb
    return out


def jax_side(c, batch: int, steps: int, sample_steps: int, warmup: int, repeats: int) -> dict:
    """The same three measurements for diffjax (real trainer, jitted apply, sample program)."""
    from diffjax import experiment, generate

    tr = common.time_trainer(c, batch, steps, warmup, repeats)
    out = {"params": tr["params"], "train_mb": tr["train_peak_rss_increase_mb"],
           "train_compile_mb": tr["compile_peak_rss_increase_mb"],
           "train_step_s": tr["step_s"], "train_compile_s": tr["compile_s"],
           "train_spread": tr["spread"]}
    c.sampler.name, c.sampler.num_steps, c.sampler.batch_size = "ddim", sample_steps, batch
    mesh = common.cpu_mesh()
    exp = experiment.build(c, num_devices=1)
    task, sampling = exp.task, exp.sampling
    params = task.init_params(jax.random.PRNGKey(0))
    data = common.random_batch(c, batch)
    t = np.full((batch,), c.diffusion.num_timesteps // 2, np.float32)
    y = data["label"] if c.model.class_cond else None
    fwd = jax.jit(lambda p, x, t, y: task.apply(p, x, t, y, False))
    fwd_c, out["forward_compile_s"] = common.compile_jitted(fwd, params, data["image"], t, y)
    out["forward"] = common.time_calls(lambda: fwd_c(params, data["image"], t, y),
                                       warmup=warmup, repeats=repeats)
    key, labels = jax.random.PRNGKey(0), generate.balanced_labels(batch, task.num_classes)
    knobs = sampling.knobs()
    with common.PeakRSS() as mem:
        fn = generate.make_sample_program(task, sampling, mesh, batch, with_inputs=False)
        fn_c, out["sample_compile_s"] = common.compile_jitted(fn, params, None, None, key,
                                                              labels, None, knobs)
        out["sample_compile_mb"] = mem.restart()
        out["sample"] = common.time_calls(lambda: fn_c(params, None, None, key, labels, None, knobs),
                                          warmup=warmup, repeats=repeats)
    out["sample_mb"] = mem.increase_mb
    return out


def compare(name: str, c, batch: int, args) -> dict:
    """Runs both sides for one architecture, prints its table, returns the JSON record."""
    import copy

    print(f"[{name}] diffjax ...", flush=True)
    jx = jax_side(copy.deepcopy(c), batch, args.steps, args.sample_steps, args.warmup,
                  args.repeats)
    print(f"[{name}] pytorch ...", flush=True)
    pt = torch_side(copy.deepcopy(c), batch, args.steps, args.sample_steps, args.warmup,
                    args.repeats)
    per = args.steps
    rows = [
        ("parameters (M)", jx["params"] / 1e6, pt["params"] / 1e6),
        (f"train step (s, batch {batch})", jx["train_step_s"], pt["train"].median / per),
        ("forward (s)", jx["forward"].median, pt["forward"].median),
        (f"{args.sample_steps}-step DDIM sampling (s)", jx["sample"].median,
         pt["sample"].median),
        ("warm-up: train step (s)", jx["train_compile_s"], _overhead(pt["train"])),
        ("warm-up: forward (s)", jx["forward_compile_s"], _overhead(pt["forward"])),
        ("warm-up: sampling (s)", jx["sample_compile_s"], _overhead(pt["sample"])),
        ("peak RSS +MB: train steps", jx["train_mb"], pt["train_mb"]),
        ("peak RSS +MB: sampling runs", jx["sample_mb"], pt["sample_mb"]),
        ("peak RSS +MB: compiling train step", jx["train_compile_mb"], math.nan),
        ("peak RSS +MB: compiling sampler", jx["sample_compile_mb"], math.nan),
    ]
    print(f"\n{name}: batch {batch}; {common.load_note()}")
    common.print_table(["metric", "diffjax", "pytorch", "ratio (diffjax/pytorch)"],
                       [(m, a, b, a / b if b == b and b else math.nan) for m, a, b in rows])
    note = _params_note(jx["params"], pt["params"])
    print(f"  {note}\n")
    return {"batch": batch, "params_note": note,
            "rows": {m: {"diffjax": a, "pytorch": b if b == b else None,
                         "ratio": a / b if b == b and b else None}
                     for m, a, b in rows}}


def _overhead(t: common.Timing) -> float:
    return max(t.first - t.median, 0.0)


def _params_note(ours: int, theirs: int) -> str:
    if ours == theirs:
        return ("parameter counts are identical: every conv, norm, linear and embedding has a "
                "counterpart of the same shape (ADM's 1x1-conv qkv = diffusers' q/k/v linears).")
    return (f"parameter counts differ by {ours - theirs:+d} (diffjax - diffusers): "
            "UNet2DModel cannot express every ADM option exactly (one attention head width for "
            "all levels; its own up/down block layout).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="fashion_mnist batch")
    parser.add_argument("--adm_batch", type=int, default=4, help="reduced ImageNet-64 batch")
    parser.add_argument("--adm_width", type=int, default=32, help="model_channels (paper: 192)")
    parser.add_argument("--adm_head_channels", type=int, default=32, help="(paper: 64)")
    parser.add_argument("--steps", type=int, default=1, help="train steps per timed run")
    parser.add_argument("--sample_steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 sampling "
                        "steps, 1 repeat, the ADM config's :smoke variant")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--omp_active", action="store_true",
                        help="do not set OMP_WAIT_POLICY=PASSIVE (see the module docstring)")
    parser.add_argument("--json", default="", help="write the record to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.adm_batch, args.sample_steps, args.repeats = 2, 2, 2, 1
    common.setup_jax()  # (may start this process over, with diffjax.main's GLIBC_TUNABLES)
    if not args.omp_active:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(OpenMP default)')} GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')} (both sides, one process); "
          f"{common.load_note()}")
    adm_name = "imagenet64:smoke" if args.quick else \
        f"ADM imagenet64 width {args.adm_width} (paper 192)"
    archs = {"fashion_mnist": (common.experiment_config("fashion_mnist"), args.batch),
             adm_name: (common.imagenet64_cpu_config(args.adm_width, args.adm_head_channels,
                                                     args.quick), args.adm_batch)}
    record = {name: compare(name, c, batch, args) for name, (c, batch) in archs.items()}
    print("warm-up: diffjax = lower + compile (XLA); pytorch = first eager call minus the "
          "median call (no compilation step). Train step timings exclude the data pipeline.\n"
          "peak RSS +MB: peak resident memory over the RSS before that side built its model "
          "(train) or its sampler (sampling), after the compile (whose own peak is given for "
          "diffjax; compiled code XLA keeps counts in the later rows); torch has no compile.")
    common.write_json(args.json, {"benchmark": "vs_pytorch", "args": vars(args),
                                  "architectures": record})


if __name__ == "__main__":
    main()
