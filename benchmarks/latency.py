"""Latency of scoring one image at a time (an inspection line), the cold start, and batch throughput,
for PyTorch eager, ONNX Runtime and OpenVINO in one run.

For a model folder (`--model OUTPUT/model`; default: the synthloco-cpu detector with random weights,
saved to a temporary folder, since the cost does not depend on the weights) it exports the graphs
(`ladmim export`, batch 1 for streaming and `--batch` for throughput) and measures, on preprocessed
pixels with the model's own masks (`seed=0`), for each backend:

- **cold start**: a fresh interpreter imports what the backend needs, loads the model (PyTorch:
  `AutoModel.from_pretrained(..., trust_remote_code=True)` and its image processor; exported: the
  torch-free `inference_ladmim.LadmimInferencer` from the export folder, graph compiled) and scores one
  image file: seconds for the import, the load, and the first image (decode, preprocess, score);
- **streaming**: `--calls` single-image calls in a row, p50 / p99 / max latency (the first
  `--warmup` calls reported apart, as `first_calls_ms`);
- **throughput**: batches of `--batch` images, images per second (median over `--rounds`).

The backends take turns in blocks of consecutive calls (`--rounds` blocks each, the order rotated
every round), so a machine whose load drifts biases none of them. Not call by call: ONNX Runtime and
OpenVINO keep their worker threads spinning for a while after a call, which on 2 cores slowed the
next backend's call (on the demo model: OpenVINO p50 28 ms interleaved, 15.9 ms in blocks; eager 48 vs 38.7 ms), and
an inspection line runs one backend, not three in turn.

    python benchmarks/latency.py --threads 2                     # the synthloco-cpu sizes
    python benchmarks/latency.py --model outputs/synthloco/model --threads 2
    python benchmarks/latency.py --tiny                          # seconds, for the tests

Last stdout line: JSON with `backends` (`{name: {cold_start, streaming, throughput}}`), `best_backend`
and `p50_ratio_best_vs_eager` (the best exported backend's p50 over PyTorch eager's).
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

EAGER = "pytorch-eager"
EXPORTED = ("onnx", "openvino")

# Runs in a fresh interpreter: what a service pays before its first verdict.
COLD_START_EAGER = r"""
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

# The deployment path: only the export folder's own files, numpy, PIL and the runtime.
COLD_START_EXPORTED = r"""
import json, sys, time
start = time.perf_counter()
folder, image, category, threads, backend = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sys.modules["torch"] = None  # proves the path needs no torch
sys.path.insert(0, folder)
from inference_ladmim import LadmimInferencer
__import__({"onnx": "onnxruntime", "openvino": "openvino"}[backend])
imported = time.perf_counter()
inferencer = LadmimInferencer(folder, backend, threads=threads or None)
inferencer.graph(category)
loaded = time.perf_counter()
result = inferencer([image], category=category)
scored = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "first_image_s": scored - loaded,
                  "total_s": scored - start, "score": float(result.pred_score[0])}))
"""


def _save_random_detector(config, folder: Path, seed: int) -> None:
    from ladmim_hf import LadmimImageProcessor

    model = C.build_detector(config, seed=seed)
    model.save_pretrained(folder)
    LadmimImageProcessor(size=config.tokenizer_config.image_size).save_pretrained(folder)


