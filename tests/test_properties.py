"""Property-based tests (hypothesis): the caption processor, the A1111 `<lora:NAME:SCALE>` prompt
parser, and adapter key parsing (PEFT/diffusers keys <-> kohya keys) for generated module paths.

test_data.py already checks shuffle without a trigger and test_adapters.py round-trips deltas for
the tiny base's own layers; these add triggers, dropout and idempotence, the prompt parser, and
module paths of any SD-shaped UNet / CLIP (multi-digit indices, conv layers, bare-key files).
"""

from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from stylelora.adapters import Adapter, LoraFactors, export_kohya, load_adapter, save_adapter
from stylelora.blend import parse_prompt_loras
from stylelora.data import CaptionProcessor, split_tags

# ----------------------------------------------------------------------------- captions

tag = st.text(st.characters(blacklist_characters=",", blacklist_categories=("Cs",)), min_size=1,
              max_size=8).map(str.strip).filter(bool)
tags = st.lists(tag, max_size=10)
triggers = st.lists(st.one_of(tag, st.sampled_from(["neon", "outline", "a"])), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(caption=tags, trigger=st.one_of(st.none(), triggers), shuffle=st.booleans(), k=st.integers(0, 12),
       seed=st.integers(0, 2**32))
def test_caption_processor_keeps_tags_fixes_the_first_n_and_adds_the_trigger_once(caption, trigger, shuffle, k, seed):
    proc = CaptionProcessor(", ".join(trigger) if trigger else None, shuffle=shuffle, keep_tokens=k)
    out = proc(", ".join(caption), random.Random(seed))
    got = split_tags(out)
    added = list(dict.fromkeys(t for t in trigger or [] if t not in caption))
    # the multiset: the caption's tags, plus each trigger tag the caption lacks, exactly once
    assert Counter(got) == Counter(caption) + Counter(added)
    for t in trigger or []:
        assert got.count(t) == max(1, caption.count(t))
    # the fixed prefix: missing trigger tags first, then the caption's first k, in order
    fixed = added + caption[:k]
    assert got[: len(fixed)] == fixed
    if not shuffle:
        assert got == added + caption
    assert proc(", ".join(caption), random.Random(seed)) == out  # a pure function of the rng
    # idempotent without shuffle: a processed caption already has its trigger
    plain = CaptionProcessor(proc.trigger)
    once = plain(", ".join(caption), random.Random(0))
    assert plain(once, random.Random(0)) == once


@settings(max_examples=100, deadline=None)
@given(caption=tags, dropout=st.floats(0.01, 0.99), seed=st.integers(0, 2**32))
def test_caption_dropout_gives_all_or_nothing(caption, dropout, seed):
    proc = CaptionProcessor("neon", shuffle=True, keep_tokens=1, dropout=dropout)
    out = proc(", ".join(caption), random.Random(seed))
    assert out == "" or Counter(split_tags(out)) == Counter(caption) + Counter([] if "neon" in caption else ["neon"])


# ----------------------------------------------------------------------------- <lora:NAME:SCALE>

# Names: what a file stem may hold that the tag syntax allows (no ':', '<', '>', '/', '\\').
name = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-. "), min_size=1,
               max_size=12).filter(lambda s: s.strip(" ") == s and s not in (".", ".."))
scale = st.one_of(st.none(), st.floats(-10, 10, allow_nan=False), st.integers(-3, 3))
word = st.text(st.characters(whitelist_categories=("L", "N", "P"), blacklist_characters="<>,"), min_size=1,
               max_size=8)
segment = st.one_of(st.tuples(st.just("tag"), name, scale), st.tuples(st.just("word"), word))


def _tag(n: str, s) -> str:
    return f"<lora:{n}>" if s is None else f"<lora:{n}:{s!r}>"


@settings(max_examples=200, deadline=None)
@given(segments=st.lists(segment, max_size=8))
def test_prompt_tags_round_trip(segments):
    with tempfile.TemporaryDirectory() as d:
        for seg in segments:
            if seg[0] == "tag":
                (Path(d) / f"{seg[1]}.safetensors").write_bytes(b"")
        prompt = " ".join(_tag(seg[1], seg[2]) if seg[0] == "tag" else seg[1] for seg in segments)
        clean, found = parse_prompt_loras(prompt, d)
    assert clean == " ".join(seg[1] for seg in segments if seg[0] == "word")
    weights = [1.0 if seg[2] is None else float(seg[2]) for seg in segments if seg[0] == "tag"]
    assert found == [(Path(d) / f"{seg[1]}.safetensors", {"unet": w, "text_encoder": w})
                     for seg, w in zip([seg for seg in segments if seg[0] == "tag"], weights)]
    assert "<lora:" not in clean


