"""LyCORIS (LoCon, LoHa, LoKr, full diffs) and DoRA files: built by hand from random factors on real
module names of the tiny pipeline, loaded, and each layer's update checked against a reference
computed here from the factors, written out plainly (loops over ranks, blocks and channels, float64);
then blended by AdapterStack at scale s: W = W0 + s * dW, and back to W0 bit for bit. DoRA is checked
against its fused weight on this base's W0, for both dora_scale axes and PEFT's magnitude vector (and
against PEFT's own merge)."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from stylelora.adapters import LoraFactors, describe, export_kohya, load_adapter, resolve_module, save_adapter
from stylelora.blend import AdapterStack, merge_adapters
from stylelora.cli import main

LINEAR = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # (128, 64)
FF = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"  # (1024, 128)
CONV3 = "unet.down_blocks.1.resnets.0.conv1"  # (128, 64, 3, 3)
CONV3B = "unet.down_blocks.0.resnets.0.conv2"  # (64, 64, 3, 3)
CONV3C = "unet.down_blocks.0.downsamplers.0.conv"  # (64, 64, 3, 3)
CONV1 = "unet.down_blocks.1.resnets.0.conv_shortcut"  # (128, 64, 1, 1)
TE = "text_encoder.encoder.layers.0.mlp.fc1"  # (256, 64)
EPS = torch.finfo(torch.float32).eps  # LyCORIS adds it to DoRA's norms


@pytest.fixture(scope="module")
def pipe(tiny_random_pipe):
    return copy.deepcopy(tiny_random_pipe)  # stacks write its weights (and reset them)


@pytest.fixture
def rand():
    g = torch.Generator().manual_seed(0)
    return lambda *shape, std=0.5: torch.randn(*shape, generator=g) * std


def kohya(key: str) -> str:
    comp, module = key.split(".", 1)
    return ("lora_unet_" + module if comp == "unet" else "lora_te_text_model_" + module).replace(".", "_")


def base(pipe, key: str) -> torch.Tensor:
    return resolve_module(pipe, key).weight.detach().double().clone()


def write(tmp_path, name: str, tensors: dict, metadata: dict | None = None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def check(pipe, path, expected: dict[str, torch.Tensor], fmt: str, s: float = 0.7):
    """The file loads as `fmt`; each layer's update is the reference; a stack at scale s gives
    W0 + s * dW in the pipeline's weights, and reset gives W0 back exactly."""
    ad = load_adapter(path)
    assert ad.source_format == fmt and sorted(ad.layers) == sorted(expected)
    for key, ref in expected.items():
        got = ad.layers[key].delta(resolve_module(pipe, key).weight)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6, msg=key)
    before = {key: resolve_module(pipe, key).weight.detach().clone() for key in expected}
    stack = AdapterStack(pipe)
    stack.add("x", path, scale=s)
    for key, ref in expected.items():
        torch.testing.assert_close(base(pipe, key), before[key].double() + s * ref, rtol=0, atol=1e-6, msg=key)
    stack.reset()
    assert all(torch.equal(resolve_module(pipe, k).weight, w) for k, w in before.items())
    return ad


# --- references, written plainly -------------------------------------------------------------

