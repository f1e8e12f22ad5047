"""stylelora.adapters: the file format, diffusers/kohya interop, and the loader's refusals.

Everything runs on a random tiny StableDiffusionPipeline built in memory (no assets, no hub).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import pickle
import struct
import warnings
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from stylelora import adapters as A
from stylelora.adapters import (Adapter, LoraFactors, adapter_from_pipeline, check_fits, describe, export_kohya,
                                fingerprint, load_adapter, save_adapter, stylelora_metadata)

UNET_KEYS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
]
TE_KEYS = ["text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder.encoder.layers.1.self_attn.out_proj",
           "text_encoder.encoder.layers.1.mlp.fc1"]
ALL_KEYS = UNET_KEYS + TE_KEYS


def make_pipe(seed: int = 0):
    from diffusers import StableDiffusionPipeline
    from stylelora.world.models import make_schedulers, make_text_encoder, make_unet, make_vae
    from stylelora.world.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    te = make_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id)
    _, sampler = make_schedulers()
    return StableDiffusionPipeline(make_vae(), te, tok, make_unet(), sampler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_pipe(0)


@pytest.fixture
def pipe(tiny_pipe):
    """A private copy: loading LoRA into it must not leak into other tests."""
    return copy.deepcopy(tiny_pipe)


def shape_of(pipe, key):
    return tuple(A.resolve_module(pipe, key).weight.shape)


def make_adapter(pipe, keys=ALL_KEYS, rank=4, alpha=8.0, seed=0, ranks=None, alphas=None, **meta) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, key in enumerate(keys):
        out, inp = shape_of(pipe, key)
        r = (ranks or {}).get(key, rank)
        layers[key] = LoraFactors(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g),
                                (alphas or {}).get(key, alpha))
    return Adapter(layers=layers, metadata=stylelora_metadata(**meta))


@contextlib.contextmanager
def captured_logs():
    """Library log records (diffusers does not propagate to the root logger, so caplog misses them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            yield records, warned
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def peft_layers(pipe, name):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    out = {}
    for comp in ("unet", "text_encoder"):
        for mod_name, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, PeftLoraLayer) and name in mod.lora_A:
                out[f"{comp}.{mod_name.removeprefix('text_model.')}"] = mod
    return out


