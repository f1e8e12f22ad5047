"""Crash safety of training: SIGKILL at five points (between checkpoints, mid-way through writing a
checkpoint file, with a checkpoint complete but not yet renamed, right after a checkpoint, and
while the final adapter is written), each resumed with `--resume RUN_DIR` to the uninterrupted
run's adapter; nothing torn ever under a final name; a full disk during a checkpoint is one clear
error that leaves the previous checkpoint usable.

The killed runs are real `python -m stylelora.cli train ...` processes. The kill point is chosen by
a sitecustomize.py put on the child's PYTHONPATH (it does nothing unless STYLELORA_TEST_KILL is
set), which wraps one library function to SIGKILL its own process at that point.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stylelora.adapters import load_adapter
from stylelora.cli import main
from stylelora.train import find_checkpoint
from stylelora.world.render import render_batch, styled_caption

ROOT = Path(__file__).resolve().parents[1]
FILES = ["lora.safetensors", "optimizer.safetensors", "state.json"]

HOOK = r'''
"""Test hook (tests/test_crash_safety.py): SIGKILL this process at STYLELORA_TEST_KILL=POINT:STEP."""
import os

if os.environ.get("STYLELORA_TEST_KILL"):
    import signal
    import sys
    from pathlib import Path

    import stylelora.checkpoints as C
    import stylelora.train as T

    point, _, arg = os.environ["STYLELORA_TEST_KILL"].partition(":")
    step = int(arg or 0)
    ckpt_tmp = f"step-{step:06d}.tmp"

    def die():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "step":  # at the start of step N, before its forward pass
        lr_factor = T._lr_factor
        T._lr_factor = lambda cfg, s: die() if s == step else lr_factor(cfg, s)
    elif point == "after-checkpoint":  # checkpoint N complete and renamed
        save_checkpoint = T.save_checkpoint
        def hooked(run, s, *args, **kwargs):
            out = save_checkpoint(run, s, *args, **kwargs)
            if s == step:
                die()
            return out
        T.save_checkpoint = hooked
    elif point == "mid-file":  # checkpoint N: lora written, optimizer.safetensors half written
        from safetensors.torch import save
        atomic_save = C._atomic_save_tensors
        def hooked(tensors, path, metadata=None):
            if path.parent.name == ckpt_tmp and path.name == "optimizer.safetensors":
                data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
                path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
                die()
            return atomic_save(tensors, path, metadata)
        C._atomic_save_tensors = hooked
    elif point in ("before-rename", "final-write"):
        replace = os.replace
        def hooked(src, dst, *args, **kwargs):
            if point == "before-rename" and Path(src).name == ckpt_tmp:  # complete, still under .tmp
                die()
            if point == "final-write" and Path(dst).name == "style.safetensors":  # temp file written
                die()
            return replace(src, dst, *args, **kwargs)
        os.replace = hooked
        link = os.link  # a new adapter is published by a hard link (nothing replaced), an old one by os.replace
        def hooked_link(src, dst, *args, **kwargs):
            if point == "final-write" and Path(dst).name == "style.safetensors":
                die()
            return link(src, dst, *args, **kwargs)
        os.link = hooked_link
    else:
        raise SystemExit(f"unknown STYLELORA_TEST_KILL point {point!r}")
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training here and in the killed children on one thread each: the same arithmetic in both (so
    1e-6 holds), and no thread oversubscription on a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_random_pipe):
    root = tmp_path_factory.mktemp("crash")
    tiny_random_pipe.save_pretrained(root / "base")
    data = root / "data"
    data.mkdir()
    for i, (scene, img) in enumerate(render_batch(2, 3, "flat", "outline")):
        img.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(styled_caption(scene, "flat", "outline"))
    (root / "hooks").mkdir()
    (root / "hooks" / "sitecustomize.py").write_text(HOOK)
    return root


def train_args(setup: Path, folder: Path, steps: int = 4) -> list[str]:
    """4 steps with a checkpoint after each of the first 3 (none after the last: the adapter is it)."""
    return ["train", str(setup / "data"), "--base", str(setup / "base"), "--out", str(folder / "style.safetensors"),
            "--steps", str(steps), "--batch-size", "1", "--rank", "2", "--lora-dropout", "0.1",
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--sample-every", "0", "--log-every", "1",
            "--no-progress", "--device", "cpu", "--warmup-steps", "2"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def check_final_names(run: Path, out: Path) -> list[str]:
    """Everything under a final name is whole: step-N folders have all files, loadable, at step N;
    the adapter, if present, loads. Returns the step-N names seen. Folders may vanish meanwhile."""
    seen = []
    for ckpt in sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []:
        if not re.fullmatch(r"step-\d{6}", ckpt.name):
            continue  # .tmp / .deleting: work in progress under a name nothing loads
        try:
            assert sorted(p.name for p in ckpt.iterdir()) == FILES, f"torn checkpoint {ckpt}"
            assert json.loads((ckpt / "state.json").read_text())["step"] == int(ckpt.name[5:])
            load_file(str(ckpt / "lora.safetensors")), load_file(str(ckpt / "optimizer.safetensors"))
        except Exception:  # noqa: BLE001 -- safetensors reports a vanished file as RuntimeError, not FileNotFoundError
            if ckpt.exists():
                raise
            continue  # renamed away (rotation) while we looked
        seen.append(ckpt.name)
    if out.exists():
        load_adapter(out)
    return seen


@contextmanager
def watching(run: Path, out: Path):
    """Check the final names over and over, in a thread, while the body runs."""
    stop, errors, seen = threading.Event(), [], set()

    def loop():
        while not stop.is_set():
            try:
                seen.update(check_final_names(run, out))
            except Exception as e:  # noqa: BLE001 -- reported below, in the test's thread
                errors.append(e)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run (in this process), watched while it writes."""
    folder = setup / "reference"
    with watching(folder / "style.run", folder / "style.safetensors") as seen:
        assert main(train_args(setup, folder)) == 0
    assert {"step-000001", "step-000002", "step-000003"} <= seen
    return weights(folder / "style.safetensors")