def cp(t, wa, wb):
    """sum_ij t[i, j] * outer(wa[i], wb[j]) over the kernel: (out, in, kh, kw)."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:], dtype=torch.float64)
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += wa[i].double()[:, None, None, None] * wb[j].double()[None, :, None, None] * t[i, j].double()
    return out


def kron_blocks(w1, w2):
    """kron by its definition: block (i, j) is w1[i, j] * w2 (w2 may carry a kernel)."""
    b, d = w2.shape[:2]
    out = torch.zeros(w1.shape[0] * b, w1.shape[1] * d, *w2.shape[2:], dtype=torch.float64)
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j].double() * w2.double()
    return out


def fused_minus_w0(w0, dw, m, axis, eps):
    """DoRA: V = W0 + dW, each output row (or input column) rescaled to norm m; minus W0."""
    v = w0 + dw
    fused = v.clone()
    for c in range(v.shape[0] if axis == "out" else v.shape[1]):
        part = v[c] if axis == "out" else v[:, c]
        scaled = part * (m.reshape(-1)[c].double() / (part.norm() + eps))
        if axis == "out":
            fused[c] = scaled
        else:
            fused[:, c] = scaled
    return fused - w0


# --- LoCon -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lycoris_meta", [False, True])
def test_locon_3x3_down_with_1x1_up_loads_as_lora(pipe, tmp_path, rand, lycoris_meta):
    down, up = rand(4, 64, 3, 3), rand(128, 4, 1, 1)
    ldown, lup = rand(2, 64), rand(128, 2)
    tensors = {f"{kohya(CONV3)}.lora_down.weight": down, f"{kohya(CONV3)}.lora_up.weight": up,
               f"{kohya(CONV3)}.alpha": torch.tensor(2.0),
               f"{kohya(LINEAR)}.lora_down.weight": ldown, f"{kohya(LINEAR)}.lora_up.weight": lup}
    meta = {"ss_network_module": "lycoris.kohya"} if lycoris_meta else None
    expected = {CONV3: (up[:, :, 0, 0].double() @ down.reshape(4, -1).double()).reshape(128, 64, 3, 3) * 2 / 4,
                LINEAR: lup.double() @ ldown.double()}  # no alpha: scale 1
    ad = check(pipe, write(tmp_path, "locon", tensors, meta), expected, "lycoris-locon" if lycoris_meta else "kohya")
    assert all(isinstance(layer, LoraFactors) for layer in ad.layers.values())  # the low-rank fast path


def test_locon_with_cp_core(pipe, tmp_path, rand):
    down, mid, up = rand(3, 64, 1, 1), rand(3, 3, 3, 3), rand(128, 3, 1, 1)
    tensors = {f"{kohya(CONV3)}.lora_down.weight": down, f"{kohya(CONV3)}.lora_mid.weight": mid,
               f"{kohya(CONV3)}.lora_up.weight": up, f"{kohya(CONV3)}.alpha": torch.tensor(1.5)}
    ref = torch.zeros(128, 64, 3, 3, dtype=torch.float64)
    for m in range(3):
        for n in range(3):
            ref += (up[:, m, 0, 0].double()[:, None, None, None] * down[n, :, 0, 0].double()[None, :, None, None]
                    * mid[m, n].double())
    ad = check(pipe, write(tmp_path, "cp", tensors), {CONV3: ref * 1.5 / 3}, "lycoris-locon")
    assert ad.layers[CONV3].rank == 3 and describe(ad)["layer_kinds"] == {"locon": 1}


# --- LoHa ------------------------------------------------------------------------------------

def test_loha_linear_flat_conv_cp_conv_and_text_encoder(pipe, tmp_path, rand):
    t, expected = {}, {}

    def plain(key, out, n, r, alpha, shape):
        w1a, w1b, w2a, w2b = rand(out, r), rand(r, n), rand(out, r), rand(r, n)
        t.update({f"{kohya(key)}.hada_w1_a": w1a, f"{kohya(key)}.hada_w1_b": w1b,
                  f"{kohya(key)}.hada_w2_a": w2a, f"{kohya(key)}.hada_w2_b": w2b})
        if alpha is not None:
            t[f"{kohya(key)}.alpha"] = torch.tensor(alpha)
        scale = (alpha or r) / r  # no alpha: alpha = rank
        expected[key] = ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * scale).reshape(shape)

    plain(LINEAR, 128, 64, 4, 2.0, (128, 64))
    plain(CONV3, 128, 64 * 9, 3, 6.0, (128, 64, 3, 3))  # 2-D factors flatten the 3x3 kernel
    plain(TE, 256, 64, 2, None, (256, 64))
    # CP: hada_t* (r, r, 3, 3), hada_w*_a (r, out), hada_w*_b (r, in)
    parts = {p: rand(*s) for p, s in (("hada_t1", (2, 2, 3, 3)), ("hada_w1_a", (2, 64)), ("hada_w1_b", (2, 64)),
                                      ("hada_t2", (2, 2, 3, 3)), ("hada_w2_a", (2, 64)), ("hada_w2_b", (2, 64)))}
    t.update({f"{kohya(CONV3B)}.{p}": v for p, v in parts.items()})
    t[f"{kohya(CONV3B)}.alpha"] = torch.tensor(1.0)
    expected[CONV3B] = cp(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"]) * \
        cp(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"]) * 1.0 / 2
    ad = check(pipe, write(tmp_path, "loha", t), expected, "lycoris-loha")
    assert ad.layers[CONV3].flat and ad.layers[CONV3].shape == (128, 576) and not ad.layers[CONV3B].flat
    assert (ad.layers[LINEAR].rank, ad.layers[LINEAR].alpha, ad.layers[TE].alpha) == (4, 2.0, 2.0)


# --- LoKr ------------------------------------------------------------------------------------

def test_lokr_full_and_low_rank_sides(pipe, tmp_path, rand):
    t, expected = {}, {}

    def add(key, shape, alpha, **parts):
        t.update({f"{kohya(key)}.lokr_{p}": v for p, v in parts.items()})
        if alpha is not None:
            t[f"{kohya(key)}.alpha"] = torch.tensor(alpha)
        w1 = parts["w1"] if "w1" in parts else parts["w1_a"].double() @ parts["w1_b"].double()
        if "t2" in parts:
            w2 = cp(parts["t2"], parts["w2_a"], parts["w2_b"])
        else:
            w2 = parts["w2"] if "w2" in parts else parts["w2_a"].double() @ parts["w2_b"].double()
        # alpha / rank of the low-rank side (w2's if both are); both sides full: scale 1
        rank = parts["w2_b"].shape[0] if "w2_b" in parts else parts["w1_b"].shape[0] if "w1_b" in parts else None
        scale = (alpha or rank) / rank if rank else 1.0
        expected[key] = (kron_blocks(w1, w2) * scale).reshape(shape)

    add(FF, (1024, 128), 2.0, w1=rand(32, 8), w2_a=rand(32, 4), w2_b=rand(4, 16))  # scale 2/4
    add(LINEAR, (128, 64), 3.0, w1_a=rand(8, 2), w1_b=rand(2, 8), w2=rand(16, 8))  # scale 3/2
    add(TE, (256, 64), 7.0, w1=rand(16, 8), w2=rand(16, 8))  # both full: alpha ignored
    add(CONV3, (128, 64, 3, 3), None, w1=rand(8, 8), t2=rand(3, 3, 3, 3), w2_a=rand(3, 16), w2_b=rand(3, 8))
    add(CONV3B, (64, 64, 3, 3), 1.0, w1=rand(4, 4), w2_a=rand(16, 2), w2_b=rand(2, 16 * 9))  # flat
    add(CONV3C, (64, 64, 3, 3), 4.0, w1=rand(8, 8), w2=rand(8, 8, 3, 3))  # full conv w2: scale 1
    # both sides low-rank, of different ranks: alpha / w2's rank (as ComfyUI and A1111 read it), on a 1x1 conv
    add(CONV1, (128, 64, 1, 1), 6.0, w1_a=rand(8, 2), w1_b=rand(2, 8), w2_a=rand(16, 3), w2_b=rand(3, 8))
    ad = check(pipe, write(tmp_path, "lokr", t), expected, "lycoris-lokr")
    assert [ad.layers[k].scale for k in (FF, LINEAR, TE, CONV3, CONV3B, CONV3C, CONV1)] == \
        [0.5, 1.5, 1.0, 1.0, 0.5, 1.0, 2.0]
    assert ad.layers[CONV3B].flat and not ad.layers[CONV3].flat and not ad.layers[CONV3C].flat


def test_full_diff(pipe, tmp_path, rand):
    d1, d2 = rand(128, 64, 3, 3, std=0.01), rand(256, 64, std=0.01)
    path = write(tmp_path, "full", {f"{kohya(CONV3)}.diff": d1, f"{kohya(TE)}.diff": d2})
    check(pipe, path, {CONV3: d1.double(), TE: d2.double()}, "lycoris-full")


# --- DoRA ------------------------------------------------------------------------------------

def magnitudes(w0, axis, rand):
    """Norms near the base's own (as DoRA starts), per output row or input column."""
    norms = [w0[c].norm() for c in range(w0.shape[0])] if axis == "out" else \
        [w0[:, c].norm() for c in range(w0.shape[1])]
    return torch.tensor(norms, dtype=torch.float32) * (1 + rand(len(norms), std=0.2))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_scale_on_lora_and_loha(pipe, tmp_path, rand, axis):
    t, expected = {}, {}
    for key, shape in ((LINEAR, (128, 64)), (CONV3, (128, 64, 3, 3))):  # kohya LoRA / LoCon with dora_scale
        n = math.prod(shape[1:])
        down, up = rand(4, *shape[1:]), rand(shape[0], 4, *[1] * (len(shape) - 2))
        w0 = base(pipe, key)
        m = magnitudes(w0, axis, rand)
        ones = [1] * (len(shape) - 2)
        t.update({f"{kohya(key)}.lora_down.weight": down, f"{kohya(key)}.lora_up.weight": up,
                  f"{kohya(key)}.alpha": torch.tensor(8.0),
                  f"{kohya(key)}.dora_scale": m.reshape(-1, 1, *ones) if axis == "out" else m.reshape(1, -1, *ones)})
        dw = (up.reshape(shape[0], 4).double() @ down.reshape(4, n).double()).reshape(shape) * 8 / 4
        expected[key] = fused_minus_w0(w0, dw, m, axis, EPS)
    # LoHa with DoRA on the text encoder
    w1a, w1b, w2a, w2b = rand(256, 2), rand(2, 64), rand(256, 2), rand(2, 64)
    w0 = base(pipe, TE)
    m = magnitudes(w0, axis, rand)
    t.update({f"{kohya(TE)}.hada_w1_a": w1a, f"{kohya(TE)}.hada_w1_b": w1b, f"{kohya(TE)}.hada_w2_a": w2a,
              f"{kohya(TE)}.hada_w2_b": w2b, f"{kohya(TE)}.dora_scale": m.reshape(-1, 1) if axis == "out" else m[None]})
    expected[TE] = fused_minus_w0(w0, (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()), m, axis, EPS)
    ad = check(pipe, write(tmp_path, f"dora_{axis}", t), expected, "lycoris-locon+loha+dora")
    assert {layer.axis for layer in ad.layers.values()} == {axis}
    assert describe(ad)["layer_kinds"] == {"lora+dora": 2, "loha+dora": 1}


