"""Tests for the `wm-jax` command line: one-line errors with exit code 2, and `collect`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from wm_jax import cli, commands
from wm_jax.store import data


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run cli.main in-process; argparse errors exit via SystemExit, handled errors return a code."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("wm-jax"), lines[0]
    assert "error" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["collect", "--episodes", "0"], ["--episodes", "> 0", "0"]),
        (["collect", "--episodes", "-3"], ["--episodes", "-3"]),
        (["collect", "--episodes", "abc"], ["--episodes", "abc"]),
        (["collect", "--episodes", "2", "--max-steps", "0"], ["--max-steps"]),
    ],
    ids=["zero", "negative", "not-an-int", "max-steps-zero"],
)
def test_collect_bad_episodes(tmp_path, capsys, args, needles):
    out = tmp_path / "x"
    code, stdout, err = _main([*args, "--out", str(out)], capsys)
    _assert_one_line_error(code, err, *needles)
    assert stdout == ""
    assert not out.exists()


def test_collect_existing_non_empty_out(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, stdout, err = _main(["collect", "--episodes", "1", "--out", str(out)], capsys)
    _assert_one_line_error(code, err, str(out), "--overwrite")
    assert stdout == ""
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_collect_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("x")
    code, _, err = _main(["collect", "--episodes", "1", "--out", str(out)], capsys)
    _assert_one_line_error(code, err, str(out))
    assert out.read_text() == "x"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "--preset", "nope", "--out", "X"], ["--preset", "nope"]),
        (["train-vae", "somedata", "--preset", "huge", "--out", "X"], ["--preset", "huge"]),
        (["collect", "--episodes", "2"], ["--out"]),
        (["run", "--preset", "smoke", "--out", "X", "--rounds", "0"], ["--rounds"]),
        (["run", "--preset", "smoke", "--out", "X", "--precision", "fp16"], ["--precision", "fp16"]),
        (["run", "--preset", "smoke", "--out", "X", "--verifier", "maybe"], ["--verifier", "maybe"]),
        (["run", "--preset", "smoke", "--out", "X", "--grounding", "1.5"], ["--grounding", "1.5"]),
        (["run", "--preset", "smoke", "--out", "X", "--grounding", "0.2"], ["grounding", "rounds to 0"]),
        (["frobnicate"], ["frobnicate"]),
        ([], ["command"]),
    ],
    ids=["unknown-preset", "unknown-preset-train-vae", "collect-missing-out", "rounds-zero", "unknown-precision",
         "unknown-verifier", "grounding-above-one", "grounding-grounds-nothing", "unknown-command", "no-command"],
)
def test_bad_arguments(tmp_path, capsys, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)  # nothing must be created even for a relative --out
    code, stdout, err = _main(args, capsys)
    _assert_one_line_error(code, err, *needles)
    assert stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["run"], ["train-vae", "d", "--out", "o"], ["train-transition", "d", "--vae", "v", "--out", "o"]])
def test_precision_flag_sets_v_and_m(command):
    parser = cli.build_parser()
    default = commands.preset(parser.parse_args(command))
    bf16 = commands.preset(parser.parse_args([*command, "--precision", "bf16"]))
    fp32 = commands.preset(parser.parse_args([*command, "--precision", "fp32"]))
    # the cpu preset's own: V float32, M bfloat16
    assert (default.vae.compute_dtype, default.transition.compute_dtype) == ("float32", "bfloat16")
    assert bf16.vae.compute_dtype == bf16.transition.compute_dtype == "bfloat16"
    assert fp32.vae.compute_dtype == fp32.transition.compute_dtype == "float32"
    assert bf16.evolve == default.evolve == fp32.evolve and bf16.vae.train == default.vae.train


def test_run_verifier_flag_sets_the_mode_and_the_default_out(monkeypatch, tmp_path):
    from wm_jax import pipeline

    seen = {}

    def fake_run(cfg, out):
        seen.update(cfg=cfg, out=out)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(pipeline, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--preset", "smoke", "--seed", "2", "--verifier", "cutoff"]) == 130
    assert seen["cfg"].verifier.mode == "cutoff" and seen["out"] == Path("runs") / "smoke-s2-kcutoff"
    assert cli.main(["run", "--preset", "smoke"]) == 130
    assert seen["cfg"].verifier.mode == "off" and seen["out"] == Path("runs") / "smoke"
    assert seen["cfg"].evolve.grounding == 0.0
    assert cli.main(["run", "--preset", "smoke", "--grounding", "0.5"]) == 130
    assert seen["cfg"].evolve.grounding == 0.5 and seen["out"] == Path("runs") / "smoke-g0.5"
    # the name says what differs from the preset: the frugal preset grounds half its dreams itself
    assert cli.main(["run", "--preset", "frugal"]) == 130
    assert seen["cfg"].evolve.grounding == 0.5 and seen["out"] == Path("runs") / "frugal"
    assert cli.main(["run", "--preset", "frugal", "--grounding", "0"]) == 130
    assert seen["cfg"].evolve.grounding == 0.0 and seen["out"] == Path("runs") / "frugal-g0"
    # the main job: `run` alone is the frugal preset (scripts/run.sh passes it too); the stage
    # commands default to cpu, whose V and M frugal shares
    assert cli.main(["run", "--seed", "1"]) == 130
    assert seen["cfg"].preset == "frugal" and seen["out"] == Path("runs") / "frugal-s1"
    assert "run --preset frugal" in (Path(__file__).parents[1] / "scripts" / "run.sh").read_text()
    stage = commands.preset(cli.build_parser().parse_args(["train-vae", "d", "--out", "o"]))
    assert stage.preset == "cpu" and (stage.vae, stage.transition) == (seen["cfg"].vae, seen["cfg"].transition)


def test_train_vae_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    out = tmp_path / "vae_out"
    code, stdout, err = _main(["train-vae", str(missing), "--preset", "smoke", "--out", str(out)], capsys)
    _assert_one_line_error(code, err, str(missing))
    assert "train-vae" in err
    assert stdout == ""


def test_train_transition_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    code, _, err = _main(
        ["train-transition", str(missing), "--vae", str(tmp_path / "v"), "--preset", "smoke", "--out", str(tmp_path / "m")],
        capsys,
    )
    _assert_one_line_error(code, err, str(missing))


def _wm_jax() -> list[str]:
    script = Path(sys.executable).parent / "wm-jax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "wm_jax.cli"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["argparse", "handled"])
def test_real_process_stderr_is_one_line(tmp_path, kind):
    """The real console script: exit code 2, exactly one stderr line, no traceback, nothing on stdout."""
    if kind == "argparse":
        args = ["collect", "--episodes", "abc", "--out", str(tmp_path / "x")]
    else:  # an error raised after parsing, once jax and the library are imported
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "f").write_text("x")
        args = ["collect", "--episodes", "2", "--out", str(tmp_path / "full")]
    proc = subprocess.run([*_wm_jax(), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wm-jax collect: error:")


@pytest.mark.slow
def test_collect_succeeds(tmp_path, capsys):
    out = tmp_path / "data"
    code, stdout, _ = _main(["collect", "--episodes", "5", "--seed", "1", "--out", str(out)], capsys)
    assert code == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    for needle in ("episodes", "steps", "mean length", "MB"):
        assert needle in lines[0], (needle, lines[0])
    ds = data.load_dataset(out)
    arrays = data.to_arrays(ds)
    assert len(set(arrays["episode"].tolist())) == 5
    assert f"5 CartPole-v1 episodes, {ds.num_rows} steps" in lines[0]
    mean_len = ds.num_rows / 5
    assert f"mean length {mean_len:.1f}" in lines[0]
    assert arrays["frame"].shape[1:] == (64, 64)

    # the same command again refuses the now non-empty directory; --overwrite replaces it
    code, _, err = _main(["collect", "--episodes", "5", "--seed", "1", "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "--overwrite")
    code, stdout, _ = _main(["collect", "--episodes", "3", "--seed", "2", "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and "3 CartPole-v1 episodes" in stdout
    assert len(set(data.to_arrays(data.load_dataset(out))["episode"].tolist())) == 3


def test_compilation_cache_goes_where_asked_and_can_be_turned_off(monkeypatch, tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("WM_JAX_COMPILATION_CACHE", "off")
    assert cli.compilation_cache() is None and jax.config.jax_compilation_cache_dir == before
    try:
        monkeypatch.setenv("WM_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
        assert cli.compilation_cache() == tmp_path / "xla"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setenv("WM_JAX_COMPILATION_CACHE", "")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert cli.compilation_cache() == tmp_path / "cache" / "wm_jax" / "jax"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_parser_and_commands_agree():
    assert set(cli.PRECISIONS) == set(commands.PRECISIONS)
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(commands.COMMANDS)


def test_run_offers_every_preset():
    from wm_jax.presets import PRESETS

    parser = cli.build_parser()
    for name in PRESETS:
        assert parser.parse_args(["run", "--preset", name]).preset == name


def test_run_offers_every_trainer_and_names_its_directory(monkeypatch, tmp_path):
    from wm_jax import pipeline
    from wm_jax.config import TRAINERS

    parser = cli.build_parser()
    for name in TRAINERS:
        assert parser.parse_args(["run", "--trainer", name]).trainer == name
    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda cfg, out: seen.update(cfg=cfg, out=out) or _fake_summary(cfg))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--preset", "smoke", "--trainer", "ppo"]) == 0
    assert seen["out"] == Path("runs") / "smoke-ppo"
    assert seen["cfg"].evolve.trainer == "ppo" and seen["cfg"].controller.kind == "mlp"
    assert cli.main(["run", "--preset", "laptop", "--trainer", "ppo"]) == 0  # the preset's own: no suffix
    assert seen["out"] == Path("runs") / "laptop"


def _fake_summary(cfg):
    keys = ("seed", "real_return_mean", "real_return_std", "real_return_min", "real_episodes", "solved",
            "real_env_steps", "dream_real_corr", "latent_kl")
    return {"preset": cfg.preset, **{k: 0 for k in keys}, "wall_s": {}, "device": "cpu"}


def test_run_with_fewer_rounds_than_the_preset_always_runs(monkeypatch, tmp_path):
    """frugal always runs 2 rounds (rounds.min_rounds); `--rounds 1` asks for one: the run gets one
    round, not a config error."""
    from wm_jax import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda cfg, out: seen.update(cfg=cfg) or _fake_summary(cfg))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--preset", "frugal", "--rounds", "1"]) == 0
    assert seen["cfg"].rounds.rounds == seen["cfg"].rounds.min_rounds == 1
    assert cli.main(["run", "--preset", "frugal", "--rounds", "4"]) == 0
    assert (seen["cfg"].rounds.rounds, seen["cfg"].rounds.min_rounds) == (4, 2)
