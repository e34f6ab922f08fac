"""Faults a run directory meets in the wild, each reproduced on a copy of a finished smoke run
(conftest.smoke_run): what the user sees (one line on stderr, the documented exit code, no
traceback) and that no result is ever reported from artifacts that do not belong together.
docs/RELIABILITY.md lists every case with the test that covers it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax import Agent, cli, commands, interrupt, pipeline, run_dir
from wm_jax.models import train, transition, vae
from wm_jax.search import driver, rollout
from wm_jax.store import checkpoint
from wm_jax.presets import get_preset
from wm_jax.run_dir import RunDirError

SMOKE = get_preset("smoke")
HEAVY = ((vae, "train"), (transition, "train"), (driver, "evolve"), (rollout, "evaluate"))


@pytest.fixture
def run(smoke_run, tmp_path) -> Path:
    """A private copy of the finished smoke run, to damage."""
    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    return out


@pytest.fixture
def unfinished(run) -> Path:
    """The copy as a run killed during its last stage: every stage but evaluate recorded."""
    stages = json.loads((run / "stages.json").read_text())
    del stages["evaluate"]
    (run / "stages.json").write_text(json.dumps(stages))
    (run / "summary.json").unlink()
    return run


def _no_heavy_work(monkeypatch, allow=()):
    for mod, name in HEAVY:
        if f"{mod.__name__}.{name}" not in allow:
            def refuse(*a, _n=f"{mod.__name__}.{name}", **k):
                raise AssertionError(f"{_n} was called")
            monkeypatch.setattr(mod, name, refuse)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _run_cli(capsys, out: Path, *extra: str) -> tuple[int, str]:
    return _cli(capsys, "run", "--preset", "smoke", "--out", str(out), *extra)


def _one_line(code: int, err: str, expected: int, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == expected, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _results(summary: dict) -> dict:
    """A summary without its timings (a redone stage has a wall time of its own)."""
    return {k: v for k, v in summary.items() if k != "wall_s"}


def _wm_jax() -> list[str]:
    script = Path(sys.executable).parent / "wm-jax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "wm_jax.cli"]


def _largest_data_file(step_dir: Path) -> Path:
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def _vae_step(run: Path) -> int:
    return json.loads((run / "stages.json").read_text())["vae"]["outputs"]["vae"]["step"]


# ------------------------------------------------------------------------------------------------
# B1, B3: a finished stage's checkpoint damaged or changed


@pytest.mark.slow
def test_b1_damaged_checkpoint_data_is_damage_not_a_shape_mismatch(unfinished):
    """A data file of V's final checkpoint deleted: the real command says 'damaged' on one line
    (TensorStore's 1,500-line spec and orbax's 'Event loop is closed' noise silenced), exit 2."""
    _largest_data_file(unfinished / "vae" / "checkpoints" / str(_vae_step(unfinished))).unlink()
    proc = subprocess.run([*_wm_jax(), "run", "--preset", "smoke", "--out", str(unfinished)],
                          capture_output=True, text=True, timeout=300, check=False)
    line = _one_line(proc.returncode, proc.stderr, 2, "damaged", "finished stage 'vae'", f"delete {unfinished / 'vae'}")
    assert "shape" not in line and "Event loop" not in proc.stderr
    assert not (unfinished / "summary.json").exists()


@pytest.mark.slow
def test_b3_finished_stage_never_falls_back_to_an_older_checkpoint(unfinished, smoke_run, monkeypatch, capsys):
    """V's newest step damaged after the stage finished (an older step is still there): the run and
    Agent.load refuse instead of pairing an older V with the M and C built on the newer one; after
    the advised `delete vae/`, V is trained again and the run ends where the original did."""
    step = _vae_step(unfinished)
    assert len(list((unfinished / "vae" / "checkpoints").iterdir())) == 2  # a fall-back target exists
    _largest_data_file(unfinished / "vae" / "checkpoints" / str(step)).unlink()
    with pytest.raises(RunDirError, match="damaged"):
        Agent.load(unfinished)
    _one_line(*_run_cli(capsys, unfinished), 2, "damaged", "vae")
    assert not (unfinished / "summary.json").exists()

    shutil.rmtree(unfinished / "vae")
    _no_heavy_work(monkeypatch, allow={"wm_jax.models.vae.train", "wm_jax.search.rollout.evaluate"})  # V again, and the evaluation
    summary = pipeline.run(SMOKE, unfinished, progress=False)
    ref_dir, ref = smoke_run
    np.testing.assert_array_equal(np.load(unfinished / "controller.npy"), np.load(ref_dir / "controller.npy"))
    for k in ("real_return_mean", "real_env_steps", "latent_kl"):
        assert summary[k] == ref[k], k


def test_b3_checkpoint_swapped_for_other_parameters_is_refused(run, capsys):
    """Readable but not what the stage produced (step 20's files replaced by step 10's): the
    parameter hash the stage recorded catches it."""
    ckpts = run / "vae" / "checkpoints"
    step = _vae_step(run)
    older = min(int(p.name) for p in ckpts.iterdir())
    shutil.rmtree(ckpts / str(step))
    shutil.copytree(ckpts / str(older), ckpts / str(step))
    with pytest.raises(RunDirError, match="other parameters than the finished stage recorded"):
        Agent.load(run)


# ------------------------------------------------------------------------------------------------
# B4: config.json lost


def test_b4_lost_config_json_is_refused_not_restarted(unfinished, capsys):
    (unfinished / "config.json").unlink()
    stages = (unfinished / "stages.json").read_bytes()
    _one_line(*_run_cli(capsys, unfinished, "--seed", "1"), 2, "no config.json", str(unfinished))
    assert not (unfinished / "summary.json").exists() and not (unfinished / "config.json").exists()
    assert (unfinished / "stages.json").read_bytes() == stages


# ------------------------------------------------------------------------------------------------
# B2: damaged files and bad values, one line each


@pytest.mark.parametrize("name", ["stages.json", "config.json"])
def test_b2_corrupt_run_json_is_one_line(unfinished, capsys, name):
    (unfinished / name).write_text('{"collect": {"rows": 9')
    _one_line(*_run_cli(capsys, unfinished), 2, str(unfinished / name), "damaged", "JSONDecodeError")
    assert not (unfinished / "summary.json").exists()


def test_b2_corrupt_summary_json_is_rebuilt_from_the_stages(run, smoke_run, monkeypatch):
    (run / "summary.json").write_text("{trunc")
    _no_heavy_work(monkeypatch)
    summary = pipeline.run(SMOKE, run, progress=False)
    assert summary == json.loads((smoke_run[0] / "summary.json").read_text())
    assert json.loads((run / "summary.json").read_text()) == summary


def test_b2_mistyped_config_value_names_the_field(unfinished, capsys):
    cfg = json.loads((unfinished / "config.json").read_text())
    cfg["vae"]["latent"] = "8"
    (unfinished / "config.json").write_text(json.dumps(cfg))
    _one_line(*_run_cli(capsys, unfinished), 2, "VAEConfig.latent must be int", "config.json")


def test_b2_truncated_latents_are_encoded_again(unfinished, smoke_run, monkeypatch, capsys):
    """Derived data: rebuilt from V and the datasets; identical, so nothing built on it reruns."""
    path = unfinished / "latents_round2.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _no_heavy_work(monkeypatch, allow={"wm_jax.search.rollout.evaluate"})
    summary = pipeline.run(SMOKE, unfinished, progress=True)
    assert "latents_round2.npz is missing, damaged or changed; encoding it again" in capsys.readouterr().out
    with np.load(path) as got, np.load(smoke_run[0] / "latents_round2.npz") as ref:
        np.testing.assert_array_equal(got["mean"], ref["mean"])
    assert summary["real_return_mean"] == smoke_run[1]["real_return_mean"]


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_b2_seed_out_of_range_is_refused_before_anything_is_written(tmp_path, capsys, seed):
    """jax.random.key keeps 32 bits: 2**32 would give seed 0's data under another name."""
    out = tmp_path / "run"
    _one_line(*_run_cli(capsys, out, "--seed", seed), 2, "--seed", "2**32")
    assert not out.exists()