def peft_dora_file(pipe, tmp_path, rand):
    """A diffusers/PEFT-key DoRA file on a linear and a conv layer, and the tensors in it."""
    parts = {LINEAR: (rand(4, 64), rand(128, 4), magnitudes(base(pipe, LINEAR), "out", rand)),
             CONV3: (rand(4, 64, 3, 3), rand(128, 4, 1, 1), magnitudes(base(pipe, CONV3), "out", rand).reshape(
                 1, 128, 1, 1))}  # PEFT's conv magnitude shape
    t = {}
    for key, (a, b, m) in parts.items():
        t.update({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b, f"{key}.lora_magnitude_vector": m})
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True})}
    return write(tmp_path, "peft_dora", t, meta), parts


def test_peft_lora_magnitude_vector(pipe, tmp_path, rand):
    path, parts = peft_dora_file(pipe, tmp_path, rand)
    expected = {}
    for key, (a, b, m) in parts.items():
        shape = tuple(resolve_module(pipe, key).weight.shape)
        dw = (b.reshape(shape[0], 4).double() @ a.reshape(4, -1).double()).reshape(shape) * 8 / 4
        expected[key] = fused_minus_w0(base(pipe, key), dw, m, "out", 0.0)  # PEFT adds no eps
    check(pipe, path, expected, "diffusers+dora")


