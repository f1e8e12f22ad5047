"""Checkpoints of a training run: the full training state at a step, written so that a kill at
any moment leaves the last complete checkpoint usable, and read back for an exact resume.

    run/checkpoints/step-000500/  lora.safetensors, optimizer.safetensors, state.json

Everything is safetensors/JSON (no pickle): the LoRA weights, the optimizer's moments (plain
numbers in state.json), fp16's gradient-scaler state, the settings, and the run's identity
(process count, base and dataset fingerprints), which a resume must match.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from .config import TrainConfig
from .fileio import atomic_folder, atomic_path, fsync, remove_folder


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_checkpoint(run: Path, step: int, named_params: dict[str, torch.nn.Parameter], optimizer,
                    cfg: TrainConfig, *, scaler=None, identity: dict | None = None) -> Path:
    """Full training state at `step` into run/checkpoints/step-N, written beside and renamed:
    LoRA weights, optimizer state (tensors in safetensors; plain numbers, such as bitsandbytes'
    step count, in state.json), fp16's gradient-scaler state, and `identity` (what a resume must
    match: process count, base and dataset fingerprints)."""
    final = run / "checkpoints" / f"step-{step:06d}"
    moments, numbers = _optimizer_state(named_params, optimizer)
    state = {"step": step, "config": cfg.summary(), "optimizer_numbers": numbers, "identity": identity or {}}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    try:  # a checkpoint saved again (a resume from an earlier one) is replaced whole
        with atomic_folder(final) as tmp:
            _atomic_save_tensors(dict(named_params), tmp / "lora.safetensors")
            _atomic_save_tensors(moments, tmp / "optimizer.safetensors")
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            fsync(tmp / "state.json")
    except OSError as e:  # e.g. a full disk: keep the last good checkpoint, say which one it is
        prev = checkpoints_in(run / "checkpoints")
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OSError(e.errno, f"{why} while writing checkpoint {final}: free space (or fix the folder), then "
                               f"resume with --resume {run}" + (f" (the last complete checkpoint, {prev[-1].name}, "
                               "is intact)" if prev else " (there is no earlier checkpoint)")) from e
    kept = checkpoints_in(run / "checkpoints")
    for old in kept[: max(0, len(kept) - cfg.keep_checkpoints)]:
        remove_folder(old)
    for stale in (run / "checkpoints").glob("step-*.deleting"):  # left by a run killed mid-delete
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _optimizer_state(named_params: dict[str, torch.nn.Parameter], optimizer) -> tuple[dict, dict]:
    """The optimizer's per-parameter state keyed "<param name>::<key>": tensors (for safetensors)
    and plain numbers (for state.json), such as bitsandbytes' step count."""
    index = {id(p): n for n, p in named_params.items()}
    moments, numbers = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    moments[f"{index[id(p)]}::{k}"] = v
                elif isinstance(v, (int, float, bool)):
                    numbers[f"{index[id(p)]}::{k}"] = v
                else:
                    raise TypeError(f"optimizer state {k!r} of type {type(v).__name__} cannot be checkpointed")
    return moments, numbers


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint folders (step-NNNNNN, no .tmp / .deleting leftovers) in `folder`, oldest first."""
    return sorted(folder.glob("step-??????"))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the latest complete one inside a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = checkpoints_in(path / "checkpoints") + checkpoints_in(path)
    found = [p for p in found if (p / "state.json").is_file()]
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}: pass a run folder's checkpoints/step-N folder "
                                "or a run folder that has one")
    return found[-1]


# Settings a resumed run may change: bookkeeping, the length of the run, and paths (a dataset or
# base that moved). Anything else would make "resume" silently a different run.
RESUME_MAY_CHANGE = {"steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints", "cache",
                     "dataset", "base"}


IDENTITY_HINTS = {
    "processes": "resume with the same number of processes (accelerate launch --num_processes N): each "
                 "process's share of every batch depends on it",
    "base_fingerprint": "resume with the base the checkpoint was trained on",
    "dataset_fingerprint": "the images or captions changed since the checkpoint: resume with the same data, "
                           "or start a new run (another --out)",
}


def _check_state(ckpt: Path, state) -> None:
    """state.json's fields have the types a resume uses: a hand-edited or damaged file is one error
    naming the file and the field, not a TypeError in the training loop."""
    kinds = {"step": (int, "a whole number >= 0"), "config": (dict, "a table"),
             "optimizer_numbers": (dict, "a table"), "identity": (dict, "a table"),
             "grad_scaler": (dict, "a table")}
    for field_name, (kind, what) in kinds.items():
        if field_name not in state:
            continue
        v = state[field_name]
        if not isinstance(v, kind) or isinstance(v, bool) or (field_name == "step" and v < 0):
            raise ValueError(f"checkpoint {ckpt / 'state.json'}: field {field_name!r} must be {what}, got "
                             f"{v!r} ({type(v).__name__}); the file is damaged or was edited: resume from "
                             "an earlier checkpoint by passing its folder to --resume")


def load_checkpoint(ckpt: Path, named_params, optimizer, cfg: TrainConfig | None = None, *, scaler=None,
                    identity: dict | None = None) -> int:
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / "lora.safetensors"))
        moments = load_file(str(ckpt / "optimizer.safetensors"))
        state = json.loads((ckpt / "state.json").read_text())
        step, saved = state["step"], state.get("config", {})
    except Exception as e:  # SafetensorError, OSError, JSON errors: all mean a damaged checkpoint
        raise ValueError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                         "one by passing its folder to --resume") from e
    _check_state(ckpt, state)
    if cfg is not None:
        now = cfg.summary()
        differ = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
        if differ:
            raise ValueError(f"checkpoint {ckpt} was trained with different settings: "
                             + ", ".join(f"{k}={saved[k]!r} there, {now[k]!r} here" for k in differ)
                             + ". Resume with the checkpoint's settings, or start a new run (another --out).")
    then = state.get("identity", {})  # absent in checkpoints written before it was recorded
    for k, v in (identity or {}).items():
        if k in then and then[k] != v:
            raise ValueError(f"checkpoint {ckpt} has {k} {then[k]!r}, this run {v!r}: {IDENTITY_HINTS[k]}")
    missing = set(named_params) - set(weights)
    wrong = [n for n in named_params if n in weights and weights[n].shape != named_params[n].shape]
    if missing or wrong:
        what = (f"missing {sorted(missing)[:3]}" if missing else
                f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} there, {tuple(named_params[wrong[0]].shape)} here")
        raise ValueError(f"checkpoint {ckpt} does not match this run's LoRA layout ({what}): resume with the "
                         "same targets, rank and base")
    with torch.no_grad():
        for n, p in named_params.items():
            p.copy_(weights[n])
    numbers = state.get("optimizer_numbers", {})
    for n, p in named_params.items():
        own = {k.split("::", 1)[1]: v for k, v in [*moments.items(), *numbers.items()] if k.split("::", 1)[0] == n}
        if own:
            optimizer.state[p] = own
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    return step
