"""The file `stylelora train` writes by default (kohya layout) loads unchanged in diffusers, ComfyUI,
A1111 and sd-scripts, and every file stylelora wrote before still loads.

- diffusers: its own loader is the oracle (load_lora_weights + set_adapters, same image as stylelora).
- ComfyUI, A1111, sd-scripts: not installable here, so their key-naming rules are written out below
  from their sources (the files are named at each rule) and applied to the real modules of an
  SD1.5-layout pipeline: every module of the default file must land on one.
- sd-scripts' own networks/lora.py was also run once on a kohya export (outside this suite,
  recorded in /work/shared/FACTS.md): it created every module and merged to identical weights.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stylelora.adapters import (Adapter, LoraFactors, adapter_from_pipeline, load_adapter, resolve_module,
                                save_adapter, stylelora_metadata)
from stylelora.blend import AdapterStack, Scale
from stylelora.cli import main
from stylelora.config import TrainConfig
from stylelora.lora import inject, text_encoder_targets, unet_targets
from stylelora.train import train
from stylelora.world.render import render_batch, styled_caption

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red star on a white background, outline"
GEN = dict(steps=4, guidance=5.0, seed=3, output_type="np")


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def modules_of(path) -> set[str]:
    """The file's kohya module names, checked to come as lora_down + lora_up + alpha each."""
    keys = set(read(path)[0])
    names = {k.split(".", 1)[0] for k in keys}
    assert keys == {f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    return names


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six captioned images at the top and four in a kohya repeat folder (2_extra)."""
    root = tmp_path_factory.mktemp("outline_set")
    (root / "2_extra").mkdir()
    for i, (scene, img) in enumerate(render_batch(10, 7, "flat", "outline")):
        folder = root if i < 6 else root / "2_extra"
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(styled_caption(scene, "flat", "outline"))
    return root


def train_default(base, dataset, out: Path) -> Path:
    """`stylelora train` with its defaults (layout, targets, text encoder, rank), only short: 3 steps
    at a learning rate high enough that the adapter visibly changes the image."""
    return train(TrainConfig(dataset=str(dataset), out=str(out), base=str(base), steps=3, batch_size=4,
                             lr=0.05, te_lr=0.05, warmup_steps=0, sample_every=0, checkpoint_every=0,
                             progress=False, log_every=1, device="cpu"))


@pytest.fixture(scope="module")
def trained(tiny_base, dataset, tmp_path_factory) -> Path:
    return train_default(tiny_base, dataset, tmp_path_factory.mktemp("trained") / "style.safetensors")


def mixed_adapter(pipe) -> Adapter:
    """Default targets with per-layer ranks 2..4 and alphas 1 / 3 / 8, as a merge can produce."""
    keys = (["unet." + k for k in unet_targets(pipe.unet, "attn-ff")]
            + ["text_encoder." + k for k in text_encoder_targets(pipe.text_encoder)])
    g = torch.Generator().manual_seed(5)
    layers = {}
    for i, key in enumerate(keys):
        out, inp = resolve_module(pipe, key).weight.shape
        rank, alpha = 2 + i % 3, (1.0, 3.0, 8.0)[i % 3]
        layers[key] = LoraFactors(torch.randn(rank, inp, generator=g) / inp ** 0.5,
                                  torch.randn(out, rank, generator=g) * 0.5 / alpha, alpha)
    return Adapter(layers, stylelora_metadata(trigger_words=["outline"]))


# --- 1. diffusers, the oracle --------------------------------------------------------------------

@pytest.mark.parametrize("which", ["trained", "mixed alphas and ranks"])
def test_plain_diffusers_draws_what_stylelora_draws(which, trained, tiny_random_pipe, tmp_path):
    path = trained if which == "trained" else save_adapter(mixed_adapter(tiny_random_pipe), tmp_path / "m.safetensors")
    adapter = load_adapter(path)
    stack = AdapterStack(copy.deepcopy(tiny_random_pipe))
    base = stack.generate(PROMPT, **GEN)
    stack.add("style", path, Scale(1.0, 1.0, raw=True))
    ours = stack.generate(PROMPT, **GEN)

    pipe = copy.deepcopy(tiny_random_pipe)  # a fresh copy, nothing of stylelora's in it
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], [1.0])
    loaded = {f"{comp}.{name.removeprefix('text_model.')}" for comp in ("unet", "text_encoder")
              for name, m in getattr(pipe, comp).named_modules() if "style" in getattr(m, "lora_A", {})}
    assert loaded == set(adapter.layers)  # diffusers found every module, ff included
    oracle = pipe(PROMPT, num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance"], output_type="np",
                  generator=torch.Generator("cpu").manual_seed(GEN["seed"])).images[0]
    assert np.abs(ours - base).max() > 1e-2  # the adapter changes the picture, so the match means something
    assert np.abs(ours - oracle).max() <= 1e-4


# --- 2. ComfyUI, A1111 and sd-scripts: their key rules over the real modules ----------------------

# ComfyUI, comfy/utils.py unet_to_diffusers (TRANSFORMER_BLOCKS, UNET_MAP_ATTENTIONS): the diffusers
# UNet weights it knows inside an attention; comfy/lora.py model_lora_keys_unet names each one
# `lora_unet_` + its diffusers path (".weight" dropped) with "_" for ".".
COMFY_TRANSFORMER_BLOCK = {"norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
COMFY_ATTENTION = {"proj_in", "proj_out", "norm"}
# comfy/lora.py LORA_CLIP_MAP and model_lora_keys_clip: CLIP layer b (b < 32) of clip_l (SD1) or
# clip_h (SD2) is `lora_te_text_model_encoder_layers_{b}_` + one of these.
COMFY_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.q_proj": "self_attn_q_proj",
              "self_attn.k_proj": "self_attn_k_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}


def text_modules(pipe) -> set[str]:
    """CLIP module paths as transformers 4 names them (with `text_model.`), which every peer expects."""
    return {n if n.startswith("text_model.") else "text_model." + n for n, _ in pipe.text_encoder.named_modules() if n}


def comfyui_names(pipe) -> set[str]:
    attention = re.compile(r"^(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\."
                           r"(?:transformer_blocks\.\d+\.(?P<block>.+)|(?P<own>[^.]+))\.weight$")
    unet = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in pipe.unet.state_dict()
            if (m := attention.match(k)) and (m["block"] in COMFY_TRANSFORMER_BLOCK or m["own"] in COMFY_ATTENTION)}
    clip = {f"{prefix}_text_model_encoder_layers_{b}_{name}" for b in range(32) for path, name in COMFY_CLIP.items()
            for prefix in ("lora_te", "lora_te1")  # clip_l also answers to SDXL's lora_te1_
            if f"text_model.encoder.layers.{b}.{path}" in text_modules(pipe)}
    return unet | clip


def a1111_compvis(name: str) -> str:
    """A1111, extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (SD1 branch): the
    diffusers-style kohya name -> A1111's own (LDM) module name. Its block arithmetic is SD's: 3 LDM
    input/output blocks per level (2 resnets + a sampler), so it holds for SD 1.x/2.x layouts."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    if m := re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        level, j, rest = int(m[2]), int(m[4]), m[5]
        block = 1 + 3 * level + j if m[1] == "down" else 3 * level + j
        rest = resnet.get(rest, rest) if m[3] == "resnets" else rest
        return f"diffusion_model_{'input' if m[1] == 'down' else 'output'}_blocks_{block}_{int(m[3] == 'attentions')}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        slot = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"diffusion_model_middle_block_{slot}_{resnet.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if name.startswith("lora_te1_text_model_"):  # load_network's fallback: "some SD1 Loras" spell it so
        return "transformer_text_model_" + name.removeprefix("lora_te1_text_model_")
    return name  # (conv_in/out, time embedding and samplers have rules too; no default target is there)


def a1111_modules(single_file: Path) -> set[str]:
    """A1111 names the modules of its LDM model (`model.diffusion_model.…`) and of the CLIP wrapper
    (`cond_stage_model.transformer.…`) by their paths with "_" (networks.py
    assign_network_names_to_compvis_modules); the LDM paths are those of the single-file checkpoint
    stylelora exports (base.save_single_file, checked against diffusers' from_single_file)."""
    with safe_open(str(single_file), "pt") as f:
        keys = [k.removesuffix(".weight") for k in f.keys() if k.endswith(".weight")]
    return {k.removeprefix("model.").removeprefix("cond_stage_model.").replace(".", "_") for k in keys}


def a1111_maps(name: str, modules: set[str]) -> bool:
    """networks.py load_network: the converted name, else (SD2's fused attention) without _q/_k/_v_proj."""
    key = a1111_compvis(name)
    return key in modules or bool((m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in modules)


def sd_scripts_names(pipe) -> set[str]:
    """sd-scripts, networks/lora.py LoRANetwork.create_modules: inside every module of class
    Transformer2DModel (UNet) or CLIPAttention / CLIPSdpaAttention / CLIPMLP (text encoder), each
    Linear or Conv2d child becomes a LoRA named `lora_unet` / `lora_te` + "." + module path + "." +
    child path, "." replaced by "_". Text-encoder paths as under transformers 4, which it pins."""
    names = set()
    for prefix, model, classes in (("lora_unet", pipe.unet, {"Transformer2DModel"}),
                                   ("lora_te", pipe.text_encoder, {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})):
        for path, module in model.named_modules():
            if type(module).__name__ not in classes:
                continue
            path = path if prefix == "lora_unet" or path.startswith("text_model.") else "text_model." + path
            names |= {f"{prefix}.{path}.{child}".replace(".", "_") for child, sub in module.named_modules()
                      if type(sub).__name__ in ("Linear", "Conv2d")}
    return names


def sd15_layout_pipe():
    spec = importlib.util.spec_from_file_location("bench_blend", ROOT / "bench" / "blend.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.sd15_pipe(smoke=True)  # SD1.5's layout (4 levels, 2 layers per block, 12 CLIP layers), narrow


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A clean SD1.5-layout pipeline and the default adapter file for it: LoRA injected where
    `stylelora train` puts it by default, snapshotted and written as train() does."""
    folder = tmp_path_factory.mktemp("sd15")
    pipe = sd15_layout_pipe()
    work, cfg = copy.deepcopy(pipe), TrainConfig()
    inject(work.unet, unet_targets(work.unet, cfg.targets), cfg.rank, cfg.alpha or cfg.rank)
    if cfg.train_text_encoder:
        inject(work.text_encoder, text_encoder_targets(work.text_encoder), cfg.rank, cfg.alpha or cfg.rank)
    return pipe, save_adapter(adapter_from_pipeline(work), folder / "sd15.safetensors")


def test_every_module_of_the_default_file_maps_in_comfyui_a1111_and_sd_scripts(sd15, tmp_path):
    from stylelora.base import save_single_file

    pipe, path = sd15
    names = modules_of(path)
    # The default targets, all present: self- and cross-attention, feed-forward, CLIP q/k/v/out.
    for part in ("attn1_to_q", "attn2_to_k", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2", "self_attn_out_proj"):
        assert any(n.endswith(part) for n in names), part
    assert len(names) == len(load_adapter(path).layers) > 100
    a1111 = a1111_modules(save_single_file(pipe, tmp_path / "sd15.safetensors"))
    unmapped = {"ComfyUI": names - comfyui_names(pipe),
                "A1111": {n for n in names if not a1111_maps(n, a1111)},
                "sd-scripts": names - sd_scripts_names(pipe)}
    assert unmapped == {"ComfyUI": set(), "A1111": set(), "sd-scripts": set()}


def test_the_rules_refuse_near_miss_names(sd15, tmp_path):
    """The rules can fail: CLIP names without `text_model_` (what naming transformers 5's modules
    gives), a CLIP layer past the last, and a UNet module that does not exist map in none of the
    three. (SDXL's `lora_te1_` spelling of SD1's CLIP does map in ComfyUI and A1111, not sd-scripts.)"""
    from stylelora.base import save_single_file

    pipe, path = sd15
    te = sorted(n for n in modules_of(path) if n.startswith("lora_te_"))
    assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    near_misses = ({n.replace("lora_te_text_model_", "lora_te_") for n in te[:4]}
                   | {"lora_te_text_model_encoder_layers_12_self_attn_q_proj",
                      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q"})
    a1111 = a1111_modules(save_single_file(pipe, tmp_path / "sd15.safetensors"))
    assert not near_misses & comfyui_names(pipe)
    assert not near_misses & sd_scripts_names(pipe)
    assert not any(a1111_maps(n, a1111) for n in near_misses)
    te1 = {n.replace("lora_te_", "lora_te1_") for n in te}
    assert te1 <= comfyui_names(pipe) and all(a1111_maps(n, a1111) for n in te1) and not te1 & sd_scripts_names(pipe)
    # The diffusers/PEFT layout: sd-scripts (create_network_from_weights) and A1111 (load_network) take
    # a key's module name as its text before the first ".", which is then "unet" or "text_encoder".
    old = save_adapter(load_adapter(path), tmp_path / "old.safetensors", layout="diffusers")
    assert {k.split(".", 1)[0] for k in read(old)[0]} == {"unet", "text_encoder"}
    assert not {"unet", "text_encoder"} & sd_scripts_names(pipe) and not a1111_maps("unet", a1111)


def test_diffusers_loads_every_module_on_the_sd15_layout(sd15):
    pipe, path = sd15
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(path), adapter_name="style")
    loaded = [n for c in ("unet", "text_encoder") for n, m in getattr(pipe, c).named_modules()
              if "style" in getattr(m, "lora_A", {})]
    assert len(loaded) == len(modules_of(path))


# --- 3. what the file says about itself: ss_* as sd-scripts writes them, stylelora.* kept -----------

def a1111_version(metadata: dict[str, str]) -> str:
    """A1111, extensions-builtin/Lora/network.py NetworkOnDisk.detect_version: what it lists a LoRA
    as (and, unless "show all" is on, hides it when another SD version is loaded)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if metadata.get("ss_v2", "") == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.fixture(scope="module")
def sd2_trained(tiny_random_pipe, dataset, tmp_path_factory) -> Path:
    """The default training on a tiny SD 2.x-like base: a text encoder as wide as SD2's OpenCLIP
    ViT-H (1024, what tells SD2 apart), linear attention projections, v-prediction, zero-terminal SNR."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, folder = tiny_random_pipe.tokenizer, tmp_path_factory.mktemp("sd2")
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=16, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                                attention_head_dim=8, use_linear_projection=True)
    sched = type(tiny_random_pipe.scheduler).from_config(tiny_random_pipe.scheduler.config,
                                                         prediction_type="v_prediction", rescale_betas_zero_snr=True)
    StableDiffusionPipeline(copy.deepcopy(tiny_random_pipe.vae), te, tok, unet, sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder / "base")
    return train_default(folder / "base", dataset, folder / "sd2.safetensors")


def test_sd2_files_say_v2_and_v_prediction_sd1_files_do_not(trained, sd2_trained, tmp_path):
    sd1, sd2 = read(trained)[1], read(sd2_trained)[1]
    assert (sd1["ss_v2"], sd1["ss_base_model_version"], sd1["ss_v_parameterization"]) == ("False", "sd_v1", "False")
    assert (sd2["ss_v2"], sd2["ss_base_model_version"], sd2["ss_v_parameterization"]) == ("True", "sd_v2_v", "True")
    assert sd2["ss_zero_terminal_snr"] == "True" and sd1["ss_zero_terminal_snr"] == "False"
    assert (a1111_version(sd1), a1111_version(sd2)) == ("SD1", "SD2")
    # A merge of SD2 files stays an SD2 file; so does an SD2-wide file of the old layout, converted.
    merged = tmp_path / "merged.safetensors"
    main(["merge", f"{sd2_trained}:0.5", f"{sd2_trained}:0.5", "--raw-scale", "-o", str(merged)])
    assert read(merged)[1]["ss_v2"] == "True" and read(merged)[1]["ss_output_name"] == "merged"
    wide = Adapter({"text_encoder.encoder.layers.0.self_attn.q_proj": LoraFactors(torch.ones(2, 1024), torch.ones(1024, 2), 2.0)})
    old = save_adapter(wide, tmp_path / "old.safetensors", layout="diffusers")
    assert "ss_v2" not in read(old)[1]
    main(["convert", str(old), "--to", "kohya", "-o", str(tmp_path / "new.safetensors")])
    assert a1111_version(read(tmp_path / "new.safetensors")[1]) == "SD2"


def test_the_trained_file_carries_sd_scripts_metadata_and_keeps_stylelora_s(trained, dataset, tmp_path_factory):
    tensors, meta = read(trained)
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "4.0")
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {4.0}
    assert (meta["ss_output_name"], meta["ss_resolution"], meta["ss_steps"]) == ("style", "(64, 64)", "3")
    assert float(meta["ss_learning_rate"]) == 0.05 and meta["ss_sd_model_name"] == Path(meta["stylelora.base_name"]).name
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert json.loads(meta["ss_dataset_dirs"]) == {dataset.name: {"n_repeats": 1, "img_count": 6},
                                                   "2_extra": {"n_repeats": 2, "img_count": 4}}
    tags = json.loads(meta["ss_tag_frequency"])
    assert (tags[dataset.name]["outline"], tags["2_extra"]["outline"]) == (6, 4)
    assert not [k for k, v in meta.items() if str(tmp_path_factory.getbasetemp()) in v]  # no local paths
    # sshs_model_hash is what A1111 computes for the file itself: sha256 of the bytes after the header.
    data = trained.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])
    for key in ("format_version", "rank", "alpha", "targets", "base_name", "base_fingerprint", "trigger_words",
                "training", "dataset"):
        assert "stylelora." + key in meta, key
    assert "lora_adapter_metadata" not in meta  # diffusers would read it as the LoraConfig of kohya keys


def test_strength_map_and_other_metadata_survive_both_layouts(tmp_path):
    from stylelora.strength import MAP_KEY, read_map

    points = [[0.0, 0.0], [0.5, 0.62], [1.0, 1.0]]
    ad = Adapter({"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": LoraFactors(
        torch.randn(2, 8), torch.randn(8, 2), 2.0)}, {MAP_KEY: json.dumps(points), "ss_tag_frequency": '{"a": {"b": 1}}',
                                                     **stylelora_metadata(trigger_words=["pastel"])})
    for layout in ("kohya", "diffusers"):
        back = load_adapter(save_adapter(ad, tmp_path / f"{layout}.safetensors", layout=layout))
        assert read_map(back.metadata, "x") == points and back.trigger_words == ["pastel"]
        assert back.metadata["ss_tag_frequency"] == '{"a": {"b": 1}}'
        assert ("ss_network_module" in back.metadata) == (layout == "kohya")


# --- 4. backward compatibility: format version 1's diffusers/PEFT layout ------------------------------

def write_v1_file(adapter: Adapter, path: Path) -> Path:
    """A file exactly as stylelora wrote them before kohya became the default (format version 1):
    PEFT keys, CLIP under text_model., alpha in diffusers' LoraConfig metadata, written by hand here."""
    from safetensors.torch import save_file

    tensors, config = {}, {}
    for comp in ("unet", "text_encoder"):
        layers = {k.split(".", 1)[1]: l for k, l in adapter.layers.items() if k.startswith(comp + ".")}
        for module, layer in layers.items():
            name = f"{comp}.text_model.{module}" if comp == "text_encoder" else f"{comp}.{module}"
            tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = layer.down, layer.up.contiguous()
        r, alpha = 4, 3.0  # the most common in mixed_adapter; the rest go to the patterns
        config |= {f"{comp}.r": r, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": sorted(layers),
                   f"{comp}.rank_pattern": {m: l.rank for m, l in layers.items() if l.rank != r},
                   f"{comp}.alpha_pattern": {m: l.alpha for m, l in layers.items() if l.alpha != alpha}}
    save_file(tensors, str(path), metadata={"format": "pt", "stylelora.format_version": "1",
                                            "stylelora.targets": json.dumps(list(adapter.layers)),
                                            "lora_adapter_metadata": json.dumps(config)})
    return path


def test_format_version_1_files_still_load_with_identical_layers(tiny_random_pipe, tmp_path):
    ad = mixed_adapter(tiny_random_pipe)
    back = load_adapter(write_v1_file(ad, tmp_path / "v1.safetensors"))
    assert back.source_format == "stylelora" and list(back.layers) == list(ad.layers)
    for key, layer in ad.layers.items():
        got = back.layers[key]
        assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up) and got.alpha == layer.alpha
    # The same adapter in the new default layout: the same updates (alphas folded into the up weights).
    new = load_adapter(save_adapter(ad, tmp_path / "new.safetensors"))
    assert new.source_format == "kohya" and list(new.layers) == list(ad.layers)
    for key, layer in ad.layers.items():
        torch.testing.assert_close(new.layers[key].delta(), layer.delta(), rtol=1e-6, atol=1e-7)


def test_convert_to_diffusers_still_writes_the_old_layout(trained, tmp_path):
    out = tmp_path / "d.safetensors"
    main(["convert", str(trained), "--to", "diffusers", "-o", str(out)])
    tensors, meta = read(out)
    assert all(re.fullmatch(r"(unet|text_encoder\.text_model)\..+\.lora_[AB]\.weight", k) for k in tensors)
    assert meta["stylelora.format_version"] == "1" and "lora_adapter_metadata" in meta
    a, b = load_adapter(trained), load_adapter(out)
    assert b.source_format == "stylelora" and list(a.layers) == list(b.layers)
    for key in a.layers:
        assert torch.equal(a.layers[key].down, b.layers[key].down) and torch.equal(a.layers[key].up, b.layers[key].up)
        assert a.layers[key].alpha == b.layers[key].alpha


def test_diffusers_reads_kohya_clip_layers_only_with_an_out_proj_among_them(tiny_random_pipe, tmp_path):
    """A diffusers 0.42 limit the default file stays clear of: it tells a kohya file's CLIP part by a
    `to_out_lora` key (utils/state_dict_utils.py convert_state_dict_to_diffusers), so CLIP q/v layers
    without an out_proj fail to load. stylelora's text-encoder LoRA always includes out_proj; this
    test notes the limit (README, Interoperability) and fails once diffusers lifts it."""
    te = "text_encoder.encoder.layers.0.self_attn."
    layers = {te + p: LoraFactors(torch.randn(2, 64), torch.randn(64, 2), 2.0) for p in ("q_proj", "v_proj")}
    assert all(any(k.endswith(p) for k in text_encoder_targets(tiny_random_pipe.text_encoder))
               for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    pipe = copy.deepcopy(tiny_random_pipe)
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        pipe.load_lora_weights(str(save_adapter(Adapter(layers), tmp_path / "qv.safetensors")), adapter_name="qv")
    layers[te + "out_proj"] = LoraFactors(torch.randn(2, 64), torch.randn(64, 2), 2.0)
    pipe = copy.deepcopy(tiny_random_pipe)
    pipe.load_lora_weights(str(save_adapter(Adapter(layers), tmp_path / "qvo.safetensors")), adapter_name="qvo")
    assert sum("qvo" in getattr(m, "lora_A", {}) for m in pipe.text_encoder.modules()) == 3


def test_sdxl_adapters_are_written_with_sd_scripts_sdxl_names(tmp_path, tiny_xl_pipe):
    """SDXL's kohya layout: SAI UNet block names (counted with the base's layers per block, recorded in
    the file), lora_te1_ for CLIP-L, lora_te2_ for bigG; read back to the same updates. A UNet-only
    SDXL adapter is recognised by sd-scripts' SDXL version string."""
    from stylelora.adapters import XL_LAYERS_KEY, base_metadata, load_adapter

    meta = base_metadata(tiny_xl_pipe)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta[XL_LAYERS_KEY] == "1"
    layers = {"text_encoder_2.encoder.layers.0.self_attn.q_proj": LoraFactors(torch.randn(2, 40), torch.randn(40, 2), 2.0),
              "text_encoder.encoder.layers.1.mlp.fc1": LoraFactors(torch.randn(2, 24), torch.randn(96, 2), 2.0),
              "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                  LoraFactors(torch.randn(2, 64), torch.randn(128, 2), 2.0),
              "unet.up_blocks.1.attentions.1.proj_out": LoraFactors(torch.randn(2, 64), torch.randn(64, 2), 2.0)}
    for ad in (Adapter(dict(layers), dict(meta)), Adapter({k: v for k, v in layers.items() if k.startswith("unet.")},
                                                         dict(meta))):
        path = save_adapter(ad, tmp_path / "xl.safetensors")
        names = {k.split(".")[0] for k in read(path)[0]}
        want = {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k", "lora_unet_output_blocks_3_1_proj_out"}
        if len(ad.layers) == 4:
            want |= {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_1_mlp_fc1"}
        assert names == want
        back = load_adapter(path)
        assert set(back.layers) == set(ad.layers)
        assert all(torch.allclose(back.layers[k].delta(), ad.layers[k].delta()) for k in ad.layers)


def test_an_adapter_for_the_other_architecture_is_one_clear_error(tmp_path, tiny_xl_pipe, tiny_random_pipe):
    from stylelora.adapters import base_metadata, check_fits

    xl = Adapter({"text_encoder_2.encoder.layers.0.self_attn.q_proj": LoraFactors(torch.ones(2, 40), torch.ones(40, 2), 2.0)})
    with pytest.raises(ValueError, match="is an SDXL LoRA .* this base is SD 1.x/2.x: load it on an SDXL base"):
        check_fits(xl, tiny_random_pipe)
    sd1 = Adapter({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                   LoraFactors(torch.ones(2, 64), torch.ones(64, 2), 2.0)}, base_metadata(tiny_random_pipe))
    with pytest.raises(ValueError, match="is an SD 1.x/2.x LoRA .* this base is SDXL: load it on an SD 1.x/2.x base"):
        check_fits(sd1, tiny_xl_pipe)


def test_sdxl_kohya_files_with_diffusers_style_unet_names_load(tmp_path):
    """Some SDXL trainers name UNet modules the diffusers way (lora_unet_down_blocks_...) beside
    lora_te1_/lora_te2_: those read to the same layers as the SAI spelling."""
    from safetensors.torch import save_file

    from stylelora.adapters import load_adapter

    torch.manual_seed(0)
    names = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
             "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
             "lora_te1_text_model_encoder_layers_1_self_attn_out_proj": "text_encoder.encoder.layers.1.self_attn.out_proj",
             "lora_te2_text_model_encoder_layers_0_mlp_fc2": "text_encoder_2.encoder.layers.0.mlp.fc2"}
    tensors = {}
    for name in names:
        tensors |= {f"{name}.lora_down.weight": torch.randn(2, 16), f"{name}.lora_up.weight": torch.randn(8, 2),
                    f"{name}.alpha": torch.tensor(1.0)}
    save_file(tensors, str(tmp_path / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    ad = load_adapter(tmp_path / "xl.safetensors")
    assert {names[k] for k in names} == set(ad.layers)
    for name, key in names.items():
        want = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] * 0.5
        assert torch.allclose(ad.layers[key].delta(), want)
