"""Reliability pass 2 (issue 14), training and the CLI: each case is one "stylelora: error:" line
naming the input and the fix (exit 2, no traceback), refused before the base loads where it can be,
with nothing half-written and nothing lost. Conventions as in test_bad_inputs.py; most cases run
`stylelora.cli.main` in this process (fast), a few a real subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from stylelora.config import EMBEDDED_BASE_NAMES, MAX_STEPS, TrainConfig, check_generation, load_toml
from stylelora.train import train

from test_adapters import make_adapter
# Fixtures of test_bad_inputs.py: deadline and one_thread (autouse: 120 s per test, torch on one
# thread) and dataset (two solid images with captions).
from test_bad_inputs import assert_one_error, cli, dataset, deadline, one_thread  # noqa: F401
from test_blend import keys


def tiny(dataset, tiny_base, out, **kw) -> TrainConfig:
    """The smallest training: 2 steps of 1 image, no samples, no bar."""
    opts = dict(dataset=str(dataset), base=str(tiny_base), out=str(out), steps=2, batch_size=1, sample_every=0,
                checkpoint_every=0, log_every=1, progress=False, device="cpu", rank=1)
    return TrainConfig(**{**opts, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, tiny_base):
    """One tiny run with a checkpoint at step 1: its adapter and run folder."""
    root = tmp_path_factory.mktemp("trained")
    out = train(tiny(dataset, tiny_base, root / "a.safetensors", checkpoint_every=1))
    return out


@pytest.fixture
def no_base(monkeypatch):
    """Loading a base fails the test: the refusals must come before it."""
    import stylelora.base

    def refuse(*a, **k):
        raise AssertionError("the base was loaded before the bad input was refused")

    monkeypatch.setattr(stylelora.base, "load_base", refuse)


def run(capsys, *argv) -> tuple[int, str]:
    """main() in this process: (exit code, the one error line), checked like assert_one_error."""
    from stylelora.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("stylelora: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err[-2000:])
    return code, errors[0]


# ----------------------------------------------------------------------------- 1. --out taken while training

def test_a_file_put_at_out_while_training_is_kept(tmp_path, dataset, tiny_base, capsys):
    out = tmp_path / "style.safetensors"

    def upload_meanwhile(event):  # another request (an upload, a merge) publishes the same name mid-run
        if event.get("step") == 1 and not out.exists():
            out.write_bytes(b"someone else's adapter")

    written = train(tiny(dataset, tiny_base, out), on_log=upload_meanwhile)
    assert out.read_bytes() == b"someone else's adapter"
    assert written == tmp_path / "style-2.safetensors" and written.is_file()
    assert f"note: {out} appeared or changed while this run trained, so it was kept; the trained adapter " \
           f"is {written}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style-2.safetensors", "style.run", "style.safetensors"]


def test_a_file_replaced_at_out_while_training_is_kept(tmp_path, dataset, tiny_base):
    out = tmp_path / "style.safetensors"
    out.write_bytes(b"old")
    (tmp_path / "style-2.safetensors").write_bytes(b"taken too")

    def replace_meanwhile(event):
        if event.get("step") == 1:
            out.unlink()
            out.write_bytes(b"new upload")

    written = train(tiny(dataset, tiny_base, out), on_log=replace_meanwhile)
    assert out.read_bytes() == b"new upload" and (tmp_path / "style-2.safetensors").read_bytes() == b"taken too"
    assert written == tmp_path / "style-3.safetensors"
    with safe_open(str(written), "pt") as f:
        assert f.metadata()["stylelora.trigger_words"]


def test_the_users_own_earlier_adapter_is_replaced_as_usual(tmp_path, dataset, tiny_base):
    out = tmp_path / "style.safetensors"
    out.write_bytes(b"yesterday's run")
    out.chmod(0o640)
    assert train(tiny(dataset, tiny_base, out)) == out
    assert out.read_bytes()[8:9] == b"{" and (out.stat().st_mode & 0o777) == 0o640
    assert not list(tmp_path.glob("style-*")) and not list(tmp_path.glob(".style*"))


# ----------------------------------------------------------------------------- 2. --out is a folder

def test_out_naming_a_folder_is_refused_before_training(tmp_path, dataset, no_base, capsys):
    (tmp_path / "style.safetensors").mkdir()
    _, line = run(capsys, "train", dataset, "--out", tmp_path / "style.safetensors", "--device", "cpu")
    assert re.search(r"--out .*style\.safetensors is a folder: give a file path ending in \.safetensors", line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


# ----------------------------------------------------------------------------- 3. state.json of the wrong kind

@pytest.mark.parametrize("field, value", [("step", "1"), ("step", -1), ("config", []), ("identity", "x")])
def test_checkpoint_with_a_bad_state_field_names_file_and_field(tmp_path, dataset, trained, tiny_base, field, value,
                                                                capsys):
    import shutil

    run_dir = tmp_path / "a.run"
    shutil.copytree(trained.parent / "a.run", run_dir)
    state = run_dir / "checkpoints" / "step-000001" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), field: value}))
    _, line = run(capsys, "train", dataset, "--base", tiny_base, "--resume", run_dir,
                  "--out", tmp_path / "a.safetensors", "--steps", 2, "--batch-size", 1, "--rank", 1,
                  "--sample-every", 0, "--checkpoint-every", 0, "--log-every", 1, "--no-progress", "--device", "cpu")
    assert re.search(rf"checkpoint .*step-000001/state\.json: field '{field}' must be .*, got "
                     rf"{re.escape(repr(value))} .*resume from an earlier checkpoint", line), line
    assert not (tmp_path / "a.safetensors").exists()


# ----------------------------------------------------------------------------- 4, 5. generation settings

@pytest.mark.parametrize("flags, pattern", [
    (["--steps", "-1"], rf"--steps must be a whole number from 1 to {MAX_STEPS}, got -1"),
    (["--steps", "0"], rf"--steps must be a whole number from 1 to {MAX_STEPS}, got 0"),
    (["--steps", "1001"], rf"--steps must be a whole number from 1 to {MAX_STEPS}, got 1001"),
    (["--guidance", "nan"], r"--guidance must be a number from 0 to 100 \(at most 1 = no guidance; 5 is the "
                            r"default\), got nan"),
    (["--guidance", "inf"], r"--guidance must be a number from 0 to 100 .*, got inf"),
    (["--guidance=-2"], r"--guidance must be a number from 0 to 100 .*, got -2\.0"),
    (["--seed", str(2**64)], r"--seed must be a whole number from 0 to 2\*\*63-1 \(9223372036854775807\), "
                             r"got 18446744073709551616"),
    (["--seed=-1"], r"--seed must be a whole number from 0 to 2\*\*63-1"),
], ids=["steps-negative", "steps-0", "steps-over-cap", "guidance-nan", "guidance-inf", "guidance-negative",
        "seed-past-64-bits", "seed-negative"])
def test_generate_settings_out_of_range(tmp_path, monkeypatch, no_base, capsys, flags, pattern):
    monkeypatch.chdir(tmp_path)
    _, line = run(capsys, "generate", "a red star", *flags, "-o", "x.png")
    assert re.search(pattern, line), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, pattern", [
    (["--n", "0"], r"--n must be >= 1 \(the number of prompts to judge\), got 0"),
    (["--steps", "0"], r"--steps must be a whole number from 1 to"),
    (["--guidance", "inf"], r"--guidance must be a number from 0 to 100"),
    (["--seed", str(2**63 - 1), "--n", "2"], r"--seed 9223372036854775807 \+ --n 2 passes 2\*\*63-1"),
], ids=["n-0", "steps-0", "guidance-inf", "seed-plus-n-past-63-bits"])
def test_eval_settings_out_of_range(tmp_path, monkeypatch, no_base, capsys, flags, pattern):
    monkeypatch.chdir(tmp_path)
    _, line = run(capsys, "eval", *flags)
    assert re.search(pattern, line), line


def test_generation_settings_are_checked_in_the_library(tiny_random_pipe):
    from stylelora.evaluate import evaluate
    from stylelora.generate import generate_images

    for kw, pattern in [(dict(steps=0), r"^steps must be a whole number from 1 to 1000, got 0"),
                        (dict(guidance=float("nan")), r"^guidance must be a number from 0 to 100"),
                        (dict(seed=2**64), r"^seed must be a whole number from 0 to 2\*\*63-1")]:
        with pytest.raises(ValueError, match=pattern):
            check_generation(**kw)
    with pytest.raises(ValueError, match=r"steps must be a whole number from 1 to 1000, got -1"):
        generate_images(tiny_random_pipe, ["a red star"], [0], steps=-1)
    with pytest.raises(ValueError, match=r"seed must be a whole number from 0 to 2\*\*63-1"):
        generate_images(tiny_random_pipe, ["a red star"], [2**64], steps=1)
    with pytest.raises(ValueError, match=r"guidance must be a number from 0 to 100 .*got inf"):
        generate_images(tiny_random_pipe, ["a red star"], [0], steps=1, guidance=float("inf"))
    with pytest.raises(ValueError, match=r"n must be a whole number >= 1 \(the number of prompts to judge\), got 0"):
        evaluate(tiny_random_pipe, n=0)
    check_generation(steps=1, guidance=0.0, seed=0)  # the ends of the ranges are fine
    check_generation(steps=MAX_STEPS, guidance=100, seed=2**63 - 1)


def test_train_seed_past_63_bits_names_the_flag(tmp_path, dataset, no_base, capsys):
    _, line = run(capsys, "train", dataset, "--seed", 2**64, "--out", tmp_path / "a.safetensors")
    assert re.search(r"seed must be a whole number from 0 to 2\*\*63-1, got 18446744073709551616", line), line
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7. TOML files

def test_toml_that_is_not_utf8_names_the_file(tmp_path, dataset):
    (tmp_path / "t.toml").write_bytes("trigger = 'café'\n".encode("latin-1"))
    done = cli("train", dataset, "--config", "t.toml", cwd=tmp_path)  # a real process: no traceback
    assert_one_error(done, r"config file t\.toml is not UTF-8 text \(byte 14\): re-save it as UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]
    with pytest.raises(ValueError, match=r"config file .*t\.toml is not UTF-8"):
        load_toml(tmp_path / "t.toml")


@pytest.mark.parametrize("value", ["1e30", "-0.1", "1.5"])
def test_noise_offset_out_of_range_names_the_field(tmp_path, dataset, no_base, capsys, value):
    (tmp_path / "t.toml").write_text(f"noise_offset = {value}\n")
    _, line = run(capsys, "train", dataset, "--config", tmp_path / "t.toml")
    shown = re.escape(f"{float(value):g}")
    assert re.search(rf"noise_offset must be from 0 to 1 \(0\.05-0\.1 is typical\), got {shown}$", line), line
    TrainConfig(noise_offset=1.0)  # the end of the range is fine


# ----------------------------------------------------------------------------- 8. sweep cap and progress

@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory, tiny_random_pipe):
    from stylelora.adapters import save_adapter

    root = tmp_path_factory.mktemp("adapters")
    adapter = make_adapter(tiny_random_pipe, keys(tiny_random_pipe, r"attn2\.(to_q|to_v)"), rank=2, alpha=2.0)
    return save_adapter(adapter, root / "ink.safetensors")


def test_sweep_over_the_cap_is_refused_naming_count_and_cap(tmp_path, monkeypatch, no_base, adapter_file, capsys):
    monkeypatch.chdir(tmp_path)
    strengths = ",".join(str(i / 10) for i in range(33))
    _, line = run(capsys, "generate", "a red star", "--adapter", adapter_file, "--adapter", adapter_file,
                  "--sweep", strengths, "-o", "grid.png")
    assert re.search(r"--sweep of 2 adapter\(s\) x 33 strength\(s\) is 66 images, over the cap of 64: sweep "
                     r"fewer strengths or adapters per run", line), line
    assert list(tmp_path.iterdir()) == []
    _, line = run(capsys, "generate", "a red star", "--adapter", adapter_file, "--sweep", "0,nan", "-o", "g.png")
    assert "bad --sweep '0,nan': give comma-separated strengths" in line


def test_sweep_prints_progress_per_image(tmp_path, tiny_base, adapter_file, capsys):
    from stylelora.cli import main

    out = tmp_path / "grid.png"
    assert main(["generate", "a red star", "--adapter", str(adapter_file), "--sweep", "0,1", "--steps", "1",
                 "--base", str(tiny_base), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sweep:")]
    assert [re.sub(r", \d+ s$", "", line) for line in lines] == ["sweep: image 1/2 (ink at 0)",
                                                                 "sweep: image 2/2 (ink at 1)"], err
    assert out.is_file()


# ----------------------------------------------------------------------------- 9. no local paths in metadata

def test_adapter_metadata_holds_names_not_paths(trained, dataset, tiny_base):
    with safe_open(str(trained), "pt") as f:
        meta = f.metadata()
    training = json.loads(meta["stylelora.training"])
    assert training["dataset"] == dataset.name and training["base"] == tiny_base.name
    for key, value in meta.items():
        assert str(trained.parent.parent) not in value and "/tmp" not in value, (key, value)
    run_state = json.loads((trained.parent / "a.run" / "checkpoints" / "step-000001" / "state.json").read_text())
    assert run_state["config"]["dataset"] == dataset.name
    assert TrainConfig(dataset=".", out="a.safetensors").summary()["dataset"] == Path.cwd().name
    assert {TrainConfig(base=b).summary()["base"] for b in (None, *EMBEDDED_BASE_NAMES)} == {"embedded"}
    from stylelora.base import EMBEDDED_NAMES

    assert EMBEDDED_BASE_NAMES == EMBEDDED_NAMES


# ----------------------------------------------------------------------------- 10. the run folder

def test_run_folder_naming_rule(tmp_path):
    assert TrainConfig(out="data/style.safetensors").run_path == Path("data/style.run")
    assert TrainConfig(out="style.v2.safetensors").run_path == Path("style.v2.run")
    assert TrainConfig(out="a.safetensors", run_dir="runs/x").run_path == Path("runs/x")


@pytest.mark.parametrize("run_dir, refused", [("runs", True), ("sub/inner", True), ("x.run", False),
                                              (".runs/x", False), (None, False)])
def test_run_folder_inside_the_dataset(tmp_path, monkeypatch, run_dir, refused, capsys):
    from stylelora.train import _check_outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = TrainConfig(dataset="data", out="data/style.safetensors",
                      run_dir=None if run_dir is None else f"data/{run_dir}")
    if not refused:
        _check_outputs(cfg)
        return
    with pytest.raises(ValueError, match=rf"the run folder data/{run_dir} is inside the dataset data: the next "
                                         r"training would train on its loss plot and sample grids\. Name it "
                                         r"NAME\.run \(--run-dir NAME\.run\) or put it outside the dataset"):
        _check_outputs(cfg)
