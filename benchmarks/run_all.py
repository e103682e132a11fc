"""Run the performance benchmarks one after another with their default settings and time the suite.

Runs `scoring.py`, `scoring.py --memory`, `train_step.py --micro_batch 8`, `roofline.py` and
`feature_cache.py` (each in its own interpreter, so one script's allocations do not colour the
next), prints one line per script with its wall time and headline figure, and writes every script's
JSON result into one file. The suite is sized to finish in under 5 minutes on a quiet 2-core CPU.

    python benchmarks/run_all.py                          # defaults, results in benchmarks/results.json
    python benchmarks/run_all.py --threads 1 --out r.json # every script with --threads 1
    python benchmarks/run_all.py --tiny                   # seconds, for the tests

The last stdout line is a JSON object: total_seconds, and per script its seconds and result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITE = {
    "scoring": ["scoring.py"],
    "scoring_memory": ["scoring.py", "--memory"],
    "train_step": ["train_step.py", "--micro_batch", "8"],
    "roofline": ["roofline.py"],
    "feature_cache": ["feature_cache.py"],
}
TINY_EXTRA = {"scoring_memory": ["--memory_settings", "1x6,4x6"]}


def headline(name: str, result: dict) -> str:
    """The figure a reader looks for first."""
    if name == "scoring":
        return f"speedup x{result['speedup']:.2f}, max score diff {result['max_abs_score_diff']:.1e}"
    if name == "scoring_memory":
        peaks = ", ".join(f"{k} {v:.0f} MB" for k, v in result["peak_rss_mb"].items())
        return f"{peaks}; grows with batch {result['grows_with_batch']}, with images {result['grows_with_images']}"
    if name == "train_step":
        text = f"speedup x{result['speedup']:.2f}"
        if "micro_batch" in result:
            text += f", micro-batch {result['micro_batch']['size']}: x{result['micro_batch']['speedup_vs_reference']:.2f}"
        return text
    if name == "roofline":
        return f"efficiency {result['efficiency']:.2f}"
    return f"speedup x{result['speedup']:.2f}"


def run_script(name: str, command: list[str], env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], cwd=str(HERE.parent), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name} ({' '.join(command)}) exited with {done.returncode}:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return seconds, json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="every script in --tiny mode (seconds; the tests)")
    parser.add_argument("--threads", type=int, default=None, help="passed to every script")
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=None, help="run these scripts only")
    parser.add_argument("--out", default=None, help="JSON file for all results (default benchmarks/results.json; none with --tiny)")
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    report = {"scripts": {}}
    started = time.perf_counter()
    for name, command in SUITE.items():
        if args.only and name not in args.only:
            continue
        command = list(command)
        if args.tiny:
            command += ["--tiny", *TINY_EXTRA.get(name, [])]
        if args.threads:
            command += ["--threads", str(args.threads)]
        print(f"[run_all] {' '.join(command)} ...", file=sys.stderr, flush=True)
        seconds, result = run_script(name, command, env)
        report["scripts"][name] = {"command": "python benchmarks/" + " ".join(command), "seconds": round(seconds, 1),
                                   "result": result}
        print(f"{name:<15} {seconds:6.1f} s  {headline(name, result)}", flush=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(f"{'total':<15} {report['total_seconds']:6.1f} s")
    out = args.out or (None if args.tiny else str(HERE / "results.json"))
    if out:
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)  # a failed run never leaves a half-written results file
    print(json.dumps({"total_seconds": report["total_seconds"],
                      "scripts": {k: {"seconds": v["seconds"], "result": v["result"]} for k, v in report["scripts"].items()}}))
    return report


if __name__ == "__main__":
    main()