def _mount_tmpfs(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join(("size=16m", *options))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]})")


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(name: str, *options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, *options)
        made.append(path)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


def test_b2_read_only_output_location_exits_3(mounts, capsys):
    ro = mounts("ro", "ro")
    _one_line(*_run_cli(capsys, ro / "run"), 3, "Read-only file system", str(ro / "run"))


@pytest.mark.slow
def test_b2_full_disk_exits_3_and_the_rerun_resumes(mounts, unfinished, smoke_run, capsys):
    """The evaluation's files do not fit: one line, exit 3; with space again the same command
    finishes with the uninterrupted run's results."""
    disk = mounts("disk")
    out = disk / "run"
    shutil.copytree(unfinished, out)
    filler = disk / "filler"
    # Unbuffered: a buffered file keeps the bytes a full disk refused and raises again when closed
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    try:
        with open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0")
    except OSError:
        pass
    _one_line(*_run_cli(capsys, out), 3, "No space left on device", "rerun to resume")
    assert not (out / "summary.json").exists()
    filler.unlink()
    assert _run_cli(capsys, out)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    for k in ("real_return_mean", "real_env_steps", "latent_kl"):
        assert summary[k] == smoke_run[1][k], k


@pytest.mark.slow
def test_b2_full_disk_in_an_orbax_save_is_one_line_from_the_real_command(mounts):
    """The disk fills while V's first checkpoint is written: orbax's error and its asyncio noise
    (50 to 970 lines before) become one line after the progress output, exit 3. orbax's partial
    step stays under its temporary name, which no restore reads and the next save removes."""
    disk = mounts("vae-full", "size=4600k")  # the smoke data (4.1 MB) fits, V's checkpoint does not
    out = disk / "run"
    proc = subprocess.run([*_wm_jax(), "run", "--preset", "smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("wm-jax run: error: cannot write") and "No space left on device" in last, last
    assert len(proc.stderr.strip().replace("\r", "\n").splitlines()) < 40  # progress bars and the line
    assert set(json.loads((out / "stages.json").read_text())) == {"collect"}


def test_b2_full_disk_during_a_checkpoint_save_leaves_nothing_restored(mounts):
    """orbax's partial step (its temporary name) is never restored and is cleaned by the next save."""
    disk = mounts("ckpt", "size=64k")
    state = {"w": jax.random.normal(jax.random.key(0), (64, 1024))}  # 256 KiB of noise: does not fit
    mngr = checkpoint.manager(disk / "c")
    try:
        with pytest.raises(Exception) as info:
            checkpoint.save(mngr, 1, state, {"m": 1})
    finally:
        mngr.close()
    assert commands._write_error_in_text(info.value, None) is not None or getattr(info.value, "errno", None) == 28
    assert checkpoint.restore_latest(disk / "c", state, {"m": 1}) is None


# ------------------------------------------------------------------------------------------------
# weak spots


def test_second_process_on_the_same_run_directory_is_refused(unfinished, capsys):
    with run_dir.locked(unfinished):
        _one_line(*_run_cli(capsys, unfinished), 4, "in use by another wm-jax process", f"PID {os.getpid()}")
    assert not (unfinished / "summary.json").exists()


def test_a_collection_too_large_for_memory_is_refused(tmp_path, capsys):
    out = tmp_path / "data"
    _one_line(*_cli(capsys, "collect", "--episodes", "100000000000", "--out", str(out)), 2, "GiB", "fewer episodes")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["delete-agent-json", "delete-controller", "truncate-controller", "delete-round"])
def test_rerun_of_a_finished_run_repairs_the_agent_files(run, smoke_run, monkeypatch, damage):
    ref = smoke_run[0]
    if damage == "delete-agent-json":
        (run / "agent.json").unlink()
    elif damage == "delete-controller":
        (run / "controller.npy").unlink()
    elif damage == "truncate-controller":
        (run / "controller.npy").write_bytes((ref / "controller.npy").read_bytes()[:60])
        with pytest.raises(RunDirError, match="controller.npy is damaged"):
            Agent.load(run)
    else:
        (run / "evolve_round1" / "controller.npy").unlink()
    _no_heavy_work(monkeypatch)
    pipeline.run(SMOKE, run, progress=False)
    for name in ("agent.json", "controller.npy", "evolve_round1/controller.npy", "evolve_round2/controller.npy"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    Agent.load(run)


def test_finished_run_with_a_stage_folder_deleted_redoes_it(run, smoke_run, monkeypatch, capsys):
    """The advice of a damaged finished stage ('delete .../transition_round2 to redo that stage')
    works on a finished run too: the rerun notices the missing output, redoes the stage and
    rebuilds the summary (same parameters, so nothing after it reruns)."""
    shutil.rmtree(run / "transition_round2")
    _no_heavy_work(monkeypatch, allow={"wm_jax.models.transition.train"})
    summary = pipeline.run(SMOKE, run, progress=True)
    assert "transition_round2: its output transition_round2 is gone" in capsys.readouterr().out
    assert _results(summary) == _results(smoke_run[1])
    assert summary["wall_s"].keys() == smoke_run[1]["wall_s"].keys()
    Agent.load(run)


def test_finished_run_with_damaged_latents_rebuilds_them(run, smoke_run, monkeypatch):
    path = run / "latents_round2.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunDirError, match="latents_round2.npz is damaged"):
        run_dir.load(run)
    _no_heavy_work(monkeypatch)
    assert _results(pipeline.run(SMOKE, run, progress=False)) == _results(smoke_run[1])
    run_dir.load(run)
    with np.load(path) as got, np.load(smoke_run[0] / "latents_round2.npz") as ref:
        np.testing.assert_array_equal(got["logvar"], ref["logvar"])


def test_a_diverged_controller_search_is_a_training_error(unfinished, monkeypatch):
    """A non-finite controller cannot be recorded (JSON has no NaN) nor trusted: the stage fails."""
    shutil.rmtree(unfinished / "evolve_round2")
    n = 2 * (SMOKE.vae.latent + SMOKE.transition.hidden) + 2
    monkeypatch.setattr(driver, "evolve", lambda *a, **k: {"best": np.full(n, np.nan, np.float32), "best_real": 9.0,
                                                           "checks": [], "real_env_steps": 0, "history": [{}]})
    with pytest.raises(train.TrainingError, match="diverged"):
        pipeline.run(SMOKE, unfinished, progress=False)
    assert "evolve_round2" not in json.loads((unfinished / "stages.json").read_text())


def test_leftovers_of_a_killed_dataset_save_are_ignored(run):
    (run / "data" / ".round2.tmp-1a2b3c4d").mkdir()
    (run / "data" / ".round1.old-1a2b3c4d").mkdir()
    assert [p.name for p in run_dir.data_paths(run)] == ["round1", "round2"]
    run_dir.load(run)


def test_collect_to_a_full_disk_exits_3(mounts, capsys):
    disk = mounts("tiny", "size=256k")
    out = disk / "data"
    code, err = _cli(capsys, "collect", "--episodes", "40", "--out", str(out))
    assert code == 3 and "Traceback" not in err, err  # above the line: collect's progress bar
    assert "No space left on device" in err.strip().splitlines()[-1]
    assert not out.exists() and not any(disk.iterdir())  # the temporary directory is removed too


def test_debug_shows_the_traceback(unfinished, capsys):
    (unfinished / "stages.json").write_text("{")
    with pytest.raises(RunDirError):
        cli.main(["--debug", "run", "--preset", "smoke", "--out", str(unfinished)])


# ------------------------------------------------------------------------------------------------
# SIGINT: honoured at the next chunk boundary


def _quad(run_dir_: Path, on_chunk=None):
    cfg = train.TrainConfig(steps=30, batch=1, chunk=5, checkpoint_every=5)

    def loss_fn(params, key, batch, step):
        loss = jnp.sum(jnp.square(params["w"] - batch))
        return loss, {"loss": loss}

    def sample_fn(key, d):
        return d + 0.1 * jax.random.normal(key, d.shape)

    return train.fit("quad", cfg, loss_fn, sample_fn, jnp.array([1.0, -2.0, 0.5]), {"w": jnp.zeros(3)},
                     jax.random.key(0), run_dir_, {"model": "quad"}, progress=False)


def test_sigint_stops_training_at_the_next_chunk_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    clean, _ = _quad(tmp_path / "clean")
    real_chunk = train.run_chunk
    calls = []

    def chunk_then_sigint(*args):
        calls.append(1)
        out = real_chunk(*args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-way: deferred to the boundary
        return out

    monkeypatch.setattr(train, "run_chunk", chunk_then_sigint)
    # as from a terminal: a suite started in the background inherits an ignored SIGINT, which
    # deferred() leaves alone
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), interrupt.deferred():
            _quad(tmp_path / "run")
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(calls) == 2  # the chunk in flight finished and was checkpointed; no third began
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [5, 10]
    monkeypatch.setattr(train, "run_chunk", real_chunk)
    params, info = _quad(tmp_path / "run")
    assert info["resumed_from"] == 10
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(clean["w"]))


def test_deferred_restores_the_handler_and_leaves_an_ignored_sigint_alone():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal
    try:
        with interrupt.deferred():
            taken = signal.getsignal(signal.SIGINT)
            assert taken is not signal.default_int_handler and signal.getsignal(signal.SIGTERM) is taken
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)
    interrupt.check()  # nothing pending: no effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background ignores Ctrl-C
    try:
        with interrupt.deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def _signal_while_v_trains(out: Path, signum: int) -> tuple[int, str]:
    """`wm-jax run --preset smoke` sent `signum` once its VAE stage began: (exit code, stderr)."""
    # As from a terminal: a suite started in the background passes SIGINT on as ignored, so a small
    # launcher resets it before exec (not preexec_fn: forking a multithreaded JAX process runs
    # Python code in the child).
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", reset, *_wm_jax(), "run", "--preset", "smoke", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # progress lines: wait for the VAE stage
            if line.startswith("[wm-jax] vae ..."):
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in err
    assert set(json.loads((out / "stages.json").read_text())) == {"collect"}  # V's stage not recorded
    return proc.returncode, err.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigint_to_the_real_command_exits_130(tmp_path):
    """Ctrl-C while V trains: exit 130 at the next chunk, the last line says how to resume, and
    the stage is not recorded as finished."""
    code, last = _signal_while_v_trains(tmp_path / "run", signal.SIGINT)
    assert code == 130 and last.endswith("interrupted; rerun the same command to resume"), (code, last)


