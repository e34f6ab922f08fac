"""The benchmark scripts run end to end in their quick modes (figures are printed, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


def test_collect_benchmark_quick(tmp_path):
    stdout, result = _run(["benchmarks/collect.py", "--quick"], tmp_path)
    assert "frames/s" in stdout and "gymnasium" in stdout
    assert result


def test_train_speed_benchmark_smoke(tmp_path):
    stdout, result = _run(["benchmarks/train_speed.py", "--preset", "smoke", "--chunks", "1"], tmp_path)
    assert "steps/s" in stdout
    assert result["vae"]["steps_per_s"] > 0 and result["transition"]["steps_per_s"] > 0