def _not_a_number(s: str) -> bool:
    try:
        return not math.isfinite(float(s))
    except ValueError:
        return True


finite = st.floats(-10, 10, allow_nan=False)
bad_body = st.one_of(
    scale.map(lambda s: "" if s is None else f":{s!r}"),  # no name
    # scale not a finite number (':' and '=' start the TE:UNET and te=/unet= forms, below)
    st.tuples(name, st.text(st.characters(blacklist_characters="<>:="), min_size=1, max_size=8)
              .filter(_not_a_number)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(name, st.lists(finite, min_size=3, max_size=5)).map(  # more than TE:UNET
        lambda t: ":".join([t[0], *map(repr, t[1])])),
    st.tuples(name, st.sampled_from(["te", "unet"]), st.sampled_from(["", "x", "nan", "inf", "1:"])).map(
        lambda t: f"{t[0]}:{t[1]}={t[2]}"),  # a named weight that is not a finite number
    st.tuples(name, finite, st.sampled_from(["", "x", "nan", "-inf"])).map(
        lambda t: f"{t[0]}:{t[1]!r}:{t[2]}"),  # TE:UNET with UNET not a finite number
    st.tuples(name, st.sampled_from(["clip", "dyn", "TE", "model", ""]), finite).map(
        lambda t: f"{t[0]}:{t[1]}={t[2]!r}"),  # an unknown key
    st.tuples(name, st.sampled_from(["nan", "inf", "-inf", "1e999"])).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(name, st.sampled_from(["/", "\\"]), name).map("".join),  # a path, not a stem
)


@settings(max_examples=200, deadline=None)
@given(body=bad_body, before=st.lists(word, max_size=3), after=st.lists(word, max_size=3))
def test_malformed_prompt_tags_raise_value_error(body, before, after):
    prompt = " ".join([*before, f"<lora:{body}>", *after])
    with tempfile.TemporaryDirectory() as d:  # empty: a tag that passed validation would raise FileNotFoundError
        with pytest.raises(ValueError, match=r"(?s)malformed prompt tag <lora:.*use <lora:NAME> or <lora:NAME:SCALE>"):
            parse_prompt_loras(prompt, d)


@settings(max_examples=100, deadline=None)
@given(n=name, s=scale, before=st.lists(word, max_size=3))
def test_unclosed_prompt_tags_raise_value_error(n, s, before):
    prompt = " ".join([*before, _tag(n, s)[:-1]])
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(ValueError, match=r"unclosed <lora:\.\.\.> tag"):
            parse_prompt_loras(prompt, d)


# ----------------------------------------------------------------------------- adapter keys

idx = st.integers(0, 15)
attn = st.tuples(st.sampled_from(["down_blocks.{}.attentions.{}", "up_blocks.{}.attentions.{}"]), idx, idx).map(
    lambda t: t[0].format(t[1], t[2])) | st.just("mid_block.attentions.0")
linear_module = st.one_of(
    st.tuples(attn, idx, st.sampled_from(["attn1", "attn2"]), st.sampled_from(["to_q", "to_k", "to_v", "to_out.0"]))
    .map(lambda t: f"unet.{t[0]}.transformer_blocks.{t[1]}.{t[2]}.{t[3]}"),
    st.tuples(attn, idx, st.sampled_from(["ff.net.0.proj", "ff.net.2"]))
    .map(lambda t: f"unet.{t[0]}.transformer_blocks.{t[1]}.{t[2]}"),
    st.tuples(attn, st.sampled_from(["proj_in", "proj_out"])).map(lambda t: f"unet.{t[0]}.{t[1]}"),
    st.tuples(st.sampled_from(["down_blocks", "up_blocks"]), idx, idx).map(
        lambda t: f"unet.{t[0]}.{t[1]}.resnets.{t[2]}.time_emb_proj"),
    st.sampled_from(["unet.time_embedding.linear_1", "unet.time_embedding.linear_2"]),
    st.tuples(idx, st.sampled_from(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                    "mlp.fc1", "mlp.fc2"])).map(lambda t: f"text_encoder.encoder.layers.{t[0]}.{t[1]}"),
)
conv_module = st.one_of(
    st.tuples(st.sampled_from(["down_blocks", "up_blocks"]), idx, idx, st.sampled_from(["conv1", "conv2",
                                                                                      "conv_shortcut"]))
    .map(lambda t: f"unet.{t[0]}.{t[1]}.resnets.{t[2]}.{t[3]}"),
    st.tuples(idx, st.sampled_from(["conv1", "conv2"])).map(lambda t: f"unet.mid_block.resnets.{t[0]}.{t[1]}"),
    st.tuples(st.sampled_from(["down_blocks.{}.downsamplers.0.conv", "up_blocks.{}.upsamplers.0.conv"]), idx)
    .map(lambda t: "unet." + t[0].format(t[1])),
    st.sampled_from(["unet.conv_in", "unet.conv_out"]),
)