def test_peft_magnitude_vector_matches_peft_merge(pipe, tmp_path, rand):
    """The oracle: PEFT's own DoRA layers, merged, on copies of the same base modules."""
    from peft import LoraConfig, get_peft_model

    path, parts = peft_dora_file(pipe, tmp_path, rand)
    model = torch.nn.Module()
    model.lin, model.conv = (copy.deepcopy(resolve_module(pipe, k)) for k in (LINEAR, CONV3))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_dora=True))
    for name, key in (("lin", LINEAR), ("conv", CONV3)):
        layer = getattr(peft.base_model.model, name)
        a, b, m = parts[key]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            layer.lora_magnitude_vector["default"].weight.copy_(m)
    merged = peft.merge_and_unload()
    stack = AdapterStack(pipe)
    stack.add("dora", path, scale=1.0)
    try:
        for name, key in (("lin", LINEAR), ("conv", CONV3)):
            torch.testing.assert_close(resolve_module(pipe, key).weight, getattr(merged, name).weight,
                                       rtol=0, atol=1e-6)
    finally:
        stack.reset()


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("part, what", [("oft_blocks", "OFT/BOFT"), ("a1.weight", "GLoRA"), ("on_input", "IA3"),
                                        ("diff_b", "bias update"), ("w_norm", "norm-layer")])