def cold_start(backend: str, folder: Path, image: Path, category: str, threads: int | None) -> dict:
    command = [sys.executable, "-c", COLD_START_EAGER if backend == EAGER else COLD_START_EXPORTED, str(folder),
               str(image), category, str(threads or 0)] + ([] if backend == EAGER else [backend])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{backend} cold start failed:\n{done.stderr[-3000:]}")
    return {k: round(v, 3) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def scorers(model, category: str, single: Path, batched: Path, threads: int | None) -> dict:
    """`{backend: (score one batch of pixels (n, 3, S, S) float32 at batch 1, ... at the throughput batch)}`."""
    from ladmim_hf.deploy.inference_ladmim import LadmimInferencer

    def eager(pixels: np.ndarray):
        with torch.inference_mode():
            return model(pixel_values=torch.from_numpy(pixels), category=category)

    out = {EAGER: (eager, eager)}
    for backend in EXPORTED:
        one, many = LadmimInferencer(single, backend, threads), LadmimInferencer(batched, backend, threads)
        out[backend] = (lambda p, i=one: i(pixel_values=p, category=category),
                        lambda p, i=many: i(pixel_values=p, category=category))
    return out


def _rotations(names: list[str], rounds: int):
    """Round by round, the backends in an order rotated by one each round."""
    for round_index in range(rounds):
        shift = round_index % len(names)
        yield round_index, names[shift:] + names[:shift]


def streaming(single_calls: dict, images: np.ndarray, warmup: int, rounds: int) -> dict:
    """Milliseconds per single-image call; each backend scores `images` in `rounds` blocks of consecutive calls."""
    times = {name: [] for name in single_calls}
    blocks = np.array_split(np.arange(len(images)), rounds)
    for round_index, order in _rotations(list(single_calls), rounds):
        for name in order:
            for index in blocks[round_index]:
                seconds, _ = C.timed(lambda: single_calls[name](images[index][None]))
                times[name].append(seconds * 1000)
    out = {}
    for name, values in times.items():
        steady = np.asarray(values[warmup:])
        out[name] = {"calls": len(steady), "p50_ms": round(float(np.percentile(steady, 50)), 2),
                     "p99_ms": round(float(np.percentile(steady, 99)), 2), "max_ms": round(float(steady.max()), 2),
                     "first_calls_ms": [round(t, 1) for t in values[:warmup]]}
    return out


def throughput(batch_calls: dict, images: np.ndarray, batch: int, rounds: int) -> dict:
    """Images per second at `batch`, median over `rounds` (three batches in a row per backend and round)."""
    rates = {name: [] for name in batch_calls}
    for _, order in _rotations(list(batch_calls), rounds):
        for name in order:
            for _ in range(3):
                seconds, _ = C.timed(lambda: batch_calls[name](images[:batch]))
                rates[name].append(batch / seconds)
    return {name: {"batch": batch, "images_per_s": round(C.median(values), 2)} for name, values in rates.items()}


def main(argv=None) -> dict:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: synthloco-cpu sizes, random weights)")
    parser.add_argument("--category", default=None, help="category to score as (default: the model's first)")
    parser.add_argument("--calls", type=int, default=100, help="single-image calls timed per backend")
    parser.add_argument("--warmup", type=int, default=5, help="first calls reported apart, not in the percentiles")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    C.apply_threads(args)
    if args.tiny:
        args.calls, args.warmup, args.batch, args.rounds = 6, 2, 2, 2
    from PIL import Image

    from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor
    from ladmim_hf.deploy.export import export_model, processor_settings

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.model) if args.model else tmp / "model"
        if args.model is None:
            config = C.tiny_config() if args.tiny else C.synthloco_config()
            _save_random_detector(config, folder, args.seed)
        model = LadmimForAnomalyDetection.from_pretrained(folder).eval()
        category = args.category or model.categories[0]
        size = model.config.tokenizer_config.image_size
        C.log(f"exporting {category} (ONNX + OpenVINO, batch 1 and {args.batch})")
        single, batched = tmp / "export-1", tmp / f"export-{args.batch}"
        parity = {}
        for out, batch in ((single, 1), (batched, args.batch)):
            metadata = export_model(model, out, list(EXPORTED), [category], batch_size=batch,
                                    preprocessing=processor_settings(LadmimImageProcessor.from_pretrained(folder)))
            parity[batch] = metadata["parity"][category]
        image = tmp / "cold_start.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
        C.log("cold starts (fresh interpreters)")
        cold = {EAGER: cold_start(EAGER, folder, image, category, threads)}
        cold.update({backend: cold_start(backend, single, image, category, threads) for backend in EXPORTED})
        calls = scorers(model, category, single, batched, threads)
        images = C.random_images(max(args.calls + args.warmup, args.batch), size, args.seed).numpy()
        C.log(f"streaming: {args.calls + args.warmup} single-image calls per backend")
        stream = streaming({name: pair[0] for name, pair in calls.items()}, images[:args.calls + args.warmup], args.warmup,
                           args.rounds)
        C.log(f"throughput: batches of {args.batch}")
        rate = throughput({name: pair[1] for name, pair in calls.items()}, images, args.batch, args.rounds)
    backends = {name: {"cold_start": cold[name], "streaming": stream[name], "throughput": rate[name]} for name in cold}
    best = min(EXPORTED, key=lambda name: stream[name]["p50_ms"])
    ratio = round(stream[best]["p50_ms"] / stream[EAGER]["p50_ms"], 3)
    payload = {"benchmark": "latency", "model": args.model or ("tiny" if args.tiny else "synthloco-cpu (random weights)"),
               "category": category, "num_masks": model.config.num_masks, "threads": threads, "backends": backends,
               "best_backend": best, "p50_ratio_best_vs_eager": ratio,
               "parity_at_export": {str(batch): value for batch, value in parity.items()}}
    lines = [f"{name}: p50 {b['streaming']['p50_ms']} ms, p99 {b['streaming']['p99_ms']} ms; cold start "
             f"{b['cold_start']['total_s']} s (import {b['cold_start']['import_s']}, load {b['cold_start']['load_s']}, "
             f"first image {b['cold_start']['first_image_s']}); batch {b['throughput']['batch']}: "
             f"{b['throughput']['images_per_s']} images/s" for name, b in backends.items()]
    C.emit("\n".join(lines) + f"\nbest exported backend {best}: p50 {ratio}x PyTorch eager's", payload)
    return payload


if __name__ == "__main__":
    main()
