"""Fuzzing adapter files (hypothesis): random key spellings, dtypes, shapes, values and metadata, raw
safetensors headers, and damaged copies of a good file. Whatever the bytes, load_adapter either
returns a usable adapter (finite float layers whose down/up pair, a finite alpha, describe() as
strict JSON) or raises ValueError / FileNotFoundError naming the file -- never anything else.

test_bad_inputs_files.py pins the message of each known case; this file looks for unknown ones.
Sized for a 2-core machine: about 20 s with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from safetensors.torch import save_file

from stylelora.adapters import COMPONENTS, Adapter, LoraFactors, describe, load_adapter, save_adapter

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _event(what: str) -> None:
    """Tally outcomes for --hypothesis-show-statistics (a no-op outside a hypothesis test)."""
    try:
        event(what)
    except InvalidArgument:
        pass


def check_file(path: Path) -> Adapter | None:
    """The property: a valid adapter, or ValueError/FileNotFoundError naming the file."""
    try:
        ad = load_adapter(path)
    except (ValueError, FileNotFoundError) as e:
        assert path.name in str(e), f"the message does not name the file: {e}"
        _event("refused: " + re.sub(r"\d+", "N", str(e).replace(str(path), "F"))[:70])
        return None
    _event("loaded")
    assert ad.layers, "loaded an adapter without layers"
    for key, layer in ad.layers.items():
        assert isinstance(layer, LoraFactors) and key.split(".", 1)[0] in COMPONENTS, key  # SDXL: text_encoder_2
        for t in (layer.down, layer.up):
            assert t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64), (key, t.dtype)
            assert torch.isfinite(t).all(), key
        assert layer.down.shape[0] == layer.up.shape[1] == layer.rank >= 1, key
        assert isinstance(layer.alpha, float) and abs(layer.alpha) <= torch.finfo(torch.float32).max, key
        assert torch.isfinite(layer.delta()).all(), key  # what blending adds to the base weight
    json.dumps(describe(ad), allow_nan=False)  # what `inspect --json` prints: strict JSON
    return ad


def in_tmp(write) -> Adapter | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.safetensors"
        write(path)
        return check_file(path)


# ----------------------------------------------------------------------------- tensors and keys

MODULES = {  # (unet-relative or CLIP-relative module path, its kohya name without prefix)
    "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "mid_block.attentions.0.proj_in", "up_blocks.1.resnets.0.conv1", "conv_in"],
    "text_encoder": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"],
}
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
OTHERS = [torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
VALUES = st.sampled_from([0.0, 1.0, -0.5, 1e-3, 3.0, 1e4, 1e39, 1e300, float("nan"), float("inf"), -float("inf")])


def spellings(comp: str, module: str) -> list[tuple[str, str, str, str]]:
    """(down key, up key, alpha key) for each way a file may spell one module's LoRA, and a tag."""
    kohya = module.replace(".", "_")
    if comp == "unet":
        out = [(f"unet.{module}.lora_A.weight", f"unet.{module}.lora_B.weight", f"unet.{module}.alpha", "peft"),
               (f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.alpha", "bare"),
               (f"unet.{module}.lora.down.weight", f"unet.{module}.lora.up.weight", f"unet.{module}.alpha", "old"),
               (f"lora_unet_{kohya}.lora_down.weight", f"lora_unet_{kohya}.lora_up.weight", f"lora_unet_{kohya}.alpha",
                "kohya")]
        if ".to_" in module:  # the oldest attention-processor spelling
            head, proj = module.rsplit(".", 1)
            old = f"unet.{head}.processor.{proj}_lora"
            out.append((f"{old}.down.weight", f"{old}.up.weight", f"{old}.alpha", "processor"))
        return out
    return [(f"text_encoder.{module}.lora_A.weight", f"text_encoder.{module}.lora_B.weight",
             f"text_encoder.{module}.alpha", "peft"),
            (f"text_encoder.text_model.{module}.lora_A.weight", f"text_encoder.text_model.{module}.lora_B.weight",
             f"text_encoder.text_model.{module}.alpha", "text_model"),
            (f"text_encoder.text_model.{module}.lora_linear_layer.down.weight",
             f"text_encoder.text_model.{module}.lora_linear_layer.up.weight", f"text_encoder.{module}.alpha", "old"),
            *[(f"{p}text_model_{kohya}.lora_down.weight", f"{p}text_model_{kohya}.lora_up.weight",
               f"{p}text_model_{kohya}.alpha", "kohya") for p in ("lora_te_", "lora_te1_", "lora_te2_")]]


@st.composite
def tensor(draw, shape=None, clean=False) -> torch.Tensor:
    """Any shape, dtype and values; `clean`: random normal values in a float dtype."""
    shape = draw(st.lists(st.integers(0, 3), max_size=4)) if shape is None else shape
    n = 1
    for s in shape:
        n *= s
    # Mostly random normal floats (so that many files load), sometimes chosen values (NaN, inf, huge).
    values = None if clean or draw(st.integers(0, 3)) else draw(st.lists(VALUES, min_size=n, max_size=n))
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) if values is None \
        else torch.tensor(values, dtype=torch.float64).reshape(shape)
    dtype = draw(st.sampled_from(FLOATS)) if clean or draw(st.integers(0, 5)) else draw(st.sampled_from(OTHERS))
    return t.to(dtype) if not dtype.is_complex else t.to(torch.float32).to(dtype)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    """A third are well-formed (one convention, pairing shapes, normal values) in any spelling and
    float dtype, so that loading is exercised as much as refusing; the rest go wrong anywhere."""
    clean = draw(st.integers(0, 2)) == 0
    kohya = draw(st.booleans())
    sd: dict[str, torch.Tensor] = {}
    for _ in range(draw(st.integers(1, 4))):
        comp = draw(st.sampled_from(list(MODULES)))
        module = draw(st.sampled_from(MODULES[comp]))
        options = spellings(comp, module)
        if clean:  # one convention per file; no SDXL-only lora_te2_
            options = [o for o in options if (o[3] == "kohya") == kohya and "lora_te2_" not in o[0]]
        down_key, up_key, alpha_key, _ = draw(st.sampled_from(options))
        r, n_in, n_out = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
        conv = draw(st.booleans())
        good_shapes = clean or draw(st.integers(0, 4)) > 0
        down_shape = ([r, n_in, 3, 3] if conv else [r, n_in]) if good_shapes else None
        up_shape = ([n_out, r, 1, 1] if conv else [n_out, r]) if good_shapes else None
        if clean or draw(st.integers(0, 9)):  # mostly both halves
            sd[down_key] = draw(tensor(down_shape, clean))
            sd[up_key] = draw(tensor(up_shape, clean))
        else:
            sd[draw(st.sampled_from([down_key, up_key]))] = draw(tensor(down_shape))
        if draw(st.booleans()):
            sd[alpha_key] = draw(tensor([] if clean else draw(st.sampled_from([[], [1], [2], None])), clean))
    if not clean and draw(st.integers(0, 9)) == 0:  # a key no LoRA format has
        sd[draw(st.sampled_from(["model.diffusion_model.out.2.weight", "lora_unet_x.hada_w1_a", "unet.x.weight",
                                 "text_encoder.a.lora_magnitude_vector", "unet", "lora_te_.alpha"]))] = torch.ones(1)
    return sd


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                      st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def lora_config(draw) -> str:
    """The diffusers LoraConfig header entry: plausible, odd, or not JSON at all."""
    config = {}
    for comp in draw(st.lists(st.sampled_from(["unet", "text_encoder"]), max_size=2, unique=True)):
        config[f"{comp}.r"] = draw(st.integers(1, 4))
        if draw(st.booleans()):
            config[f"{comp}.lora_alpha"] = draw(st.one_of(VALUES, st.integers(-3, 10**40), json_value))
        if draw(st.booleans()):
            keys = st.one_of(st.sampled_from(["to_q", "attn1.to_q", "q_proj", "text_model.encoder.layers.0.mlp.fc1",
                                              "conv_in", "a(", "[", "*", "(x+)+$", "proj_in|to_k"]),
                             st.text(max_size=5))
            config[f"{comp}.alpha_pattern"] = draw(st.one_of(st.dictionaries(keys, VALUES, max_size=3), json_value))
        if draw(st.booleans()):
            config[f"{comp}.use_rslora"] = draw(json_value)
    text = json.dumps(config, allow_nan=True)  # Python writes NaN/Infinity: the case to refuse
    return draw(st.sampled_from([text, text, text, text[: len(text) // 2], "[1, 2]"]))


@st.composite
def metadata(draw) -> dict[str, str]:
    meta = {}
    if not draw(st.integers(0, 2)):
        meta["lora_adapter_metadata"] = draw(lora_config())
    for key in draw(st.lists(st.sampled_from(["stylelora.rank", "stylelora.alpha", "stylelora.targets",
                                              "stylelora.trigger_words", "stylelora.training", "stylelora.dataset",
                                              "stylelora.format_version", "stylelora.base_name"]),
                             unique=True, max_size=draw(st.sampled_from([0, 0, 1, 3])))):
        meta[key] = draw(st.one_of(st.just("1"), st.text(max_size=8),
                                   json_value.map(lambda v: json.dumps(v, allow_nan=True))))
    return meta


@settings(FUZZ, max_examples=500)
@given(sd=state_dicts(), meta=metadata())
def test_random_lora_state_dicts_load_or_raise_a_named_value_error(sd, meta):
    in_tmp(lambda p: save_file(sd, p, metadata=meta))


# ----------------------------------------------------------------------------- raw headers

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
                      "F6_E2M3": 1, "C64": 8, "XYZ": 1}


@st.composite
def raw_files(draw) -> bytes:
    """A header written by hand: any dtype string, shape and offsets, any metadata; then the data."""
    header: dict = {}
    offset = 0
    consistent = draw(st.integers(0, 2)) > 0  # offsets that add up, as a writer would make them
    keys = ["unet.a.lora_A.weight", "unet.a.lora_B.weight", "unet.a.alpha", "lora_unet_conv_in.lora_down.weight", "x"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3"]) if consistent else
                     st.sampled_from(list(SAFETENSORS_DTYPES)))
        shape = {"unet.a.lora_A.weight": [1, 2], "unet.a.lora_B.weight": [2, 1]}.get(key, []) if consistent else \
            draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for s in shape:
            numel *= s
        size = numel * SAFETENSORS_DTYPES[dtype] if consistent else draw(st.integers(0, 64))
        begin = offset if consistent else draw(st.sampled_from([offset, max(0, offset - 1), offset + 1]))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
        offset = begin + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(metadata(), json_value))
    text = json.dumps(header, allow_nan=True).encode()
    if consistent:
        n = len(text)
        data = draw(st.binary(min_size=offset, max_size=offset))
    else:
        text = draw(st.sampled_from([text, text + b" " * 3, text[:-1]]))
        n = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
        data = draw(st.binary(max_size=offset + 8))
    return struct.pack("<Q", n) + text + data


@settings(FUZZ, max_examples=500)
@given(raw=raw_files())
def test_random_headers_load_or_raise_a_named_value_error(raw):
    in_tmp(lambda p: p.write_bytes(raw))


# ----------------------------------------------------------------------------- damaged good files

def _good_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    layers = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
              LoraFactors(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0),
              "text_encoder.encoder.layers.0.mlp.fc1": LoraFactors(torch.randn(2, 8, generator=g),
                                                                 torch.randn(8, 2, generator=g), 4.0)}
    with tempfile.TemporaryDirectory() as d:
        return save_adapter(Adapter(layers, {"stylelora.trigger_words": '["neon"]'}), Path(d) / "g.safetensors") \
            .read_bytes()


GOOD = _good_bytes()


@settings(FUZZ, max_examples=500)
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(GOOD))), prefix=st.binary(max_size=4))
def test_damaged_good_files_load_or_raise_a_named_value_error(edits, cut, prefix):
    data = bytearray(GOOD)
    for at, byte in edits:
        data[at] = byte
    data = prefix + bytes(data[:cut] if cut is not None else data)
    assume(data != GOOD)
    in_tmp(lambda p: p.write_bytes(data))


def test_the_good_file_itself_loads():
    ad = in_tmp(lambda p: p.write_bytes(GOOD))
    assert ad is not None and len(ad.layers) == 2 and ad.trigger_words == ["neon"]