def test_metadata_key_is_diffusers_own():
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    assert A.DIFFUSERS_META_KEY == LORA_ADAPTER_METADATA_KEY


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_save_load_round_trip(pipe, tmp_path, layout):
    ad = make_adapter(pipe, ranks={UNET_KEYS[1]: 2}, alphas={TE_KEYS[0]: 3.0}, base_name="tiny",
                      base_fingerprint="abc", trigger_words=["zq", "wobble"], training={"steps": 10},
                      dataset={"n": 3})
    path = save_adapter(ad, tmp_path / "a.safetensors", **({} if layout == "kohya" else {"layout": layout}))
    back = load_adapter(path)
    # what the file is: kohya keys (the default) or stylelora's format-1 diffusers/PEFT keys
    assert back.source_format == {"kohya": "kohya", "diffusers": "stylelora"}[layout] and back.path == path
    assert list(back.layers) == list(ad.layers)
    for key, layer in ad.layers.items():
        assert torch.equal(back.layers[key].down, layer.down)
        if layout == "diffusers" or layer.alpha == 8.0:  # factors bit for bit
            assert torch.equal(back.layers[key].up, layer.up) and back.layers[key].alpha == layer.alpha
        else:  # kohya: one alpha (the most common, 8) in the file, this layer's 3 / 8 folded into up
            assert back.layers[key].alpha == 8.0
            torch.testing.assert_close(back.layers[key].delta(), layer.delta(), rtol=1e-6, atol=1e-6)
    for key, value in ad.metadata.items():
        assert back.metadata[key] == value
    assert back.metadata["stylelora.format_version"] == "1"
    assert json.loads(back.metadata["stylelora.targets"]) == ALL_KEYS
    assert (back.rank, back.alpha, back.trigger_words) == (4, 8.0, ["zq", "wobble"])
    assert back.components == {"unet", "text_encoder"}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if layout == "kohya":  # lora_down / lora_up / alpha per module, CLIP under lora_te_text_model_
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.alpha" in keys
        assert len(keys) == 3 * len(ALL_KEYS)
    else:  # diffusers keys, CLIP under text_model.
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert f"{UNET_KEYS[0]}.lora_B.weight" in keys and len(keys) == 2 * len(ALL_KEYS)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain_diffusers_loads_every_layer_with_its_scale(pipe, tmp_path, dtype, layout):
    """Mixed ranks and alphas. The diffusers layout loads bit for bit; the kohya layout (the default)
    carries one alpha, so diffusers' factors are ours with each layer's alpha ratio folded into up:
    the same update, and down bit for bit."""
    ad = make_adapter(pipe, ranks={UNET_KEYS[2]: 2, TE_KEYS[2]: 3}, alphas={UNET_KEYS[0]: 1.5, TE_KEYS[1]: 16.0})
    for layer in ad.layers.values():
        layer.down, layer.up = layer.down.to(dtype), layer.up.to(dtype)
    pipe.to(dtype=dtype)
    path = save_adapter(ad, tmp_path / "a.safetensors", layout=layout)
    with captured_logs() as (records, warned):
        pipe.load_lora_weights(str(path), adapter_name="x")
    noise = [r.getMessage() for r in records] + [str(w.message) for w in warned]
    assert not [m for m in noise if "unexpected" in m.lower() or "missing" in m.lower()], noise
    loaded = peft_layers(pipe, "x")
    assert sorted(loaded) == sorted(ad.layers)  # no layer dropped, none extra
    for key, layer in ad.layers.items():
        mod = loaded[key]
        assert torch.equal(mod.lora_A["x"].weight, layer.down)
        if layout == "diffusers":
            assert torch.equal(mod.lora_B["x"].weight, layer.up)
            assert mod.scaling["x"] == layer.alpha / layer.rank, key
        else:
            update = (mod.lora_B["x"].weight.float() @ mod.lora_A["x"].weight.float()) * mod.scaling["x"]
            tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(update, layer.delta(), **tol, msg=key)


