"""Loading bases: the embedded model offline, diffusers folders, single-file checkpoints."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stylelora.base import EMBEDDED_DIR, load_base, save_single_file
from stylelora.evaluate import evaluate
from stylelora.generate import generate_images


def test_embedded_base_loads_offline_in_a_fresh_process():
    # A fresh interpreter with the hub forced offline proves nothing is fetched at load time.
    code = ("import time, torch; from stylelora.base import load_base; t=time.time(); p=load_base(); "
            "print(round(time.time()-t, 3), type(p).__name__, p.unet.config.sample_size * p.vae_scale_factor)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(EMBEDDED_DIR.parents[3])})
    assert out.returncode == 0, out.stderr[-2000:]
    seconds, cls, res = out.stdout.split()
    assert cls == "StableDiffusionPipeline" and res == "64"


def test_embedded_base_is_small():
    total = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert total <= 30e6, f"embedded base is {total / 1e6:.1f} MB"


def test_generates_the_requested_size(base_pipe):
    img, = generate_images(base_pipe, ["a red star on a white background"], [0], steps=4)
    assert img.size == (64, 64)
    wide, = generate_images(base_pipe, ["a red star on a white background"], [0], steps=4, size=(96, 64))
    assert wide.size == (96, 64)


def test_batched_generation_equals_one_by_one(base_pipe):
    prompts = ["a red star on a white background", "a blue circle on a gray background"]
    both = generate_images(base_pipe, prompts, [1, 2], steps=5)
    solo = [generate_images(base_pipe, [p], [s], steps=5)[0] for p, s in zip(prompts, [1, 2])]
    for a, b in zip(both, solo):
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def test_base_quality_on_heldout_prompts(base_pipe):
    # Prompts whose (shape, colour, background) the base never saw together in pretraining.
    result = evaluate(base_pipe, n=48, seed=123)
    assert result["shape_acc"] >= 0.8, result
    assert result["color_acc"] >= 0.8, result
    assert result["palette"]["flat"] >= 0.9 and result["technique"]["flat"] >= 0.9, result


def test_single_file_round_trip(base_pipe, tmp_path):
    path = save_single_file(base_pipe, tmp_path / "shapes.safetensors")
    again = load_base(path, config=EMBEDDED_DIR)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(base_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k].reshape(a[k].shape)), f"{name}.{k} changed"
    x, = generate_images(base_pipe, ["a green cross on a mint background"], [7], steps=6)
    y, = generate_images(again, ["a green cross on a mint background"], [7], steps=6)
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_diffusers_folder_round_trip(base_pipe, tmp_path):
    base_pipe.save_pretrained(tmp_path / "copy")
    again = load_base(tmp_path / "copy")
    x, = generate_images(base_pipe, ["a red square on a beige background"], [3], steps=4)
    y, = generate_images(again, ["a red square on a beige background"], [3], steps=4)
    assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_reads_files_and_equals_diffusers(base_pipe, tmp_path, monkeypatch, dtype):
    """The low-memory half-precision load (float32 mapped, each tensor read and cast) must give
    what diffusers' own dtype= load gives, bit for bit, also from sharded files next to a variant."""
    import stylelora.base as B
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "sharded"
    base_pipe.save_pretrained(folder, max_shard_size="2MB")
    base_pipe.unet.to(torch.float16).save_pretrained(folder / "unet", variant="fp16")  # must be ignored
    base_pipe.unet.to(torch.float32)
    assert len(list((folder / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    indexed = {}
    real_index = B._tensor_index
    monkeypatch.setattr(B, "_tensor_index", lambda f: indexed.setdefault(f.name, real_index(f)))
    ours = load_base(folder, dtype=dtype)
    ref = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True,
                                                  safety_checker=None, requires_safety_checker=False)
    for comp in ("unet", "text_encoder", "vae"):
        a, b = getattr(ours, comp).state_dict(), getattr(ref, comp).state_dict()
        assert a.keys() == b.keys()
        floats = {k for k, v in a.items() if v.is_floating_point()}
        assert floats <= indexed[comp].keys(), f"{comp}: tensors cast in memory, not read from the files"
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{comp}.{k} differs from diffusers"


def test_bad_base_specs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_base(tmp_path / "nope")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="pickle-based.*only loads .safetensors"):
        load_base(ckpt)
    single = tmp_path / "one.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(ValueError, match="needs a local diffusers config folder"):
        load_base(single)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_base(tmp_path)


def test_the_commands_huge_page_allocator_changes_no_pixel(tmp_path):
    """`stylelora` sets THP_MEM_ALLOC_ENABLE=1 before torch loads (a speed setting of torch's CPU
    allocator); a value the user exported wins, and the image is the same byte for byte either way."""
    from unittest import mock

    from stylelora.cli import process_defaults

    with mock.patch.dict(os.environ, {"THP_MEM_ALLOC_ENABLE": "0"}):  # restores the environment after
        process_defaults()
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
        del os.environ["THP_MEM_ALLOC_ENABLE"]
        process_defaults()
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"

    pngs = []
    for value in ("1", "0"):
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value, "HF_HUB_OFFLINE": "1"}
        out = tmp_path / f"thp{value}.png"
        subprocess.run([sys.executable, "-m", "stylelora.cli", "generate", "a blue star on a white background",
                        "--seed", "3", "--steps", "8", "--out", str(out)], env=env, check=True, capture_output=True)
        pngs.append(out.read_bytes())
    assert pngs[0] == pngs[1]
