"""`bash benchmarks/gpu_run.sh --tiny` end to end on whatever device there is (the CPU in CI): every phase
runs at tiny sizes, the markdown table comes last with one row per phase (one per setting for
scoring), and the summary, results and logs land in --out. Only the shape and the exactness of the
CPU-against-CPU comparison are checked, never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import gpu_run
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

ROWS = ["environment", "synthloco", "CUDA tests", "scoring fp32", "scoring fp32", "scoring bf16", "scoring bf16",
        "scoring CPU fp32", "train paper-scaled", "evaluate paper-scaled", "train CPU default", "evaluate CPU default"]


@pytest.mark.slow
def test_tiny_gpu_run_prints_the_table_last_and_writes_the_logs(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    lines = result.stdout.rstrip().splitlines()
    table = lines[-(len(ROWS) + 2):]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == list(gpu_run.COLUMNS)
    assert table[1] == "|" + "---|" * len(header)
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]
    assert [row["phase"] for row in rows] == ROWS
    assert all(row["status"] == "ok" for row in rows), rows
    assert not lines[-len(ROWS) - 3].startswith("|"), "nothing but the table follows the notes"

    by_phase = {row["phase"]: row for row in rows}
    assert by_phase["CUDA tests"]["result"].startswith(("6 passed", "6 skipped"))
    for row in rows[3:7]:
        assert row["result"].endswith(" images/s") and float(row["result"].split()[0]) > 0
        logical, everything = (float(x) for x in row["max abs diff vs CPU fp32"].split(" / "))
        limit = 1e-3 if row["phase"] == "scoring fp32" else 5e-2
        assert 0.0 <= logical <= limit and 0.0 <= everything, row
    for title in ("paper-scaled", "CPU default"):
        aurocs = [float(x) for x in by_phase[f"evaluate {title}"]["AUROC log / str"].split(" / ")]
        assert len(aurocs) == 2 and all(0.0 <= x <= 1.0 for x in aurocs)
        assert "steps/s" in by_phase[f"train {title}"]["result"]

    assert sorted(p.name for p in out.iterdir()) == ["cuda_tests.xml", "gpu_run.log", "metrics_default.json",
                                                    "metrics_paper.json", "results.json", "summary.md"]
    assert (out / "summary.md").read_text().rstrip().endswith("\n".join(table))
    log = (out / "gpu_run.log").read_text()
    for phase in gpu_run.BUDGETS:
        assert f"===== {phase}: ok after" in log, phase
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "tiny" and set(results["phases"]) == set(gpu_run.BUDGETS)
    assert results["phases"]["train_paper"]["settings"]["mixed_precision"] == "bf16"
    assert "accelerate.commands.launch" in results["phases"]["train_paper"]["command"]
    assert set(results["phases"]["train_paper"]["stages"]) == {"tokenizer", "predictor/pushpins"}
