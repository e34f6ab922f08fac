"""Tests for wm_jax.seeds (`wm-jax run --seeds`): a batch of seeds of the whole recipe in one run
directory, each seed equal to its lone run, resumable after a kill, damage refused in one line.

The batch runs the smoke preset on seeds 0 and 1 once per module (about a minute on 2 CPU cores);
seed 0's lone run is conftest's smoke_run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redis_fixture import free_port

from wm_jax import cli, interrupt, pipeline, report, seeds
from wm_jax.config import ConfigError
from wm_jax.models import transition, vae
from wm_jax.presets import get_preset
from wm_jax.search import driver, rollout
from wm_jax.store import collection

SMOKE = get_preset("smoke")
FIGURES = ("real_return_mean", "real_return_std", "real_return_min", "real_env_steps", "real_env_steps_training",
           "agent_round", "imagined_steps", "solved")


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seeds") / "smoke"
    return out, seeds.run(SMOKE, [0, 1], out, progress=False)


def _seed_summary(out: Path, seed: int) -> dict:
    return json.loads((out / "seeds" / str(seed) / "summary.json").read_text())


def _curve(summary: dict) -> list[tuple]:
    return [(p["source"], p["real_env_steps"], p.get("real_return")) for p in summary["learning_curve"]]


@pytest.mark.slow
def test_a_batched_seed_is_its_lone_run(batch, smoke_run):
    """Seed 0 of the batch against `wm-jax run --seed 0`: the same real returns, steps, rounds and
    learning curve; its latent KL to float rounding. Seed 1 is a run of its own."""
    out, summary = batch
    lone, mine, other = smoke_run[1], _seed_summary(out, 0), _seed_summary(out, 1)
    for k in FIGURES:
        assert mine[k] == lone[k], k
    assert _curve(mine) == _curve(lone)
    assert mine["latent_kl"] == pytest.approx(lone["latent_kl"], rel=1e-5)
    assert _curve(other) != _curve(mine)
    assert summary["seeds"] == [0, 1] and [r["seed"] for r in summary["per_seed"]] == [0, 1]
    assert summary["aggregate"]["return"]["n"] == 2  # rliable's intervals over the seeds
    # `wm-jax report OUT` reads the batch's seeds
    assert [r["seed"] for r in report.report([out], reps=100)["rows"]] == [0, 1]
    assert np.asarray(np.load(out / "seeds" / "0" / "controller.npy")).ndim == 1


@pytest.mark.slow
def test_a_finished_batch_reruns_without_work(batch, monkeypatch):
    out, summary = batch

    def no(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, name in ((vae, "train"), (transition, "train"), (driver, "search"), (collection, "collect"),
                         (rollout, "evaluate")):
        monkeypatch.setattr(module, name, no)
    again = seeds.run(SMOKE, [0, 1], out, progress=False)
    assert [r["return_mean"] for r in again["per_seed"]] == [r["return_mean"] for r in summary["per_seed"]]


@pytest.mark.slow
def test_a_batch_killed_in_a_search_resumes_to_the_uninterrupted_result(batch, tmp_path, monkeypatch):
    out, summary = batch
    real_period, calls = driver._period_cells, []

    def period_then_sigint(*args, **kwargs):
        calls.append(1)
        res = real_period(*args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # deferred to the period's boundary
        return res

    monkeypatch.setattr(driver, "_period_cells", period_then_sigint)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), interrupt.deferred():
            seeds.run(SMOKE, [0, 1], tmp_path / "killed", progress=False)
    finally:
        signal.signal(signal.SIGINT, before)
    assert "evolve_round1" not in json.loads((tmp_path / "killed" / "stages.json").read_text())
    monkeypatch.setattr(driver, "_period_cells", real_period)
    resumed = seeds.run(SMOKE, [0, 1], tmp_path / "killed", progress=False)
    for s in (0, 1):
        a, b = _seed_summary(tmp_path / "killed", s), _seed_summary(out, s)
        assert {k: a[k] for k in FIGURES} == {k: b[k] for k in FIGURES} and _curve(a) == _curve(b)
    assert resumed["aggregate"]["return"] == summary["aggregate"]["return"]


@pytest.mark.slow
def test_a_batch_over_two_processes_equals_one_process(batch, tmp_path):
    """`wm-jax run --seeds 0:2` as two jax.distributed processes on this machine (the coordinator on
    127.0.0.1, gloo's collectives): the seed axis of V's, M's and K's training and of the searches is
    split over the two processes' devices, the rest runs in each. Every seed's figures equal the
    one-process batch's; process 0 writes OUT with the checkpoints, process 1 its working copy
    OUT.process1 (no checkpoints: it receives process 0's) with the same summaries."""
    out, port = tmp_path / "smoke", free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "wm_jax.cli", "run", "--preset", "smoke", "--seeds", "0:2",
                               "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--processes", "2",
                               "--process-id", str(i)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        ended = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, ended):
        assert p.returncode == 0, err[-3000:]
    one = batch[0]
    for seed in (0, 1):
        mine, theirs, copy = (_seed_summary(d, seed) for d in (out, one, tmp_path / "smoke.process1"))
        for k in FIGURES:
            assert mine[k] == theirs[k] == copy[k], (seed, k)
        assert _curve(mine) == _curve(theirs) == _curve(copy)
        assert mine["latent_kl"] == pytest.approx(theirs["latent_kl"], rel=1e-4)
    assert any((out / "vae" / "checkpoints").iterdir())
    assert not (tmp_path / "smoke.process1" / "vae" / "checkpoints").exists()


def _flip_bytes(path: Path, at: int, count: int = 8) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(at, at + count):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _run_cli(capsys, out: Path, *extra: str) -> tuple[int, str]:
    try:
        code = cli.main(["run", "--preset", "smoke", "--out", str(out), *extra])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
def test_a_damaged_seeds_dataset_is_refused_in_one_line(batch, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(batch[0], copy)
    folder = copy / "data" / "round2" / "seed1"
    arrow = max(folder.glob("*.arrow"), key=lambda p: p.stat().st_size)
    _flip_bytes(arrow, arrow.stat().st_size // 2)
    _one_line(*_run_cli(capsys, copy, "--seeds", "0:2"), "does not match its checksum", f"delete {folder}")


@pytest.mark.slow
def test_other_seeds_in_a_batchs_directory_are_refused(batch, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(batch[0], copy)
    _one_line(*_run_cli(capsys, copy, "--seeds", "0:3"), "holds a batch of seeds [0, 1], not [0, 1, 2]")


@pytest.mark.slow
def test_a_lone_runs_directory_and_a_batchs_are_not_mixed(batch, smoke_run, tmp_path, capsys):
    lone = tmp_path / "lone"
    shutil.copytree(smoke_run[0], lone)
    _one_line(*_run_cli(capsys, lone, "--seeds", "0:2"), "holds a run of one seed", "use a new --out")
    copy = tmp_path / "batch"
    shutil.copytree(batch[0], copy)
    _one_line(*_run_cli(capsys, copy), "holds a batch of seeds", "rerun it with its own --seeds")


# A recipe where the seeds part ways: three rounds within a budget of real steps (each round's
# collection capped by what its seed has left), M fine-tuned one step per 2 new rows (for as many
# steps as its seed's own collection gave). K over seeds is tests/test_seeds_train.py's (here it
# would cost minutes).
MIXED = dataclasses.replace(
    SMOKE, rounds=dataclasses.replace(SMOKE.rounds, rounds=3, min_rounds=1, transition_rows_per_step=2, budget=1_200))


@pytest.mark.slow
def test_seeds_on_their_own_rounds_budgets_and_steps_equal_their_lone_runs(tmp_path):
    """Seeds 3 and 0 (positions and numbers apart) under MIXED: each batched seed's figures and
    learning curve equal its lone `pipeline.run`'s; their M's fine-tuning steps differ (each its
    own rows)."""
    summary = seeds.run(MIXED, [3, 0], tmp_path / "batch", progress=False)
    assert [r["seed"] for r in summary["per_seed"]] == [3, 0]
    for s in (3, 0):
        lone = pipeline.run(dataclasses.replace(MIXED, seed=s), tmp_path / f"lone{s}", progress=False)
        mine = _seed_summary(tmp_path / "batch", s)
        assert {k: mine[k] for k in FIGURES} == {k: lone[k] for k in FIGURES}, s
        assert _curve(mine) == _curve(lone), s
    done = json.loads((tmp_path / "batch" / "stages.json").read_text())
    limits = done["transition_round2"]["inputs"]["limits"]
    assert limits[0] != limits[1] and min(limits) > 0
    for r in (2, 3):
        rec = done.get(f"collect_round{r}")
        if rec is not None:  # a seed whose rounds ended collects nothing and trains no M
            for got, steps in zip(rec["seeds"], done[f"transition_round{r}"]["inputs"]["limits"]):
                assert (got is None) == (steps == 0)


@pytest.mark.parametrize("given, needle", [([], "names no seed"), ([3, 4, 3], "seed 3 twice")])
def test_bad_seed_lists_are_one_named_error(tmp_path, given, needle):
    with pytest.raises(ConfigError, match=needle):
        seeds.run(SMOKE, given, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_ppo_batch_runs_every_seed(tmp_path, capsys):
    """`wm-jax run --seeds 0:2 --trainer ppo`: PPO's searches as one program over the seeds (each
    seed in its own world; equal to the lone searches: test_seeds_search), every stage through."""
    assert _run_cli(capsys, tmp_path / "ppo", "--seeds", "0:2", "--trainer", "ppo")[0] == 0
    for seed in (0, 1):
        summary = _seed_summary(tmp_path / "ppo", seed)
        assert summary["trainer"] == "ppo" and summary["seed"] == seed and summary["real_episodes"] == 4
        assert np.isfinite(summary["real_return_mean"]) and summary["real_env_steps_training"] > 0
    assert _seed_summary(tmp_path / "ppo", 0)["learning_curve"] != _seed_summary(tmp_path / "ppo", 1)["learning_curve"]


@pytest.mark.parametrize("args, needle", [(["--seeds", "3:3"], "no seeds in '3:3'"),
                                          (["--seeds", "a:b"], "expected START:STOP"),
                                          (["--seed", "1", "--seeds", "0:2"], "not allowed with argument"),
                                          (["--seeds", "0:2", "--coordinator", "127.0.0.1:1"], "go together"),
                                          (["--seeds", "0:2", "--coordinator", "127.0.0.1:1", "--processes", "2",
                                            "--process-id", "2"], "must be below --processes=2")])
def test_bad_seeds_arguments_are_one_line(tmp_path, capsys, args, needle):
    _one_line(*_run_cli(capsys, tmp_path / "x", *args), needle)


def test_pad_stack_pads_each_array_with_its_last_row():
    out = seeds.pad_stack([np.arange(3), np.arange(5)])
    np.testing.assert_array_equal(out, [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
