"""Input-pipeline throughput (examples/s): is the data ever the bottleneck of a train step?

    python benchmarks/input_pipeline.py [--batches 100] [--folder_images 512]

Measures, after a warm-up batch, the host iterator of `make_train_iterator` with random flips:
  * Fashion-MNIST from Debian's IDX files (28x28x1) at global batch 64 and 256;
  * a folder of generated 96x96 RGB PNGs, resized + centre-cropped to 64x64, decoded on the fly
    and with cache=True;
  * the IDX pipeline through prefetch_to_mesh onto the first device (host -> device included).
Compare with a train step's examples/s: e.g. DESIGN.md's small UNet takes 3.3 s for 64
examples on these CPUs (~20 examples/s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from diffjax.data import pipeline


def examples_per_second(iterator, batch_size: int, batches: int) -> float:
    next(iterator)  # warm-up: file decompression, thread start-up
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    jax.block_until_ready(batch["image"])
    return batches * batch_size / (time.perf_counter() - start)


def idx_iterator(batch_size: int, **options):
    return pipeline.make_train_iterator(
        source="fashion_mnist_idx", split="train", image_size=28, global_batch_size=batch_size,
        seed=0, random_flip=True, process_index=0, process_count=1, **options)


def write_pngs(root: str, count: int, size: int = 96) -> None:
    rng = np.random.default_rng(0)
    for label in range(4):
        os.makedirs(os.path.join(root, f"class{label}"), exist_ok=True)
    base = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    for i in range(count):
        image = np.roll(base, shift=i, axis=1)  # distinct, compressible like a photo is not
        Image.fromarray(image).save(os.path.join(root, f"class{i % 4}", f"{i:05d}.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--folder_images", type=int, default=512)
    args = parser.parse_args()
    rows = []
    for batch_size in (64, 256):
        rate = examples_per_second(idx_iterator(batch_size), batch_size, args.batches)
        rows.append((f"fashion_mnist_idx 28x28x1, batch {batch_size}, flips", rate))
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    on_device = pipeline.prefetch_to_mesh(idx_iterator(256), sharding, size=2)
    rows.append(("fashion_mnist_idx batch 256 + prefetch_to_mesh (1 device)",
                 examples_per_second(on_device, 256, args.batches)))
    on_device.close()
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_pngs(root, args.folder_images)
        print(f"wrote {args.folder_images} PNGs in {time.perf_counter() - start:.1f} s")
        for cache, threads in ((False, 1), (False, 2), (False, 4), (True, 2)):
            it = pipeline.make_train_iterator(
                source="folder", split="train", data_dir=root, image_size=64,
                global_batch_size=64, seed=0, random_flip=True, process_index=0,
                process_count=1, num_threads=threads, cache=cache)
            batches = max(4, args.batches // (1 if cache else 10))
            rows.append((f"folder 96->64 RGB PNG, batch 64, flips, threads={threads}, "
                         f"cache={cache}", examples_per_second(it, 64, batches)))
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>10.0f} examples/s")


if __name__ == "__main__":
    main()
