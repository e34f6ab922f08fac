"""experiments/verifier_transfer.py: one world model over several tasks, verifiers trained on a task,
on the others, and on all of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_experiment

from wm_jax.store import data


@pytest.fixture
def script(monkeypatch):
    return load_experiment("verifier_transfer", monkeypatch)


def _rows(episodes: list[int]) -> dict[str, np.ndarray]:
    episode = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(episodes)])
    t = np.concatenate([np.arange(n, dtype=np.int32) for n in episodes])
    return {"episode": episode, "t": t, "action": np.zeros(t.size, np.int32)}


def test_pooled_tasks_keep_their_episodes_apart(script):
    # both tasks number their episodes from 0: pooled, task 1's episode 0 must not continue task 0's
    pooled = script._pool([_rows([3, 2]), _rows([4])])
    index = data.EpisodeIndex.from_columns(pooled["episode"], pooled["t"])
    assert pooled["episode"].tolist() == [0, 0, 0, 1, 1] + [script.EPISODE_STRIDE] * 4
    assert np.flatnonzero(index.is_first).tolist() == [0, 3, 5]
    assert np.flatnonzero(index.is_last).tolist() == [2, 4, 8]
    assert index.stack_rows[5].tolist() == [5, 5, 5, 5]  # task 1's first stack repeats its own first frame
    picked = script._select({"x": np.arange(9)}, [(5, 9), (0, 3)])
    assert picked["x"].tolist() == [5, 6, 7, 8, 0, 1, 2]


@pytest.mark.parametrize("extra, words", [
    (["--tasks", "CartPole-v1", "Pendulum-v1"], "Pendulum-v1 has continuous actions"),
    (["--tasks", "Acrobot-v1", "MountainCar-v0"], "--controller-task CartPole-v1 must be one of --tasks"),
    (["--tasks", "CartPole-v1", "Nope-v0"], "unknown environment"),
])
def test_bad_arguments_are_one_line(script, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        script.main(extra + ["--doc", "/nonexistent"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and words in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.slow
def test_a_smoke_experiment_writes_every_verifiers_aucs_and_resumes(script, tmp_path, capsys):
    args = ["--preset", "smoke", "--tasks", "CartPole-v1", "Breakout-MinAtar", "--rows", "120", "--batches", "2", "--k-steps", "20",
            "--cma-seeds", "0", "--eval-episodes", "2", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "vt.json"), "--doc", str(tmp_path / "none.md"), "--no-progress"]
    script.main(args)
    first = json.loads((tmp_path / "vt.json").read_text())
    (seed,) = first["seeds"]
    assert seed["rows"] == {"CartPole-v1": 120, "Breakout-MinAtar": 120}
    for task in ("CartPole-v1", "Breakout-MinAtar"):
        aucs = seed["auc"][task]
        assert set(aucs) == {"own", "left_out", "pooled"}
        for k in aucs.values():
            for kind in ("one_step", "drift_1", "noise"):  # 120 rows of short episodes: no 20-step drift
                assert 0.0 <= k[f"auc/{kind}"] <= 1.0
        assert aucs["own"] != aucs["left_out"]  # two verifiers, trained on different rows
    assert [c["verifier"] for c in seed["controllers"]] == ["off", "own", "left_out"]
    assert all(c["episodes"] == 2 and np.isfinite(c["return_mean"]) for c in seed["controllers"])
    table = (tmp_path / "vt.md").read_text()
    assert "| Breakout-MinAtar | the other tasks |" in table and "| left_out |" in table
    capsys.readouterr()
    script.main(args)  # every stage is stored: the rerun reads them back, the same figures
    again = json.loads((tmp_path / "vt.json").read_text())["seeds"][0]
    assert again["auc"] == seed["auc"] and again["controllers"] == seed["controllers"]
    script.main(args + ["--report-only"])
    assert (tmp_path / "vt.md").read_text() == table
