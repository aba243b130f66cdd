"""Train-step throughput of the real trainer: steps/s, examples/s, compile time, peak memory.

    python benchmarks/train_step.py [--batch 64] [--adm_batch 4] [--adm_width 32] [--steps 2]
                                    [--repeats 3] [--quick] [--json PATH]

For experiments/fashion_mnist.py and for experiments/imagenet64.py reduced in width to fit a
CPU (see ``common.imagenet64_cpu_config``), builds ``diffjax.train.loop.Trainer`` from the
config's Experiment (``diffjax.experiment.build``) and times its jitted ``train_step``
(forward, loss, backward, AdamW, EMA; the state is donated and threaded through) on a fixed
random batch already on the device, so the data pipeline is not in the loop
(``common.time_trainer``). Then measures the input pipeline alone (host iterator, examples/s
after a warm-up batch; benchmarks/input_pipeline.py) for the same geometry: Fashion-MNIST
IDX files, and for 64x64 a folder of generated 96x96 PNGs resized on the fly (the tfds
ImageNet pipeline needs the prepared dataset, which a CPU box does not have). The input
pipeline keeps up when its examples/s exceeds the step's.
"""

from __future__ import annotations

import argparse
import tempfile

import jax

import common
import input_pipeline


def pipeline_fmnist(batch: int, batches: int) -> float:
    return input_pipeline.examples_per_second(input_pipeline.idx_iterator(batch), batch, batches)


def pipeline_folder(size: int, batch: int, batches: int, images: int) -> float:
    from diffjax.data import pipeline

    with tempfile.TemporaryDirectory() as root:
        input_pipeline.write_pngs(root, images)
        it = pipeline.make_train_iterator(
            source="folder", split="train", data_dir=root, image_size=size,
            global_batch_size=batch, seed=0, random_flip=True, process_index=0,
            process_count=1, num_threads=2, cache=False)
        return input_pipeline.examples_per_second(it, batch, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="fashion_mnist global batch")
    parser.add_argument("--adm_batch", type=int, default=4, help="reduced ImageNet-64 batch")
    parser.add_argument("--adm_width", type=int, default=32,
                        help="model_channels of the reduced ADM-64 (paper: 192)")
    parser.add_argument("--adm_head_channels", type=int, default=32, help="(paper: 64)")
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median taken)")
    parser.add_argument("--pipeline_batches", type=int, default=50)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny batches, the ADM config's :smoke variant, 1 step, "
                             "1 repeat")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.adm_batch = 8, 2
        args.steps, args.repeats, args.pipeline_batches = 1, 1, 4
    common.setup_jax()

    adm = common.imagenet64_cpu_config(args.adm_width, args.adm_head_channels, args.quick)
    adm_name = "imagenet64:smoke" if args.quick else f"imagenet64 width {args.adm_width}"
    models = {"fashion_mnist": (common.experiment_config("fashion_mnist"), args.batch),
              adm_name: (adm, args.adm_batch)}
    results = {}
    for name, (c, batch) in models.items():
        print(f"timing {name} (batch {batch}) ...", flush=True)
        results[name] = common.time_trainer(c, batch, args.steps, args.warmup, args.repeats)
    fm_r, adm_r = results.values()
    print("timing the input pipelines ...", flush=True)
    fm_r["input_examples_per_s"] = pipeline_fmnist(args.batch, args.pipeline_batches)
    fm_r["input_pipeline"] = "fashion_mnist_idx 28x28x1, flips"
    size = adm.data.image_size
    adm_r["input_examples_per_s"] = pipeline_folder(
        size, args.adm_batch, max(2, args.pipeline_batches // 5), max(64, 4 * args.adm_batch))
    adm_r["input_pipeline"] = f"folder of 96x96 RGB PNGs -> {size}x{size}, flips, 2 threads"

    print(f"\nbackend={jax.default_backend()}; {common.load_note()} "
          f"({args.repeats} runs of {args.steps} steps after {args.warmup} warm-up)")
    headers = ["model", "params (M)", "batch", "compile (s)", "steps/s", "examples/s",
               "peak +MB compile", "peak +MB train", "input examples/s", "input / step"]
    rows = [[name, r["params"] / 1e6, r["batch"], r["compile_s"], r["steps_per_s"],
             r["examples_per_s"], r["compile_peak_rss_increase_mb"],
             r["train_peak_rss_increase_mb"], r["input_examples_per_s"],
             f"{r['input_examples_per_s'] / r['examples_per_s']:.0f}x"]
            for name, r in results.items()]
    common.print_table(headers, rows)
    for name, r in results.items():
        print(f"  {name}: input pipeline = {r['input_pipeline']}; run-to-run spread "
              f"{100 * r['spread']:.0f}%; loss after the runs {r['final_loss']:.4f}"
              + ("" if r["exact_peak"] else "; peak RSS is cumulative (no clear_refs)"))
    print("  peak +MB: peak resident memory over the RSS before the model was built, during "
          "build+init+compile and then during the train steps (state included).")
    common.write_json(args.json, {"benchmark": "train_step", "args": vars(args),
                                  "results": results})


if __name__ == "__main__":
    main()
