"""CLI for adapters: inspect, convert (round trip), merge, generate (specs, <lora:> tags, sweep,
errors). A random-weight tiny base is saved once as a diffusers folder and passed as --base."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from stylelora.adapters import describe, load_adapter, save_adapter, stylelora_metadata
from stylelora.blend import AdapterStack
from stylelora.cli import main

from test_blend import keys, rand_adapter

PROMPT = "a red star on a white background"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_random_pipe):
    root = tmp_path_factory.mktemp("cli")
    tiny_random_pipe.save_pretrained(root / "base")
    pipe = tiny_random_pipe
    pastel = rand_adapter(pipe, keys(pipe, r"attn2\.(to_q|to_k|to_v|to_out\.0)", r"self_attn\.(q|v)_proj"), 4, 4.0, 1)
    pastel.metadata = stylelora_metadata(base_name="tiny-random", base_fingerprint="0123abcd",
                                         trigger_words=["pastelstyle"], training={"steps": 300, "lr": 0.001})
    ink = rand_adapter(pipe, keys(pipe, r"attn2\.(to_q|to_v)"), 2, 1.0, 2)
    (root / "adapters").mkdir()
    return {"root": root, "base": str(root / "base"),
            "pastel": save_adapter(pastel, root / "adapters" / "pastel.safetensors"),
            "ink": save_adapter(ink, root / "adapters" / "ink.safetensors")}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect(files, capsys):
    code, out, _ = run(capsys, "inspect", files["pastel"])
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert lines["format"].strip() == "kohya (version 1)"  # the default layout, stylelora metadata version 1
    assert lines["rank / alpha"].strip() == "4 / 4"
    assert lines["targets"].strip() == ("32 layers: unet attn2.to_q x7, unet attn2.to_k x7, unet attn2.to_v x7, "
                                        "unet attn2.to_out.0 x7, text_encoder self_attn.v_proj x2, "
                                        "text_encoder self_attn.q_proj x2")
    assert lines["base"].strip() == "tiny-random (fingerprint 0123abcd)"
    assert lines["trigger words"].strip() == "pastelstyle"
    assert lines["training"].strip() == "lr=0.001, steps=300"
    assert re.fullmatch(r" +[\d,]+ parameters, \d+\.\d\d MB of tensors", lines["size"])
    code, out, _ = run(capsys, "inspect", files["pastel"], "--json")
    info = json.loads(out)
    assert info == {**describe(load_adapter(files["pastel"])), "file_bytes": files["pastel"].stat().st_size}


def test_convert_round_trip(files, capsys, tmp_path):
    """The default (kohya) file -> diffusers/PEFT keys -> kohya again: the same layers throughout."""
    from safetensors.torch import load_file

    code, out, _ = run(capsys, "convert", files["pastel"], "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert code == 0 and "32 layers, kohya -> diffusers keys" in out
    back, orig = load_adapter(tmp_path / "d.safetensors"), load_adapter(files["pastel"])
    assert back.source_format == "stylelora" and sorted(back.layers) == sorted(orig.layers)
    for key, layer in orig.layers.items():
        assert torch.equal(back.layers[key].down, layer.down) and torch.equal(back.layers[key].up, layer.up)
        assert back.layers[key].alpha == layer.alpha
    assert back.trigger_words == ["pastelstyle"]
    code, out, _ = run(capsys, "convert", tmp_path / "d.safetensors", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0 and "32 layers, stylelora -> kohya keys" in out
    assert load_adapter(tmp_path / "k.safetensors").source_format == "kohya"
    again, first = load_file(str(tmp_path / "k.safetensors")), load_file(str(files["pastel"]))
    assert sorted(again) == sorted(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_merge(files, capsys, tmp_path):
    code, out, _ = run(capsys, "merge", f"{files['pastel']}:0.7", f"{files['ink']}:0.3", "-o", tmp_path / "m.safetensors")
    assert code == 0
    rel = float(out.rsplit("relative error ", 1)[1])
    assert rel < 1e-5 and "at rank 6 (32 layers)" in out  # to_q / to_v carry both: rank 4 + 2
    merged = load_adapter(tmp_path / "m.safetensors")
    assert merged.trigger_words == ["pastelstyle"] and "stylelora.base_fingerprint" not in merged.metadata  # ink has none
    code, out, _ = run(capsys, "merge", f"{files['pastel']}:0.7", f"{files['ink']}:0.3", "--rank", "1",
                       "-o", tmp_path / "m1.safetensors")
    assert code == 0 and "at rank 1" in out and float(out.rsplit("relative error ", 1)[1]) > 0.1


def test_merge_refuses_adapters_of_different_architectures_naming_both(files, capsys, tmp_path):
    from stylelora.adapters import LoraFactors

    ad, pastel = load_adapter(files["ink"]), load_adapter(files["pastel"])
    key = next(k for k in ad.layers if k in pastel.layers)
    lay = ad.layers[key]
    ad.layers[key] = LoraFactors(torch.cat([lay.down, torch.zeros(lay.down.shape[0], 8)], 1), lay.up, lay.alpha)
    save_adapter(ad, tmp_path / "wide.safetensors")
    code, _, err = run(capsys, "merge", files["pastel"], tmp_path / "wide.safetensors", "-o", tmp_path / "m.safetensors")
    assert code == 2 and f"cannot merge {key}" in err and "pastel" in err and "wide.safetensors" in err
    assert "different architectures" in err and not (tmp_path / "m.safetensors").exists()


def test_generate_specs_tags_and_library_agree(files, capsys, tmp_path, tiny_random_pipe):
    common = ["--base", files["base"], "--steps", 3, "--seed", 5, "--adapters-dir", files["root"] / "adapters"]
    assert run(capsys, "generate", PROMPT, "--adapter", f"{files['pastel']}:0.8:0.4", "--adapter", files["ink"],
               *common, "-o", tmp_path / "a.png")[0] == 0
    assert run(capsys, "generate", f"<lora:ink> {PROMPT}", "--adapter", f"{files['pastel']}:0.8:0.4",
               *common, "-o", tmp_path / "b.png")[0] == 0
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    stack = AdapterStack(copy.deepcopy(tiny_random_pipe))
    stack.add("pastel", files["pastel"], {"unet": 0.8, "text_encoder": 0.4})
    stack.add("ink", files["ink"])
    assert np.array_equal(np.asarray(stack.generate(PROMPT, steps=3, seed=5)), a)
    assert run(capsys, "generate", PROMPT, *common, "--size", "96x64", "-o", tmp_path / "w.png")[0] == 0
    assert Image.open(tmp_path / "w.png").size == (96, 64)


def test_generate_sweep_grid(files, capsys, tmp_path):
    code, out, _ = run(capsys, "generate", PROMPT, "--adapter", files["pastel"], "--adapter", files["ink"], "--base",
                       files["base"], "--steps", 2, "--sweep", "0,0.5,1", "-o", tmp_path / "grid.png")
    assert code == 0 and "(2 adapters x 3 strengths)" in out
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[1] == 18 + 2 * (128 + 2) and grid.size[0] > 3 * (128 + 2)


@pytest.mark.parametrize("args, message", [
    (["--adapter", "pastel.safetensors:strong"], "malformed adapter 'pastel.safetensors:strong'"),
    (["--adapter", "nothere.safetensors:0.5"], "adapter file nothere.safetensors does not exist"),
    (["<lora:pastel:strong>"], "malformed prompt tag <lora:pastel:strong>"),
    (["<lora:missing>"], "no .*missing.safetensors"),
    (["--size", "60x64"], "bad --size '60x64'"),
    (["--sweep", "0,1"], "--sweep varies adapter strengths"),
])
def test_generate_errors_are_one_line(files, capsys, tmp_path, args, message):
    prompt = [a for a in args if a.startswith("<")] or [PROMPT]
    flags = [a for a in args if not a.startswith("<")]
    code, out, err = run(capsys, "generate", *prompt, *flags, "--base", files["base"], "--adapters-dir",
                         files["root"] / "adapters", "-o", tmp_path / "x.png")
    assert code == 2 and err.startswith("stylelora: error: ") and err.count("\n") == 1, err
    assert re.search(message, err) and not (tmp_path / "x.png").exists()


def test_inspect_json_refuses_non_finite_numbers(files, capsys, monkeypatch):
    import stylelora.adapters

    real = stylelora.adapters.describe
    monkeypatch.setattr(stylelora.adapters, "describe", lambda ad: {**real(ad), "training": {"lr": float("nan")}})
    code, out, err = run(capsys, "inspect", files["pastel"], "--json")
    assert code == 2 and out == ""
    assert re.fullmatch(r"stylelora: error: \S+pastel\S*: cannot print as JSON \(Out of range float values are not "
                        r"JSON compliant[^)]*\): run inspect without --json\n", err), err


@pytest.mark.parametrize("scale", ["1e+300", "1e+40"], ids=["factors-overflow", "update-overflows"])
def test_merge_refuses_scales_past_float32_naming_the_files_and_scales(files, capsys, tmp_path, scale):
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "merge", f"{files['pastel']}:{scale}", f"{files['ink']}:{scale}", "-o", out)
    assert code == 2 and err.count("\n") == 1 and "cannot merge " in err and "diverged" not in err
    assert re.search(rf"pastel\.safetensors at scale {re.escape(scale)}(, \S*ink\.safetensors at scale "
                     rf"{re.escape(scale)})? add up to a weight update past float32 \(NaN/inf\): lower the scales\n",
                     err), err
    assert not (tmp_path / "m.safetensors").exists()