@st.composite
def adapters(draw) -> Adapter:
    layers = {}
    for key in draw(st.lists(linear_module | conv_module, min_size=1, max_size=6, unique=True)):
        r, n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
        if ".conv" in key or key.endswith(("conv_in", "conv_out", "conv_shortcut")):
            k = draw(st.sampled_from([1, 3]))
            down, up = torch.randn(r, n_in, k, k, generator=g), torch.randn(n_out, r, 1, 1, generator=g)
        else:
            down, up = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
        layers[key] = LoraFactors(down, up, draw(st.sampled_from([float(r), 1.0, 0.5, 16.0])))
    return Adapter(layers)


def _same_layers(a: Adapter, b: Adapter, same_alpha: bool = True) -> None:
    """Same modules and updates; same factors and alphas too unless the file was kohya (one alpha for
    all layers there, each layer's ratio folded into its up weight: tolerance by the update's size)."""
    assert sorted(a.layers) == sorted(b.layers)
    for key, layer in a.layers.items():
        got = b.layers[key]
        assert got.shape == layer.shape and got.rank == layer.rank and torch.equal(got.down, layer.down), key
        assert got.alpha == layer.alpha or not same_alpha, key
        size = float(layer.delta().abs().max())
        torch.testing.assert_close(got.delta(), layer.delta(), rtol=1e-6, atol=1e-6 * max(1.0, size))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ad=adapters())
def test_module_keys_round_trip_through_kohya_names(ad):
    with tempfile.TemporaryDirectory() as d:
        kohya = export_kohya(ad, Path(d) / "k.safetensors")
        with safe_open(str(kohya), "pt") as f:
            names = {k.split(".")[0] for k in f.keys()}
        # one kohya module name per layer: '.' -> '_' in the module path, under lora_unet_ / lora_te_
        assert names == {("lora_unet_" + k.removeprefix("unet.") if k.startswith("unet.") else
                          "lora_te_text_model_" + k.removeprefix("text_encoder.")).replace(".", "_") for k in ad.layers}
        back = load_adapter(kohya)
        assert back.source_format == "kohya" and len({layer.alpha for layer in back.layers.values()}) == 1
        _same_layers(ad, back, same_alpha=False)
        # and back again: kohya -> ours -> kohya gives the same names and tensors
        again = export_kohya(back, Path(d) / "k2.safetensors")
        with safe_open(str(kohya), "pt") as f1, safe_open(str(again), "pt") as f2:
            assert set(f1.keys()) == set(f2.keys())
            for k in f1.keys():
                assert torch.equal(f1.get_tensor(k), f2.get_tensor(k)), k


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ad=adapters(), bare=st.booleans())
def test_module_keys_round_trip_through_peft_and_diffusers_names(ad, bare):
    with tempfile.TemporaryDirectory() as d:
        ours = load_adapter(save_adapter(ad, Path(d) / "ours.safetensors", layout="diffusers"))
        _same_layers(ad, ours)
        assert list(ours.layers) == list(ad.layers)  # order kept, though safetensors sorts keys
        # A raw PEFT state dict as `unet.save_lora_adapter` / transformers write it: unet keys bare
        # or prefixed, CLIP with or without `text_model.`; alpha from .alpha keys.
        raw = {}
        for key, layer in ad.layers.items():
            comp, module = key.split(".", 1)
            if comp == "unet":
                name = module if bare else key
            else:
                name = f"text_encoder.{'' if bare else 'text_model.'}{module}"
            raw |= {f"{name}.lora_A.weight": layer.down, f"{name}.lora_B.weight": layer.up,
                    f"{name}.alpha": torch.tensor(layer.alpha)}
        save_file(raw, Path(d) / "peft.safetensors")
        peft = load_adapter(Path(d) / "peft.safetensors")
        assert peft.source_format == "diffusers"
        _same_layers(ad, peft)


@settings(max_examples=60, deadline=None)
@given(module=linear_module | conv_module)
def test_module_path_is_what_check_fits_resolves(module):
    """Keys split into (component, module) exactly at the first dot, whatever the digits."""
    from stylelora.adapters import _file_key, _split

    comp, rest = _split(module)
    assert f"{comp}.{rest}" == module and comp in ("unet", "text_encoder")
    file_key = _file_key(module)
    assert file_key == (f"text_encoder.text_model.{rest}" if comp == "text_encoder" else module)
    with pytest.raises(ValueError, match="must look like 'unet.<module>', 'text_encoder.<module>' or "
                                         "'text_encoder_2.<module>'"):
        _split(rest)