# ------------------------------------------------------------------------------------------------
# The second audit: each numbered case of its report (docs/RELIABILITY.md, "second audit")


def _flip_bytes(path: Path, at: int, count: int = 8) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(at, at + count):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_case1_deleted_stages_json_is_refused_not_trusted(run, monkeypatch, capsys):
    """Without stages.json nothing could check the checkpoints: a run directory that holds finished
    stages but no stages.json is refused by the run, evaluate and the library, and nothing is
    rewritten (stages.json is not recreated from unverified files)."""
    _no_heavy_work(monkeypatch)
    _flip_bytes(_largest_data_file(run / "vae" / "checkpoints" / str(_vae_step(run))), 4096)
    (run / "stages.json").unlink()
    _one_line(*_run_cli(capsys, run), 2, "stages.json is missing", "new --out")
    assert not (run / "stages.json").exists()
    _one_line(*_cli(capsys, "evaluate", str(run)), 2, "stages.json is missing")
    with pytest.raises(RunDirError, match="stages.json is missing"):
        Agent.load(run)


def test_case1_a_run_killed_between_its_first_two_writes_starts(tmp_path):
    """config.json written, stages.json not yet (a kill between the two): nothing was built, so the
    directory's records are empty, not missing."""
    (tmp_path / "config.json").write_text(SMOKE.to_json())
    assert run_dir.read_stages(tmp_path) == {}
    (tmp_path / "vae").mkdir()
    with pytest.raises(RunDirError, match="stages.json is missing"):
        run_dir.read_stages(tmp_path)