def test_unsupported_layer_types_are_one_named_error(tmp_path, rand, part, what):
    key = f"{kohya(LINEAR)}.{part}"
    path = write(tmp_path, "odd", {key: rand(4, 4), f"{kohya(TE)}.lora_down.weight": rand(2, 64),
                                   f"{kohya(TE)}.lora_up.weight": rand(256, 2)})
    with pytest.raises(ValueError, match=rf"odd\.safetensors: {key.replace('.', '[.]')} is part of .*{what}.*cannot "
                                         r"blend .*use this file in ComfyUI or A1111"):
        load_adapter(path)


@pytest.mark.parametrize("parts, message", [
    ({"hada_w1_a": (128, 2), "hada_w1_b": (2, 64), "hada_w2_a": (128, 2)}, r"lacks hada_w2_b; the file is incomplete"),
    ({"hada_w1_a": (128, 2), "hada_w1_b": (3, 64), "hada_w2_a": (128, 2), "hada_w2_b": (2, 64)},
     r"hada_w1_a \(128, 2\) and hada_w1_b \(3, 64\) do not pair"),
    ({"hada_w1_a": (128, 2), "hada_w1_b": (2, 64), "hada_w2_a": (128, 2), "hada_w2_b": (2, 64),
      "hada_t1": (2, 2, 3, 3)},
     r"only one of hada_t1 / hada_t2"),
    ({"lokr_w1": (8, 8), "lokr_w1_a": (8, 2), "lokr_w2": (16, 8)}, r"has lokr_w1 and also its low-rank parts"),
    ({"lokr_w1": (8, 8)}, r"lacks lokr_w2 \(or both lokr_w2_a and lokr_w2_b\)"),
    ({"lora_down.weight": (2, 64), "lora_up.weight": (128, 2), "hada_w1_a": (128, 2)}, r"mixes the parts of different "
                                                                                       r"layer kinds"),
    ({"lora_down.weight": (2, 64), "lora_up.weight": (128, 2), "dora_scale": (5, 1)},
     r"dora_scale \(5, 1\) fits neither axis of its layer's update \(128, 64\)"),
    ({"diff": (128,)}, r"diff has shape \(128,\): it must have 2 or 4 dimensions"),
])
def test_malformed_lycoris_layers_are_named(tmp_path, rand, parts, message):
    path = write(tmp_path, "bad", {f"{kohya(LINEAR)}.{p}": rand(*s) for p, s in parts.items()})
    with pytest.raises(ValueError, match=r"bad\.safetensors: .*" + message):
        load_adapter(path)


def test_nan_in_a_lycoris_factor_is_refused(tmp_path, rand):
    w1 = rand(8, 8)
    w1[0, 0] = float("nan")
    path = write(tmp_path, "nan", {f"{kohya(LINEAR)}.lokr_w1": w1, f"{kohya(LINEAR)}.lokr_w2": rand(16, 8)})
    with pytest.raises(ValueError, match=rf"nan\.safetensors: tensor {kohya(LINEAR)}\.lokr_w1 contains NaN/inf"):
        load_adapter(path)