def test_adapter_from_pipeline_and_diffusers_saved_files(pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"],
                                     rank_pattern={"attn2.to_v": 2}, alpha_pattern={"attn1.to_q": 2}))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "fc1"]))
    torch.manual_seed(1)
    for mod in peft_layers(pipe, "default").values():
        torch.nn.init.normal_(mod.lora_B["default"].weight)  # PEFT initialises B to zero
    ad = adapter_from_pipeline(pipe, metadata=stylelora_metadata(base_name="tiny"))
    mods = peft_layers(pipe, "default")
    # 7 transformer blocks x attn1/attn2 x to_q/to_v, and 2 CLIP layers x q_proj/fc1
    assert sorted(ad.layers) == sorted(mods) and len(mods) == 7 * 2 * 2 + 2 * 2
    for key, mod in mods.items():
        layer = ad.layers[key]
        assert torch.equal(layer.down, mod.lora_A["default"].weight)
        assert torch.equal(layer.up, mod.lora_B["default"].weight)
        assert layer.scale == mod.scaling["default"]
    assert {l.rank for l in ad.layers.values()} == {2, 4} and {l.alpha for l in ad.layers.values()} == {2, 3, 8}
    assert ad.metadata["stylelora.base_fingerprint"] == fingerprint(pipe)
    # The same weights written by diffusers' own saver (with and without its LoraConfig metadata).
    sd_unet = get_peft_model_state_dict(pipe.unet)
    sd_te = get_peft_model_state_dict(pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "with_meta", unet_lora_layers=sd_unet, text_encoder_lora_layers=sd_te,
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    for folder, alpha_known in (("with_meta", True), ("no_meta", False)):
        if not alpha_known:
            StableDiffusionPipeline.save_lora_weights(tmp_path / folder, unet_lora_layers=sd_unet,
                                                      text_encoder_lora_layers=sd_te)
        back = load_adapter(tmp_path / folder)  # a diffusers output folder works
        assert back.source_format == "diffusers" and sorted(back.layers) == sorted(ad.layers)
        for key, layer in ad.layers.items():
            assert torch.equal(back.layers[key].down, layer.down)
            assert back.layers[key].alpha == (layer.alpha if alpha_known else layer.rank)


def test_older_diffusers_key_variants(pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    q, fc1, te_q = UNET_KEYS[0], TE_KEYS[2], TE_KEYS[0]
    (qo, qi), (fo, fi), (to, ti) = shape_of(pipe, q), shape_of(pipe, fc1), shape_of(pipe, te_q)
    q_old = q.replace("attn2.to_q", "attn2.processor.to_q_lora")
    te_old = "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora"
    fc1_old = "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer"
    t = {}
    for old, (out, inp) in ((q_old, (qo, qi)), (te_old, (to, ti)), (fc1_old, (fo, fi))):
        t[f"{old}.down.weight"] = torch.randn(2, inp, generator=g)
        t[f"{old}.up.weight"] = torch.randn(out, 2, generator=g)
    save_file(t, tmp_path / "old.safetensors")
    ad = load_adapter(tmp_path / "old.safetensors")
    assert sorted(ad.layers) == sorted([q, te_q, fc1])
    assert torch.equal(ad.layers[q].down, t[f"{q_old}.down.weight"]) and ad.layers[q].alpha == 2
    assert torch.equal(ad.layers[fc1].up, t[f"{fc1_old}.up.weight"])
    # Flattened CLIP keys (transformers >= 5.6 PEFT state dicts) and bare unet keys load too.
    flat = {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": t[f"{te_old}.down.weight"],
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": t[f"{te_old}.up.weight"],
            q.removeprefix("unet.") + ".lora_A.weight": t[f"{q_old}.down.weight"],
            q.removeprefix("unet.") + ".lora_B.weight": t[f"{q_old}.up.weight"]}
    save_file(flat, tmp_path / "flat.safetensors")
    assert sorted(load_adapter(tmp_path / "flat.safetensors").layers) == sorted([q, te_q])


def test_text_encoder_alpha_pattern_matches_with_or_without_clips_text_model_level(pipe, tmp_path):
    """diffusers copies mixed text-encoder ranks into alpha_pattern; older files name the modules (and
    so the patterns) with CLIP's `text_model.` level, newer ones without it: any mix must resolve."""
    g = torch.Generator().manual_seed(0)
    te0, te1 = TE_KEYS[0], "text_encoder.encoder.layers.1.self_attn.q_proj"
    out, inp = shape_of(pipe, te0)
    for file_level in ("text_model.", ""):
        for pattern_level in ("text_model.", ""):
            t = {}
            for key in (te0, te1):
                module = key.removeprefix("text_encoder.")
                t[f"text_encoder.{file_level}{module}.lora_A.weight"] = torch.randn(2, inp, generator=g)
                t[f"text_encoder.{file_level}{module}.lora_B.weight"] = torch.randn(out, 2, generator=g)
            meta = {"text_encoder.lora_alpha": 2, "text_encoder.r": 2,
                    "text_encoder.alpha_pattern": {f"{pattern_level}{te0.removeprefix('text_encoder.')}": 6}}
            path = tmp_path / f"{file_level or 'flat'}_{pattern_level or 'flat'}.safetensors"
            save_file(t, path, metadata={"format": "pt", A.DIFFUSERS_META_KEY: json.dumps(meta)})
            ad = load_adapter(path)
            assert (ad.layers[te0].alpha, ad.layers[te1].alpha) == (6.0, 2.0), path.name


def test_empty_lora_tensors_are_one_error_naming_the_layer(pipe, tmp_path):
    key = UNET_KEYS[0]
    out, inp = shape_of(pipe, key)
    save_file({f"{key}.lora_A.weight": torch.zeros(0, inp), f"{key}.lora_B.weight": torch.zeros(out, 0)},
              tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match=r"empty.safetensors: layer .* are empty: rank and sizes must be at least 1"):
        load_adapter(tmp_path / "empty.safetensors")


def test_kohya_export_round_trip_and_diffusers_reads_it(pipe, tmp_path):
    ad = make_adapter(pipe, alpha=2.0, alphas={UNET_KEYS[0]: 5.0, TE_KEYS[1]: 1.0}, ranks={UNET_KEYS[3]: 3})
    path = export_kohya(ad, tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        # one alpha, the most common (2): UNET_KEYS[0]'s 5 / 2 is folded into its lora_up
        assert {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")} == {2.0}
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "2.0"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys) and len(keys) == 3 * len(ALL_KEYS)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys
    back = load_adapter(path)
    assert back.source_format == "kohya" and sorted(back.layers) == sorted(ad.layers)
    for key, layer in ad.layers.items():
        assert back.layers[key].alpha == 2.0 and torch.equal(back.layers[key].down, layer.down)
        torch.testing.assert_close(back.layers[key].delta(), layer.delta(), rtol=1e-6, atol=1e-6)
    # diffusers' own kohya import agrees on every layer's update. (0.42 keys kohya .alpha values of
    # attention and CLIP layers under names that match no module, so per-layer alphas would collapse
    # to the most common one there: hence the single alpha.)
    pipe.load_lora_weights(str(path), adapter_name="k")
    loaded = peft_layers(pipe, "k")
    assert sorted(loaded) == sorted(ad.layers)
    for key, layer in ad.layers.items():
        mod = loaded[key]
        update = mod.lora_B["k"].weight @ mod.lora_A["k"].weight * mod.scaling["k"]
        torch.testing.assert_close(update, layer.delta(), rtol=1e-6, atol=1e-6, msg=key)


def test_kohya_without_alpha_means_alpha_equals_rank(tmp_path):
    g = torch.Generator().manual_seed(0)
    unet, te = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", \
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    t = {f"{unet}.lora_down.weight": torch.randn(3, 64, generator=g),
         f"{unet}.lora_up.weight": torch.randn(64, 3, generator=g),
         f"{te}.lora_down.weight": torch.randn(2, 64, generator=g),
         f"{te}.lora_up.weight": torch.randn(64, 2, generator=g),
         f"{te}.alpha": torch.tensor(0.0)}  # kohya reads 0 as "unset"
    save_file(t, tmp_path / "civitai.safetensors")
    ad = load_adapter(tmp_path / "civitai.safetensors")
    assert {k: (l.rank, l.alpha) for k, l in ad.layers.items()} == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (3, 3.0),
        "text_encoder.encoder.layers.0.self_attn.v_proj": (2, 2.0)}


# --- refusals ---------------------------------------------------------------------------------

@pytest.fixture
def good_file(tiny_pipe, tmp_path):
    return save_adapter(make_adapter(tiny_pipe, keys=UNET_KEYS[:2]), tmp_path / "good.safetensors")


def test_refuses_pickles_by_suffix_and_by_content(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"anything")
    with pytest.raises(ValueError, match=r"a\.ckpt is a pickle-based file; stylelora only loads \.safetensors"):
        load_adapter(tmp_path / "a.ckpt")
    (tmp_path / "renamed.safetensors").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(ValueError, match="renamed.safetensors is a pickle-based file.*Convert"):
        load_adapter(tmp_path / "renamed.safetensors")
    with zipfile.ZipFile(tmp_path / "zipped.safetensors", "w") as z:  # torch.save's container
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match="zipped.safetensors is a pickle-based file"):
        load_adapter(tmp_path / "zipped.safetensors")