# point, step, the checkpoint a resume must start from
KILLS = [
    ("step", 2, "step-000002"),              # in the third step, before its update
    ("mid-file", 2, "step-000001"),          # checkpoint 2 half written (its optimizer file torn)
    ("before-rename", 2, "step-000001"),     # checkpoint 2 complete but still named .tmp
    ("after-checkpoint", 3, "step-000003"),  # right after checkpoint 3 (and the rotation it does)
    ("final-write", 4, "step-000003"),       # the adapter's temp file written, not yet renamed
]


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_matches_the_uninterrupted_run(setup, reference, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(setup / "hooks"), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for point, step, resume_from in KILLS:
        folder = tmp_path / f"{point}-{step}"
        run, out = folder / "style.run", folder / "style.safetensors"
        cmd = [sys.executable, "-m", "stylelora.cli", *train_args(setup, folder)]
        with watching(run, out):
            child = subprocess.Popen(cmd, env={**env, "STYLELORA_TEST_KILL": f"{point}:{step}"}, cwd=tmp_path,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                stdout, stderr = child.communicate(timeout=150)
            except subprocess.TimeoutExpired:
                child.kill()
                raise
        assert child.returncode == -signal.SIGKILL, (point, child.returncode, stderr[-3000:])
        assert "Traceback" not in stderr, stderr[-3000:]
        # What the kill left: whole checkpoints under final names, no adapter, the right latest one.
        assert not out.exists(), f"{point}: an adapter appeared before training ended"
        assert check_final_names(run, out)[-1] == resume_from == find_checkpoint(run).name, point
        if point == "mid-file":
            assert (run / "checkpoints" / "step-000002.tmp" / "optimizer.safetensors.tmp").is_file()
        if point == "before-rename":
            assert sorted(p.name for p in (run / "checkpoints" / "step-000002.tmp").iterdir()) == FILES
        if point == "final-write":
            assert [p.name.startswith(".style.safetensors.") for p in folder.iterdir() if p.is_file()] == [True]

        capsys.readouterr()
        with watching(run, out):
            assert main([*train_args(setup, folder), "--resume", str(run)]) == 0, point
        assert f"resumed from {run / 'checkpoints' / resume_from} at step {int(resume_from[5:])}" in \
            capsys.readouterr().out
        diff = max_diff(weights(out), reference)
        assert diff <= 1e-6, f"{point}:{step}: resumed adapter differs from the uninterrupted one by {diff}"
        assert not list((run / "checkpoints").glob("step-*.*")), "the resume cleared the killed run's leftovers"


def test_full_disk_during_a_checkpoint_is_one_clear_error_and_keeps_the_last_one(setup, reference, tmp_path,
                                                                                 monkeypatch, capsys):
    import safetensors.torch

    folder = tmp_path / "full"
    run, out = folder / "style.run", folder / "style.safetensors"
    real_save, calls = safetensors.torch.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the second checkpoint's first file: a few bytes land, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    args = train_args(setup, folder)
    assert main(args) == 2  # the CLI turns the OSError into one line on stderr
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"stylelora: error: \[Errno 28\] no space left on device while writing checkpoint \S+step-000002: free space "
                        r"\(or fix the folder\), then resume with --resume \S+style\.run \(the last complete "
                        r"checkpoint, step-000001, is intact\)\n", err), err
    # The earlier checkpoint is whole and loadable; nothing of the failed one is left; no adapter.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert check_final_names(run, out) == ["step-000001"] and not out.exists()
    # After freeing space, resuming from it finishes the run: same adapter as never having failed.
    assert main([*args, "--resume", str(run)]) == 0
    assert max_diff(weights(out), reference) <= 1e-6


def test_full_disk_writing_the_adapter_keeps_no_partial_file(tiny_random_pipe, tmp_path, monkeypatch):
    """The final adapter on a full disk: a clear error, and no partial file under any name."""
    import safetensors.torch

    from stylelora.adapters import save_adapter

    from test_adapters import UNET_KEYS, make_adapter

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"no space left on device while writing .*a\.safetensors: free some space and "
                                      r"write it again \(nothing was written under that name\)"):
        save_adapter(make_adapter(tiny_random_pipe, keys=UNET_KEYS[:2]), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_full_disk_in_one_line(setup, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code = main(train_args(setup, tmp_path, steps=2))  # fails at the first checkpoint
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stylelora: error: [Errno 28] no space left") and err.count("\n") == 1