def test_update_that_does_not_fit_the_base_names_layer_and_both_shapes(pipe, tmp_path, rand):
    # LoHa factors flattening a 3x3 kernel, on a linear layer: (128, 576) against (128, 64)
    t = {f"{kohya(LINEAR)}.hada_w{i}_{ab}": rand(*s) for i in (1, 2) for ab, s in (("a", (128, 2)), ("b", (2, 576)))}
    with pytest.raises(ValueError, match=rf"adapter layer {LINEAR} does not fit this base model: the adapter's delta "
                                         r"is \(128, 576\) \(out, in\*kh\*kw\) but the base weight is \(128, 64\)"):
        AdapterStack(pipe).add("x", write(tmp_path, "wide", t))
    # dora_scale with one norm per input channel, for a flat LoHa whose flattening fits but whose
    # input channels (in * kh * kw = 576 = 64 * 9) are not the base's 64
    t = {f"{kohya(CONV3)}.hada_w{i}_{ab}": rand(*s) for i in (1, 2) for ab, s in (("a", (128, 2)), ("b", (2, 576)))}
    t[f"{kohya(CONV3)}.dora_scale"] = rand(1, 32, 1, 1).abs()
    with pytest.raises(ValueError, match=rf"adapter layer {CONV3} does not fit this base model: its dora_scale "
                                         r"\(1, 32, 1, 1\) holds one norm per input channel but the base weight "
                                         r"\(128, 64, 3, 3\) has 64"):
        AdapterStack(pipe).add("x", write(tmp_path, "dora_in", t))


# --- stacking, merging, writing --------------------------------------------------------------

def loha_file(tmp_path, rand, name="loha", scale=0.3):
    t = {}
    for key, (out, n) in ((LINEAR, (128, 64)), (CONV3, (128, 576))):
        t.update({f"{kohya(key)}.hada_w{i}_{ab}": rand(*s) * scale for i in (1, 2)
                  for ab, s in (("a", (out, 2)), ("b", (2, n)))})
    return write(tmp_path, name, t)


def test_lora_and_loha_stack_on_one_layer(pipe, tmp_path, rand):
    lora = write(tmp_path, "lora", {f"{LINEAR}.lora_A.weight": rand(4, 64), f"{LINEAR}.lora_B.weight": rand(128, 4)})
    loha = loha_file(tmp_path, rand)
    w0 = base(pipe, LINEAR)
    d_lora = load_adapter(lora).layers[LINEAR].delta().double()
    d_loha = load_adapter(loha).layers[LINEAR].delta().double()
    stack = AdapterStack(pipe)
    try:
        stack.add("lora", lora, scale=0.5)
        stack.add("loha", loha, scale=-1.2)
        torch.testing.assert_close(base(pipe, LINEAR), w0 + 0.5 * d_lora - 1.2 * d_loha, rtol=0, atol=1e-6)
        stack.set_scales({"loha": 0.0})
        torch.testing.assert_close(base(pipe, LINEAR), w0 + 0.5 * d_lora, rtol=0, atol=1e-6)
    finally:
        stack.reset()
    assert torch.equal(base(pipe, LINEAR), w0)


def test_half_precision_base_is_blended_in_float32(pipe, tmp_path, rand):
    half = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    loha = load_adapter(loha_file(tmp_path, rand))
    lora = load_adapter(write(tmp_path, "lora", {f"{LINEAR}.lora_A.weight": rand(4, 64),
                                                 f"{LINEAR}.lora_B.weight": rand(128, 4)}))
    w0 = resolve_module(half, LINEAR).weight.detach().clone()
    stack = AdapterStack(half)
    stack.add("loha", loha, 0.5)
    stack.add("lora", lora, 2.0)
    want = w0.float() + 2.0 * lora.layers[LINEAR].delta() + 0.5 * loha.layers[LINEAR].delta(w0)
    # the float32 sum, rounded to bfloat16 once (float32 rounding may move a value by one bf16 step)
    torch.testing.assert_close(resolve_module(half, LINEAR).weight.float(), want.to(torch.bfloat16).float(),
                               rtol=2 ** -7, atol=0)
    stack.reset()
    assert torch.equal(resolve_module(half, LINEAR).weight, w0)