@pytest.mark.parametrize("max_steps", ["1000000000", "100000000000"])
def test_case2_collect_max_steps_beyond_memory_is_refused(tmp_path, capsys, max_steps):
    """One episode of 10**9 steps: the scan's buffers, not the kept rows, exhaust memory."""
    out = tmp_path / "data"
    _one_line(*_cli(capsys, "collect", "--episodes", "1", "--max-steps", max_steps, "--out", str(out)), 2,
              "GiB", "--max-steps")
    assert not out.exists()


def test_a_run_directory_of_an_older_format_is_refused_in_one_line(run, capsys):
    """config.json without a format version (format 1, before this layout): refused by run,
    evaluate and the library, naming the version and what to do; nothing is rewritten."""
    saved = json.loads((run / "config.json").read_text())
    del saved["format_version"]
    (run / "config.json").write_text(json.dumps(saved))
    before = (run / "stages.json").read_text()
    _one_line(*_run_cli(capsys, run), 2, "format version 1", "reads version 2", "new --out")
    _one_line(*_cli(capsys, "evaluate", str(run)), 2, "format version 1")
    with pytest.raises(RunDirError, match="format version 1"):
        Agent.load(run)
    assert (run / "stages.json").read_text() == before


def test_case5_overlong_out_name_is_one_line(tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    _one_line(*_run_cli(capsys, out), 2, "File name too long", "shorter")


def test_case5_lock_that_is_a_directory_is_one_line(unfinished, capsys):
    (unfinished / ".lock").unlink(missing_ok=True)
    (unfinished / ".lock").mkdir()
    _one_line(*_run_cli(capsys, unfinished), 2, ".lock", "is a directory", "remove it")


def _edit_agent_json(run: Path, edit) -> None:
    meta = json.loads((run / "agent.json").read_text())
    edit(meta)
    (run / "agent.json").write_text(json.dumps(meta))


def test_case5_agent_json_naming_another_controller_kind_is_refused(run, capsys):
    _edit_agent_json(run, lambda m: m["config"]["controller"].update(kind="mlp"))
    _one_line(*_cli(capsys, "evaluate", str(run)), 2, "agent.json", "rerun")
    _one_line(*_cli(capsys, "serve", str(run)), 2, "agent.json", "rerun")


@pytest.mark.slow
def test_case5_sigterm_to_the_real_command_exits_143(tmp_path):
    """SIGTERM is Ctrl-C's twin: at the next chunk, one line, exit 143, the stage not recorded."""
    code, last = _signal_while_v_trains(tmp_path / "run", signal.SIGTERM)
    assert code == 143 and last.endswith("terminated (SIGTERM); rerun the same command to resume"), (code, last)


@pytest.mark.parametrize("edit", ["compute_dtype", "seed", "round"])
def test_case6_edited_agent_json_is_refused(run, capsys, edit):
    edits = {
        "compute_dtype": lambda m: m["config"]["vae"].update(compute_dtype="bfloat16"),
        "seed": lambda m: m["config"].update(seed=7),
        "round": lambda m: m.update(round=2),
    }
    _edit_agent_json(run, edits[edit])
    _one_line(*_cli(capsys, "evaluate", str(run), "--episodes", "1"), 2, "agent.json", "SHA-256", "rerun")


@pytest.mark.parametrize("edit", ["card", "compute_dtype", "seed", "nan"])
def test_case6_edited_export_config_is_refused(run, tmp_path, capsys, edit):
    export = tmp_path / "export"
    Agent.load(run).save_pretrained(export)
    meta = json.loads((export / "config.json").read_text())
    {"card": lambda: meta["card"].update(real_return_mean=500.0),
     "compute_dtype": lambda: meta["config"]["vae"].update(compute_dtype="bfloat16"),
     "seed": lambda: meta["config"].update(seed=7),
     "nan": lambda: meta["card"].update(real_return_mean=float("nan"))}[edit]()  # JSON's NaN: refused, not a traceback
    (export / "config.json").write_text(json.dumps(meta))
    _one_line(*_cli(capsys, "evaluate", str(export), "--episodes", "1"), 2, "config.json", "SHA-256",
              "export the agent again")


def test_case7_damaged_dataset_in_an_unfinished_run_names_the_remedy(unfinished, monkeypatch, capsys):
    _no_heavy_work(monkeypatch)
    (unfinished / "latents_round1.npz").unlink()  # the run reads its data again to encode it
    arrow = max((unfinished / "data" / "round1").glob("*.arrow"), key=lambda p: p.stat().st_size)
    _flip_bytes(arrow, arrow.stat().st_size // 2)
    _one_line(*_run_cli(capsys, unfinished), 2, "does not match its checksum",
              f"delete {unfinished / 'data' / 'round1'}", "rerun")


def test_case7_changed_config_names_the_field(unfinished, capsys):
    _one_line(*_run_cli(capsys, unfinished, "--seed", "3"), 2, "seed: 0 in config.json, 3 now")
    _one_line(*_run_cli(capsys, unfinished, "--precision", "bf16"), 2,
              "transition.compute_dtype", "vae.compute_dtype")


def test_case7_out_that_is_a_file_says_so(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a run")
    _one_line(*_run_cli(capsys, out), 2, f"{out} is a file, not a run directory", "choose another --out")


def test_case7_export_whose_weights_do_not_fit_its_config_names_the_cause(run, tmp_path, capsys):
    """config.json's hash matches (it was rewritten consistently) but its latent size is not the
    weights': the message says they do not fit each other, not that the version is old."""
    export = tmp_path / "export"
    Agent.load(run).save_pretrained(export)
    meta = json.loads((export / "config.json").read_text())
    meta["config"]["vae"]["latent"] += 1
    from wm_jax import pretrained
    meta["config_sha256"] = pretrained.config_digest(meta)
    (export / "config.json").write_text(json.dumps(meta))
    line = _one_line(*_cli(capsys, "evaluate", str(export), "--episodes", "1"), 2, "vae.latent", "does not fit")
    assert "with this version" not in line
