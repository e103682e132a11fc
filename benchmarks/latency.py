"""Latency of scoring one image at a time (an inspection line), the cold start, and batch throughput.

For a model folder (`--model OUTPUT/model`; default: the synthloco-cpu detector with random weights,
saved to a temporary folder, since the cost does not depend on the weights) it measures, with
PyTorch eager on preprocessed tensors and the model's own masks (`seed=0`):

- **cold start**: a fresh interpreter imports transformers, loads the folder with
  `AutoModel.from_pretrained(..., trust_remote_code=True)` and its image processor, and scores one
  image file: seconds for the import, the load, and the first image (decode, preprocess, score);
- **streaming**: `--calls` single-image calls in a row, p50 / p99 / max latency (the first
  `--warmup` calls reported apart, as `first_calls_ms`);
- **throughput**: batches of `--batch` images, images per second (median over `--rounds`).

    python benchmarks/latency.py --threads 2                     # the synthloco-cpu sizes
    python benchmarks/latency.py --model outputs/synthloco/model --threads 2
    python benchmarks/latency.py --tiny                          # seconds, for the tests

Last stdout line: JSON with `backend` ("pytorch-eager"), `cold_start`, `streaming`, `throughput`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import _common as C

# Runs in a fresh interpreter: what a service pays before its first verdict.
COLD_START = r"""
import json, sys, time
start = time.perf_counter()
import torch
from transformers import AutoImageProcessor, AutoModel
imported = time.perf_counter()
folder, image, category, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
loaded = time.perf_counter()
with torch.inference_mode():
    out = model(**processor(image), category=category)
scored = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "first_image_s": scored - loaded,
                  "total_s": scored - start, "score": float(out.pred_score[0])}))
"""


def _save_random_detector(config, folder: Path, seed: int) -> None:
    from ladmim_hf import LadmimImageProcessor

    model = C.build_detector(config, seed=seed)
    model.save_pretrained(folder)
    LadmimImageProcessor(size=config.tokenizer_config.image_size).save_pretrained(folder)


def cold_start(folder: Path, category: str, size: int, threads: int | None) -> dict:
    from PIL import Image

    image = folder.parent / "cold_start.png"
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    done = subprocess.run([sys.executable, "-c", COLD_START, str(folder), str(image), category, str(threads or 0)],
                          capture_output=True, text=True, check=True)
    return {k: round(v, 3) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def streaming(model, category: str, images: torch.Tensor, warmup: int) -> dict:
    """Milliseconds per single-image call, one call after the other."""
    times = []
    with torch.inference_mode():
        for image in images:
            seconds, _ = C.timed(lambda: model(pixel_values=image[None], category=category))
            times.append(seconds * 1000)
    steady = np.asarray(times[warmup:])
    return {"calls": len(steady), "p50_ms": round(float(np.percentile(steady, 50)), 2),
            "p99_ms": round(float(np.percentile(steady, 99)), 2), "max_ms": round(float(steady.max()), 2),
            "first_calls_ms": [round(t, 1) for t in times[:warmup]]}


def throughput(model, category: str, images: torch.Tensor, batch: int, rounds: int) -> dict:
    rates = []
    with torch.inference_mode():
        for _ in range(rounds):
            seconds, _ = C.timed(lambda: model(pixel_values=images[:batch], category=category))
            rates.append(batch / seconds)
    return {"batch": batch, "images_per_s": round(C.median(rates), 2)}


def main(argv=None) -> dict:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: synthloco-cpu sizes, random weights)")
    parser.add_argument("--category", default=None, help="category to score as (default: the model's first)")
    parser.add_argument("--calls", type=int, default=100, help="single-image calls timed")
    parser.add_argument("--warmup", type=int, default=5, help="first calls reported apart, not in the percentiles")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    C.apply_threads(args)
    if args.tiny:
        args.calls, args.warmup, args.batch, args.rounds = 6, 2, 2, 2
    from ladmim_hf import LadmimForAnomalyDetection

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp) / "model"
        if args.model is None:
            config = C.tiny_config() if args.tiny else C.synthloco_config()
            _save_random_detector(config, folder, args.seed)
        C.log("cold start (fresh interpreter)")
        model = LadmimForAnomalyDetection.from_pretrained(folder).eval()
        category = args.category or model.categories[0]
        size = model.config.tokenizer_config.image_size
        cold = cold_start(folder, category, size, args.threads)
        images = C.random_images(max(args.calls + args.warmup, args.batch), size, args.seed)
        C.log(f"streaming: {args.calls + args.warmup} single-image calls")
        stream = streaming(model, category, images[:args.calls + args.warmup], args.warmup)
        C.log(f"throughput: batches of {args.batch}")
        rate = throughput(model, category, images, args.batch, args.rounds)
    payload = {"benchmark": "latency", "backend": "pytorch-eager", "model": args.model or ("tiny" if args.tiny else "synthloco-cpu (random weights)"),
               "category": category, "num_masks": model.config.num_masks, "cold_start": cold, "streaming": stream,
               "throughput": rate}
    C.emit(f"pytorch eager, batch 1: p50 {stream['p50_ms']} ms, p99 {stream['p99_ms']} ms (first calls "
           f"{stream['first_calls_ms']} ms); cold start {cold['total_s']} s (import {cold['import_s']} s, load "
           f"{cold['load_s']} s, first image {cold['first_image_s']} s); batch {rate['batch']}: "
           f"{rate['images_per_s']} images/s", payload)
    return payload


if __name__ == "__main__":
    main()