def test_generate_with_a_loha(pipe, tmp_path, rand):
    stack = AdapterStack(pipe)
    stack.add("loha", loha_file(tmp_path, rand, scale=1.0))
    try:
        gen = dict(steps=2, seed=1, output_type="np")
        on, off = stack.generate("a red star", **gen), stack.generate("a red star", scales={"loha": 0.0}, **gen)
    finally:
        stack.reset()
    plain = AdapterStack(pipe).generate("a red star", **gen)
    assert (off == plain).all() and abs(on - off).max() > 1e-3


def test_merge_needs_the_base_only_where_the_update_does(pipe, tmp_path, rand):
    loha = load_adapter(loha_file(tmp_path, rand))
    # (its linear layer too: from 2-D factors alone, a linear layer looks like a flattened conv)
    with pytest.raises(ValueError, match=rf"cannot merge layer {LINEAR} of \S*loha\.safetensors without the base "
                                         r"model: its loha factors are 2-D.*--base MODEL"):
        merge_adapters([(loha, 1.0)])
    merged, rel = merge_adapters([(loha, 0.6)], base=pipe)
    assert rel < 1e-6 and merged.layers[LINEAR].rank == 4 and merged.layers[CONV3].down.shape == (4, 64, 3, 3)
    for key in (LINEAR, CONV3):
        want = 0.6 * loha.layers[key].delta(resolve_module(pipe, key).weight)
        torch.testing.assert_close(merged.layers[key].delta(), want, rtol=0, atol=1e-5)
    # beside a conv LoRA on the same layer: its (128, 64, 3, 3) and the LoHa's flat (128, 576) both fit
    lora = load_adapter(write(tmp_path, "conv_lora", {f"{kohya(CONV3)}.lora_down.weight": rand(2, 64, 3, 3),
                                                      f"{kohya(CONV3)}.lora_up.weight": rand(128, 2, 1, 1)}))
    merged, rel = merge_adapters([(loha, 0.6), (lora, -0.4)], base=pipe)
    want = 0.6 * loha.layers[CONV3].delta(resolve_module(pipe, CONV3).weight) - 0.4 * lora.layers[CONV3].delta()
    assert rel < 1e-6 and merged.layers[CONV3].rank == 4 + 2
    torch.testing.assert_close(merged.layers[CONV3].delta(), want, rtol=0, atol=1e-5)
    # a layer whose shape the file tells (CP LoCon) merges without a base
    cp_file = write(tmp_path, "cp", {f"{kohya(CONV3)}.lora_down.weight": rand(3, 64, 1, 1),
                                     f"{kohya(CONV3)}.lora_mid.weight": rand(3, 3, 3, 3),
                                     f"{kohya(CONV3)}.lora_up.weight": rand(128, 3, 1, 1)})
    cp_ad = load_adapter(cp_file)
    merged, rel = merge_adapters([(cp_ad, 1.0)])
    assert rel < 1e-6 and merged.layers[CONV3].rank == 3
    torch.testing.assert_close(merged.layers[CONV3].delta(), cp_ad.layers[CONV3].delta(), rtol=0, atol=1e-5)


def test_merge_dora_against_the_base(pipe, tmp_path, rand):
    path, _ = peft_dora_file(pipe, tmp_path, rand)
    dora = load_adapter(path)
    with pytest.raises(ValueError, match=r"without the base model: it is a DoRA layer"):
        merge_adapters([(dora, 1.0)])
    merged, rel = merge_adapters([(dora, 1.0)], base=pipe, rank=None)
    assert rel < 1e-6
    for key in (LINEAR, CONV3):
        want = dora.layers[key].delta(resolve_module(pipe, key).weight)
        torch.testing.assert_close(merged.layers[key].delta(), want, rtol=0, atol=1e-5)


