"""Input-pipeline throughput: images/s that `repopt_jax.data.make_iterator` delivers for CIFAR-sized batches.

Measures training streams (shuffle + augmentation + normalisation) of 32x32 images at batch 128 on:

* ``digits``: the embedded dataset, 8x8x1 resized to 32x32 per batch;
* ``fashion_mnist``: 28x28x1 resized to 32 (when the idx files are installed, e.g. Debian's
  dataset-fashion-mnist);
* ``repopt_bench_cifar_like``: a locally built stand-in for stock tfds CIFAR: 10,000 random 32x32x3 images
  stored as PNG in array_record (10 files), read and decoded exactly like a prepared cifar10/100 (tfds numpy
  path: PIL, or OpenCV when installed).

for grain worker counts 0 (reader threads in this process) and 2. Writes
experiments/results/bench_input.{json,md} with the command and the hardware.

Usage: python experiments/bench_input.py [--batches 80] [--workers 0 2] [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

from experiments.common import cpu_model  # noqa: E402


def _build_cifar_like(data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from repopt_jax import data  # pylint: disable=g-import-not-at-top

  class RepoptBenchCifarLike(data.ArrayImageBuilder):
    """10,000 random 32x32x3 PNG images, 10 classes: stock-CIFAR storage without the download."""

    VERSION = tfds.core.Version("1.0.0")
    IMAGE_SHAPE = (32, 32, 3)
    IMAGE_ENCODING = "png"
    CLASS_NAMES = tuple(str(i) for i in range(10))

    def _arrays(self, dl_manager):
      rng = np.random.default_rng(0)
      # Smooth random images (PNG of pure noise would be larger and slower to decode than real photos).
      low = rng.integers(0, 256, (10000, 8, 8, 3), dtype=np.uint8)
      images = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)
      return {"train": (images, rng.integers(0, 10, 10000))}

  builder = RepoptBenchCifarLike(data_dir=data_dir, file_format="array_record")
  if not os.path.isfile(os.path.join(os.fspath(builder.data_path), "dataset_info.json")):
    builder.prepare()
  return "repopt_bench_cifar_like"


def measure(name: str, data_dir: str, workers: int, batches: int, batch: int = 128) -> dict:
  from repopt_jax import data  # pylint: disable=g-import-not-at-top

  it = data.make_iterator(name, global_batch_size=batch, train=True, seed=0, image_size=32, data_dir=data_dir,
                          worker_count=workers, process_index=0, process_count=1)
  t0 = time.perf_counter()
  for _ in range(5 if workers == 0 else 10):  # warm-up: worker start, first reads
    b = next(it)
  warm = time.perf_counter() - t0
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in range(batches):
    b = next(it)
  wall = time.perf_counter() - t0
  cpu = time.process_time() - cpu0
  assert b["image"].shape == (batch, 32, 32, b["image"].shape[-1]) and b["image"].dtype == np.float32
  channels = int(b["image"].shape[-1])
  del it, b  # closes grain's worker processes and their shared memory now
  gc.collect()
  return {"dataset": name, "workers": workers, "batch": batch, "channels": channels,
          "batches": batches, "images_per_s": round(batches * batch / wall, 1), "wall_s": round(wall, 3),
          "main_process_cpu_s": round(cpu, 3), "warmup_s": round(warm, 3),
          # With no worker process all the work is in this process: images per CPU-second is the pipeline's
          # capacity per core, whatever else shares the machine.
          "images_per_cpu_s": round(batches * batch / cpu, 1) if workers == 0 and cpu > 0 else None}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=80)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  p.add_argument("--data_dir", default=os.path.join(RESULTS, "_scratch", "tfds"))
  p.add_argument("--out", default=os.path.join(RESULTS, "bench_input"))
  args = p.parse_args(argv)

  from repopt_jax import data  # pylint: disable=g-import-not-at-top

  os.makedirs(args.data_dir, exist_ok=True)
  names = ["digits"]
  try:
    data.fashion_mnist_source_dir()
    names.append("fashion_mnist")
  except data.DatasetError as e:
    print(f"skipping fashion_mnist: {e}")
  t = time.perf_counter()
  for n in names:
    data.prepare_local(n, data_dir=args.data_dir)
  names.append(_build_cifar_like(args.data_dir))
  print(f"datasets ready in {time.perf_counter() - t:.1f}s: {', '.join(names)}")

  load_before = os.getloadavg()
  rows = []
  for name in names:
    for w in args.workers:
      r = measure(name, args.data_dir, w, args.batches)
      rows.append(r)
      per_cpu = f", {r['images_per_cpu_s']:.0f} per CPU-s" if r["images_per_cpu_s"] else ""
      print(f"{name:26s} workers={w}  {r['images_per_s']:9.0f} images/s{per_cpu}  (batch {r['batch']}, 32x32x"
            f"{r['channels']}, {r['batches']} batches in {r['wall_s']:.2f}s)")
  load_after = os.getloadavg()

  import grain  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    import cv2  # pylint: disable=g-import-not-at-top
    decoder = f"OpenCV {cv2.__version__} (tfds uses it when installed)"
  except ImportError:
    import PIL  # pylint: disable=g-import-not-at-top
    decoder = f"PIL {PIL.__version__} (OpenCV not installed)"

  result = {
      "what": "images/s delivered by repopt_jax.data.make_iterator (train: shuffle + augmentation + "
              "normalisation, float32, image_size 32, batch 128)",
      "command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(HERE))] + sys.argv[1:]),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "hardware": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                   "loadavg_before": [round(x, 2) for x in load_before],
                   "loadavg_after": [round(x, 2) for x in load_after]},
      "image_decoder": decoder,
      "software": {"python": platform.python_version(), "numpy": np.__version__, "grain": grain.__version__
                   if hasattr(grain, "__version__") else "0.2.18", "tensorflow_datasets": tfds.__version__},
      "results": rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  lines = [
      "# Input pipeline throughput",
      "",
      f"Generated by `{result['command']}` on {result['date']}.",
      "",
      f"Hardware: {result['hardware']['cpu']}, {result['hardware']['cpu_count']} CPUs; load average "
      f"{result['hardware']['loadavg_before'][0]} before / {result['hardware']['loadavg_after'][0]} after "
      "(other processes share these cores, so the numbers are lower bounds).",
      "",
      "Training stream: shuffle + augmentation (pad-crop, flip where the dataset allows) + normalisation, "
      f"float32, 32x32, batch 128. PNG decoder (the cifar-like set): {decoder}.",
      "",
      "| dataset | grain workers | images/s (wall) | images per CPU-second | main-process CPU s | wall s |",
      "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    per_cpu = f"{r['images_per_cpu_s']:.0f}" if r["images_per_cpu_s"] else "-"
    lines.append(f"| {r['dataset']} (32x32x{r['channels']}) | {r['workers']} | {r['images_per_s']:.0f} | "
                 f"{per_cpu} | {r['main_process_cpu_s']:.2f} | {r['wall_s']:.2f} |")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
  main()