def test_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(tiny_pipe, tmp_path):
    ad = make_adapter(tiny_pipe, keys=UNET_KEYS[:1])
    for pad in range(0, 400):
        ad.metadata["stylelora.note"] = "x" * pad
        path = save_adapter(ad, tmp_path / "a.safetensors")
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not produce a header length whose low byte is 0x80")
    assert load_adapter(path).metadata["stylelora.note"] == "x" * pad


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        load_adapter(tmp_path / "nope.safetensors")


def test_truncated_and_oversized_headers(good_file, tmp_path):
    data = good_file.read_bytes()
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="tiny.safetensors is truncated"):
        load_adapter(tmp_path / "tiny.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[:200])  # header cut short
    with pytest.raises(ValueError, match="cut.safetensors is truncated: its header claims"):
        load_adapter(tmp_path / "cut.safetensors")
    (tmp_path / "nodata.safetensors").write_bytes(data[:-100])  # tensor bytes cut short
    with pytest.raises(ValueError, match="nodata.safetensors is not a valid safetensors file.*truncated"):
        load_adapter(tmp_path / "nodata.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 64)
    with pytest.raises(ValueError, match=r"huge.safetensors declares a \d+-byte header, over max_header_bytes"):
        load_adapter(tmp_path / "huge.safetensors")
    with pytest.raises(ValueError, match="good.safetensors declares .* over max_header_bytes=100"):
        load_adapter(good_file, max_header_bytes=100)


def test_nan_and_unknown_keys_and_bad_json(tmp_path):
    save_file({"unet.a.lora_A.weight": torch.tensor([[1.0, float("nan")]]), "unet.a.lora_B.weight": torch.ones(2, 1)},
              tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan.safetensors: tensor unet\.a\.lora_A\.weight contains NaN/inf"):
        load_adapter(tmp_path / "nan.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2), "first_stage_model.x": torch.ones(1)},
              tmp_path / "ckpt.safetensors")
    with pytest.raises(ValueError, match=r"ckpt.safetensors: 2 key\(s\) are not LoRA weights.*input_blocks\.0\.0"):
        load_adapter(tmp_path / "ckpt.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.hada_w3_a": torch.ones(1)},
              tmp_path / "odd.safetensors")  # (LyCORIS parts are read: tests/test_lycoris.py)
    with pytest.raises(ValueError, match=r"odd.safetensors: 1 key\(s\).*lora_unet_x\.hada_w3_a"):
        load_adapter(tmp_path / "odd.safetensors")
    ok = {"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)}
    for key in ("stylelora.trigger_words", "stylelora.training", "lora_adapter_metadata"):
        save_file(ok, tmp_path / "meta.safetensors", metadata={key: "{not json"})
        with pytest.raises(ValueError, match=rf"meta.safetensors: metadata '{key}' is not valid JSON"):
            load_adapter(tmp_path / "meta.safetensors")


def test_save_is_atomic(tiny_pipe, tmp_path, monkeypatch):
    import safetensors.torch

    ad = make_adapter(tiny_pipe, keys=UNET_KEYS[:2])
    path = save_adapter(ad, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp file left
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ad, tmp_path / "b.safetensors")
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ad, path)  # overwrite attempt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=r"x\.bin: adapters are written as \.safetensors"):
        save_adapter(ad, tmp_path / "x.bin")


def test_adapter_from_pipeline_without_that_adapter(tiny_pipe):
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope' \\(adapters present: none\\)"):
        adapter_from_pipeline(tiny_pipe, "nope")


def test_refuses_newer_format_version(tmp_path):
    ok = {"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)}
    save_file(ok, tmp_path / "v9.safetensors", metadata={"stylelora.format_version": "9"})
    with pytest.raises(ValueError, match="v9.safetensors is stylelora adapter format '9'.*upgrade stylelora"):
        load_adapter(tmp_path / "v9.safetensors")


def test_check_fits(tiny_pipe):
    ad = make_adapter(tiny_pipe)
    check_fits(ad, tiny_pipe)
    key = UNET_KEYS[1]  # attn2.to_k reads the 64-wide text states; give it a 32-wide input
    ad.layers[key] = LoraFactors(torch.zeros(4, 32), torch.zeros(shape_of(tiny_pipe, key)[0], 4), 4.0)
    with pytest.raises(ValueError, match=rf"{key}.*\(64, 32\) \(out, in\) but the base weight is \(64, 64\)"):
        check_fits(ad, tiny_pipe)
    ghost = "text_encoder.encoder.layers.7.self_attn.q_proj"
    ad2 = Adapter({ghost: LoraFactors(torch.zeros(2, 64), torch.zeros(64, 2), 2.0)}, stylelora_metadata(base_name="sd15"))
    with pytest.raises(ValueError, match=rf"{ghost} has no matching module.*its base: sd15"):
        check_fits(ad2, tiny_pipe)


def test_fingerprint(tiny_pipe, pipe, tmp_path):
    fp = fingerprint(tiny_pipe)
    assert len(fp) == 16 and fp == fingerprint(make_pipe(0))  # an independently built identical base
    save_adapter(make_adapter(pipe), tmp_path / "a.safetensors")
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="x")
    assert fingerprint(pipe) == fp  # LoRA wrappers do not change the base's identity
    assert fingerprint(copy.deepcopy(tiny_pipe).to(dtype=torch.float16)) == fp  # nor an fp16 copy
    w = A.resolve_module(pipe, UNET_KEYS[0]).weight
    with torch.no_grad():
        w.view(-1)[0] += 0.5
    assert fingerprint(pipe) != fp


def test_describe(tiny_pipe, tmp_path):
    ad = make_adapter(tiny_pipe, base_name="tiny", base_fingerprint="f00", trigger_words=["zq"],
                      training={"steps": 5, "lr": 1e-4}, dataset={"images": 12})
    d = describe(load_adapter(save_adapter(ad, tmp_path / "a.safetensors")))
    assert d["format"] == "kohya" and d["format_version"] == "1"  # kohya keys, stylelora's metadata version 1
    assert (d["rank"], d["alpha"], d["n_targets"], d["targets"]) == (4, 8.0, len(ALL_KEYS), ALL_KEYS)
    assert d["components"] == ["text_encoder", "unet"] and d["base_name"] == "tiny" and d["base_fingerprint"] == "f00"
    assert d["trigger_words"] == ["zq"] and d["training"] == {"steps": 5, "lr": 1e-4} and d["dataset"] == {"images": 12}
    assert d["n_params"] == ad.n_params and d["nbytes"] == 4 * ad.n_params
    json.dumps(d)  # printable as JSON


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_kohya_and_diffusers_round_trips_keep_delta(tiny_pipe, tmp_path_factory, data):
    keys = data.draw(st.lists(st.sampled_from(ALL_KEYS), min_size=1, max_size=4, unique=True))
    ranks = {k: data.draw(st.integers(1, 6)) for k in keys}
    alphas = {k: data.draw(st.floats(0.25, 64, allow_subnormal=False)) for k in keys}
    scale = data.draw(st.sampled_from([1e-3, 1.0, 30.0]))
    ad = make_adapter(tiny_pipe, keys=keys, ranks=ranks, alphas=alphas, seed=data.draw(st.integers(0, 99)))
    for layer in ad.layers.values():
        layer.up = layer.up * scale
    folder = tmp_path_factory.mktemp("prop")
    for layout in ("kohya", "diffusers"):
        back = load_adapter(save_adapter(ad, folder / f"{layout}.safetensors", layout=layout))
        assert sorted(back.layers) == sorted(keys)
        for key, layer in ad.layers.items():
            got = back.layers[key]
            assert got.rank == layer.rank and torch.equal(got.down, layer.down)
            if layout == "diffusers":  # kohya: one alpha for all layers, the ratios folded into up
                assert got.alpha == pytest.approx(layer.alpha, rel=1e-7)
            # folding rounds up's entries (float32), so the error scales with the update's size
            size = float(layer.delta().abs().max())
            torch.testing.assert_close(got.delta(), layer.delta(), rtol=1e-6, atol=1e-6 * max(1.0, size))


def test_fingerprint_of_a_layer_past_float32_integers():
    """2**24 + 4 weights: float32 rounds the last index up to n (out of bounds); SD1.5 has such layers."""
    from types import SimpleNamespace

    unet = torch.nn.Sequential(torch.nn.Linear(4, (2**24 + 4) // 4, bias=False))
    assert unet[0].weight.numel() == 2**24 + 4
    assert len(fingerprint(SimpleNamespace(unet=unet, text_encoder=None))) == 16