def test_writers_refuse_other_kinds_and_say_how_to_convert(tmp_path, rand):
    loha = load_adapter(loha_file(tmp_path, rand))
    for write_file in (save_adapter, export_kohya):
        with pytest.raises(ValueError, match=rf"cannot write \S*out\.safetensors: layer {LINEAR} of "
                                             r"\S*loha\.safetensors is a loha layer \(a lycoris-loha file\).*"
                                             r"`stylelora merge \S*loha\.safetensors:1 --raw-scale"):
            write_file(loha, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_describe_and_cli(pipe, tiny_base, tmp_path, rand, capsys):
    path = loha_file(tmp_path, rand)
    info = describe(load_adapter(path))
    assert (info["format"], info["rank"], info["alpha"], info["layer_kinds"]) == ("lycoris-loha", 2, 2.0, {"loha": 2})
    assert info["n_params"] == 2 * (128 * 2 + 2 * 64) + 2 * (128 * 2 + 2 * 576)
    json.dumps(info, allow_nan=False)
    assert main(["inspect", str(path)]) == 0
    assert "format:         lycoris-loha" in capsys.readouterr().out
    out = tmp_path / "as_lora.safetensors"
    assert main(["merge", f"{path}:1", "--raw-scale", "--base", str(tiny_base), "-o", str(out)]) == 0
    lora = load_adapter(out)
    for key in (LINEAR, CONV3):
        want = load_adapter(path).layers[key].delta(resolve_module(pipe, key).weight)
        torch.testing.assert_close(lora.layers[key].delta(), want, rtol=0, atol=1e-5)
    assert main(["convert", str(path), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]) != 0
    assert "stylelora writes LoRA factors only" in capsys.readouterr().err


# --- against LyCORIS itself (optional: pip install lycoris-lora einops toml) -----------------

LYCORIS_CASES = [("LoConModule", {}), ("LohaModule", {}), ("LokrModule", dict(factor=8)),
                 ("LokrModule", dict(factor=4, decompose_both=True)), ("LokrModule", dict(factor=8, full_matrix=True)),
                 ("LoConModule", dict(use_tucker=True)), ("LohaModule", dict(use_tucker=True)),
                 ("LokrModule", dict(factor=4, use_tucker=True)), ("FullModule", None)]


def test_lycoris_modules_state_dicts_match_their_forward(tmp_path):
    """A LyCORIS module with random weights, its state dict saved under a kohya name: the layer
    stylelora reads gives, on the module's own W0, what the module's forward computes. Every
    algorithm x option x DoRA axis x linear/conv LyCORIS has, in one test (one skip without it)."""
    modules = pytest.importorskip("lycoris.modules")
    for (algo, options), dora, conv in itertools.product(LYCORIS_CASES, (None, True, False), (False, True)):
        if options is None and dora is not None or options and options.get("use_tucker") and not conv:
            continue  # LyCORIS has no such layer
        _check_lycoris_module(tmp_path, modules, algo, options, dora, conv)


def _check_lycoris_module(tmp_path, modules, algo, options, dora, conv):
    torch.manual_seed(0)
    org = torch.nn.Conv2d(64, 128, 3, padding=1, bias=False) if conv else torch.nn.Linear(64, 128, bias=False)
    w0 = org.weight.detach().clone()
    kw = {} if options is None else dict(lora_dim=4, alpha=3, **options)
    module = getattr(modules, algo)("x", org, 1.0, **kw, **({} if dora is None else
                                                              dict(weight_decompose=True, wd_on_out=dora)))
    if options is None:
        module.apply_to()  # as in training: full's weight is then the layer's, and its diff = weight - W0
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(p * (1 + 0.2 * torch.randn_like(p)) if name == "dora_scale" else torch.randn_like(p) * 0.3)
    name = kohya(CONV3 if conv else LINEAR)
    path = write(tmp_path, "lyco", {f"{name}.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()})
    layer = load_adapter(path).layers[CONV3 if conv else LINEAR]
    x = torch.randn(2, 64, 6, 6) if conv else torch.randn(2, 64)
    op = (lambda w: torch.nn.functional.conv2d(x, w, padding=1)) if conv else (lambda w: x @ w.T)
    with torch.no_grad():
        want = module(x)
        torch.testing.assert_close(op(w0 + layer.delta(w0)), want, rtol=0, atol=1e-6 * float(want.abs().max()))
