"""The benchmark scripts run end to end in their quick modes (figures are printed, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_collect_benchmark_quick(tmp_path):
    stdout, result = _run(["benchmarks/collect.py", "--quick"], tmp_path)
    assert "frames/s" in stdout and "gymnasium" in stdout
    assert result


@pytest.mark.slow
def test_train_speed_benchmark_smoke(tmp_path):
    stdout, result = _run(["benchmarks/train_speed.py", "--preset", "smoke", "--chunks", "1", "--episodes", "20"], tmp_path)
    assert "steps/s" in stdout
    assert result["vae"]["steps_per_s"] > 0 and result["transition"]["steps_per_s"] > 0


@pytest.mark.slow
def test_dream_throughput_quick(tmp_path):
    stdout, result = _run(["benchmarks/dream_throughput.py", "--quick"], tmp_path)
    assert "steps/s" in stdout and "Machine:" in stdout
    assert result["head"] == "gaussian" and result["hidden"] == 256 and result["latent"] == 64
    assert [r["mode"] for r in result["results"]] == ["fp32-highest", "fp32", "bf16"]
    for r in result["results"]:
        assert r["steps_per_s"] > 0 and r["first_call_s"] >= r["median_s"] > 0
        assert r["steps_per_call"] == r["population"] * r["rollouts"] * result["horizon"]


def test_pipeline_time(tmp_path):
    for name, seconds in (("a", 1.0), ("b", 2.5)):
        run = tmp_path / name
        run.mkdir()
        wall = {"collect": seconds, "vae": 10 * seconds, "evaluate": 3.0}
        wall["total"] = sum(wall.values())
        summary = {"preset": "smoke", "device": "cpu", "real_return_mean": 9.5, "wall_s": wall}
        (run / "summary.json").write_text(json.dumps(summary))
    stdout, result = _run(["benchmarks/pipeline_time.py", str(tmp_path / "a"), str(tmp_path / "b")], tmp_path)
    rows = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert list(rows)[:5] == ["stage", "collect", "vae", "evaluate", "total"]
    assert "| 14.0 | 30.5 |" in rows["total"] and "| 9.5 | 9.5 |" in rows["real return (mean)"]
    assert result[str(tmp_path / "b")]["wall_s"]["vae"] == 25.0
    unfinished = tmp_path / "c"
    unfinished.mkdir()
    (unfinished / "stages.json").write_text(json.dumps({"collect": {"wall_s": 2.0, "rows": 5}, "vae": {"wall_s": 4.0}}))
    stdout, _ = _run(["benchmarks/pipeline_time.py", str(unfinished)], tmp_path)
    assert "| total | 6.0 |" in stdout and "(unfinished)" in stdout
    proc = subprocess.run([sys.executable, "benchmarks/pipeline_time.py", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no summary" in proc.stderr


@pytest.mark.slow
def test_gpu_script_quick(tmp_path, smoke_run):
    """benchmarks/gpu.sh in its dry-run mode on the CPU. The smoke run directory is a finished
    smoke run (with a summary of known figures), so `wm-jax run` returns at once and the test
    stays short."""
    import os
    import shutil

    assert subprocess.run(["bash", "-n", "benchmarks/gpu.sh"], cwd=ROOT).returncode == 0
    run = tmp_path / "results" / "smoke"
    shutil.copytree(smoke_run[0], run)
    summary = {
        "preset": "smoke", "seed": 0, "real_return_mean": 12.5, "real_return_std": 1.0, "real_return_min": 11.0,
        "real_episodes": 4, "solved": False, "real_env_steps": 100, "dream_real_corr": None, "latent_kl": 3.0,
        "wall_s": {"collect": 1.0, "vae": 2.0, "total": 3.0}, "device": "cpu", "versions": {},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    env = {**os.environ, "WM_JAX_GPU_QUICK": "1", "WM_JAX_PYTHON": sys.executable, "WM_JAX_GPU_BUDGET": "300"}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path / "results")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "steps/s" in proc.stdout and "| total | 3.0 |" in proc.stdout and "| 12.5 |" in proc.stdout
    assert json.loads((tmp_path / "results" / "dream_throughput.json").read_text())["results"]
    assert json.loads((tmp_path / "results" / "pipeline_time.json").read_text())


def test_dream_throughput_compare_torch(tmp_path):
    """--compare-torch adds the PyTorch loop's rows and a ratio per size (skipped without the torch extra)."""
    pytest.importorskip("torch")
    stdout, result = _run(["benchmarks/dream_throughput.py", "--sizes", "4x2", "--modes", "fp32", "--horizon", "5",
                           "--repeats", "1", "--compare-torch"], tmp_path)
    assert [r["mode"] for r in result["results"]] == ["fp32", "torch-fp32", "torch-bf16"]
    (ratio,) = result["torch_ratios"]
    assert ratio["ratio"] == ratio["jax_steps_per_s"] / ratio["torch_steps_per_s"] > 0
    assert "PyTorch" in stdout


@pytest.mark.slow
def test_dream_profile_quick(tmp_path):
    stdout, result = _run(["benchmarks/dream_profile.py", "--sizes", "4x2", "--modes", "bf16", "--horizon", "3",
                           "--repeats", "1"], tmp_path)
    assert "LSTM matmul" in stdout and "whole scorer" in stdout
    assert [r["mode"] for r in result["results"]] == ["bf16"]
    for r in result["results"]:
        assert len(r["pieces"]) == 5 and r["flops_per_step"] > 0 and r["dream_steps_per_s"] > 0
        assert r["roofline_share"] == r["dream_steps_per_s"] / r["roofline_steps_per_s"]
    (alt,) = result["alternatives"]
    assert alt["gates_f32_tanh_form_ms"] > 0 and alt["bf16_results_matmul_flop_per_s"] > 0


@pytest.mark.slow
def test_conv_speed_quick(tmp_path):
    stdout, result = _run(["benchmarks/conv_speed.py", "--batch", "2", "--forward-batch", "2", "--filters", "2,2,2,2"],
                          tmp_path)
    assert len(result["layers"]) == 8 and "deconv" in stdout
    assert all(r["layers_train_ms"] > 0 and r["flax_train_ms"] > 0 for r in result["layers"])
