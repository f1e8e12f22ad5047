"""stylelora.blend: fused blending checked against plain diffusers (load_lora_weights +
set_adapters) as the oracle, exact restores, switch/composite, SVD merge, prompt tags.

Runs on a random-weight pipeline of the embedded architecture with random LoRA adapters."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from stylelora.adapters import Adapter, LoraFactors, resolve_module, save_adapter
from stylelora.blend import BALANCE_EXPONENT, AdapterStack, Scale, block_of, merge_adapters, parse_prompt_loras
from stylelora.lora import find_targets

PROMPT = "a red star on a white background"
GEN = dict(steps=4, guidance=5.0, seed=3, output_type="np")
MERGE = dict(GEN, mode="merge")  # the plain weighted sum, what diffusers computes


@pytest.fixture(scope="module")
def pipe(tiny_random_pipe):
    return copy.deepcopy(tiny_random_pipe)  # the stack writes weights, diffusers injects PEFT layers


@pytest.fixture
def stack(pipe):
    s = AdapterStack(pipe)
    yield s
    s.reset()


def keys(pipe, unet_pattern, te_pattern=None):
    out = ["unet." + n for n in find_targets(pipe.unet, unet_pattern)]
    return out + (["text_encoder." + n for n in find_targets(pipe.text_encoder, te_pattern)] if te_pattern else [])


def rand_adapter(pipe, layer_keys, rank, alpha, seed) -> Adapter:
    """Deltas of about the base weights' size, so every adapter visibly changes the image."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key in layer_keys:
        out, inp = resolve_module(pipe, key).weight.shape
        layers[key] = LoraFactors(torch.randn(rank, inp, generator=g) / inp ** 0.5,
                                torch.randn(out, rank, generator=g) * (rank / alpha) * 0.6 / rank ** 0.5, alpha)
    return Adapter(layers=layers)


@pytest.fixture(scope="module")
def adapters(pipe):
    """pastel: cross-attention + text encoder, rank 4; ink: self-attention, rank 2 with alpha 4 (scale 2)."""
    return {"pastel": rand_adapter(pipe, keys(pipe, r"attn2\.(to_q|to_k|to_v|to_out\.0)", r"self_attn\.(q|v)_proj"), 4, 4.0, 1),
            "ink": rand_adapter(pipe, keys(pipe, r"attn1\.(to_q|to_v|to_out\.0)"), 2, 4.0, 2)}


def base_image(pipe, **gen):
    gen = {**GEN, **gen}
    return pipe(PROMPT, num_inference_steps=gen["steps"], guidance_scale=gen["guidance"], output_type="np",
                generator=torch.Generator("cpu").manual_seed(gen["seed"])).images[0]


def diffusers_image(pipe, tmp_path, named: dict[str, tuple[Adapter, object]]):
    """The oracle: the same adapters through plain diffusers, unfused PEFT layers. Written with
    diffusers/PEFT keys: pastel's CLIP layers (q/v, no out_proj) are a kohya file diffusers 0.42
    cannot read (tests/test_interop.py); the default layout is checked against diffusers there."""
    for name, (ad, _) in named.items():
        path = save_adapter(ad, tmp_path / f"{name}.safetensors", layout="diffusers")
        pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        pipe.set_adapters(list(named), [Scale.parse(s).diffusers() for _, s in named.values()])
        return base_image(pipe)
    finally:
        pipe.unload_lora_weights()


def weights(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def test_scale_parsing():
    assert Scale.parse(0.5) == Scale(0.5, 0.5)
    s = Scale.parse({"text_encoder": 0.25, "blocks": {"up": 0.5}})
    assert (s.unet, s.text_encoder, s.blocks) == (1.0, 0.25, {"up": 0.5})
    assert s.of("unet.up_blocks.1.attentions.0.x") == 0.5 and s.of("unet.mid_block.x") == 1.0
    assert s.of("text_encoder.encoder.layers.0.x") == 0.25
    assert s.diffusers() == {"unet": {"down": 1.0, "mid": 1.0, "up": 0.5}, "text_encoder": 0.25}
    assert [block_of(k) for k in ("unet.down_blocks.0.a", "unet.mid_block.a", "unet.up_blocks.1.a",
                                  "unet.conv_in", "text_encoder.encoder.layers.0.a")] == ["down", "mid", "up", None, None]
    with pytest.raises(ValueError, match=r"unknown UNet block\(s\) \['middle'\]"):
        Scale.parse({"blocks": {"middle": 1}})
    with pytest.raises(ValueError, match="bad adapter scale"):
        Scale.parse({"te": 1})
    with pytest.raises(ValueError, match="finite"):
        Scale.parse(float("nan"))


def test_two_adapters_match_diffusers(stack, pipe, adapters, tmp_path):
    base = base_image(pipe)
    stack.add("pastel", adapters["pastel"], 0.8)
    stack.add("ink", adapters["ink"], -0.6)
    ours = stack.generate(PROMPT, **MERGE)
    assert ours.dtype == np.float32 and ours.shape == (64, 64, 3)
    only_p = stack.generate(PROMPT, scales={"pastel": 0.8}, **MERGE)
    only_q = stack.generate(PROMPT, scales={"ink": -0.6}, **MERGE)
    for img in (ours, only_p, only_q):  # every adapter changes the picture, and they combine
        assert np.abs(img - base).max() > 0.02
    assert np.abs(ours - only_p).max() > 0.02 and np.abs(ours - only_q).max() > 0.02
    stack.reset()
    oracle = diffusers_image(pipe, tmp_path, {"pastel": (adapters["pastel"], 0.8), "ink": (adapters["ink"], -0.6)})
    assert np.abs(ours - oracle).max() <= 1e-4


def test_component_and_block_scales_match_diffusers(stack, pipe, adapters, tmp_path):
    split = {"unet": 1.0, "text_encoder": 0.5, "blocks": {"down": 1.0, "mid": 0.3, "up": 0.5}}
    stack.add("pastel", adapters["pastel"])
    stack.add("ink", adapters["ink"])
    stack.set_scales({"pastel": split, "ink": 0.7})
    ours = stack.generate(PROMPT, **MERGE)
    assert np.abs(ours - stack.generate(PROMPT, scales={"pastel": 1.0, "ink": 0.7}, **MERGE)).max() > 0.05
    stack.reset()
    oracle = diffusers_image(pipe, tmp_path, {"pastel": (adapters["pastel"], split), "ink": (adapters["ink"], 0.7)})
    assert np.abs(ours - oracle).max() <= 1e-4


def test_zero_scales_remove_and_reset_restore_the_base_bit_for_bit(stack, pipe, adapters):
    before, base = weights(pipe), base_image(pipe)
    stack.add("pastel", adapters["pastel"], 1.0)
    stack.add("ink", adapters["ink"], 0.5)
    changed = [k for k, v in weights(pipe).items() if not torch.equal(v, before[k])]
    assert len(changed) == len(adapters["pastel"].layers) + len(adapters["ink"].layers) == 32 + 21
    stack.set_scales({"pastel": 0, "ink": {"unet": 0, "text_encoder": 0}})
    assert np.array_equal(stack.generate(PROMPT, **MERGE), base)
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    stack.set_scales({"pastel": 1.0, "ink": 0.5})
    stack.remove("pastel")
    assert stack.names == ["ink"] and len(stack._w0) == 21  # W0 kept for targeted layers only
    stack.reset()
    assert stack.names == [] and stack._w0 == {}
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    assert np.array_equal(base_image(pipe), base)


def test_only_changed_layers_are_rewritten_and_inactive_adapters_cost_nothing(stack, pipe, adapters, monkeypatch):
    written = []
    real = AdapterStack._write
    monkeypatch.setattr(AdapterStack, "_write", lambda self, key, terms: (written.append(key), real(self, key, terms)))
    stack.add("pastel", adapters["pastel"], 1.0)
    assert len(written) == 32
    for i in range(8):  # loaded but inactive: no layer touched when added, none when others change
        stack.add(f"idle{i}", rand_adapter(pipe, list(adapters["pastel"].layers), 4, 4.0, 10 + i), 0.0)
    assert len(written) == 32
    written.clear()
    stack.set_scales({"pastel": 1.0, "idle3": 0.0})
    assert written == []
    stack.set_scales({"pastel": {"unet": 1.0, "text_encoder": 0.5}})  # only the 4 text-encoder layers change
    assert sorted(written) == sorted(k for k in adapters["pastel"].layers if k.startswith("text_encoder."))
    written.clear()
    stack.set_scales({"pastel": {"unet": 1.0, "text_encoder": 0.5, "blocks": {"mid": 2.0}}})
    assert len(written) == 4 and all(block_of(k) == "mid" for k in written)
    written.clear()
    with pytest.raises(ValueError, match=r"no adapter named 'nope' in the stack"):
        stack.set_scales({"nope": 1.0})
    assert written == [] and stack.scales["pastel"].blocks == {"mid": 2.0}


def test_switch_and_composite(stack, adapters):
    stack.add("pastel", adapters["pastel"], 0.7)
    merge = merge_alone = stack.generate(PROMPT, **MERGE)
    for mode in ("switch", "composite"):  # one adapter: the merge result
        assert np.abs(stack.generate(PROMPT, mode=mode, **GEN) - merge).max() <= 1e-4
    stack.add("ink", adapters["ink"], 0.5)
    merge = stack.generate(PROMPT, **MERGE)
    switch = stack.generate(PROMPT, mode="switch", **GEN)
    composite = stack.generate(PROMPT, mode="composite", **GEN)
    assert np.abs(switch - merge).max() > 0.05 and np.abs(composite - merge).max() > 0.05
    assert np.abs(switch - composite).max() > 0.05
    assert np.array_equal(stack.generate(PROMPT, mode="switch", **GEN), switch)
    assert np.array_equal(stack.generate(PROMPT, mode="composite", **GEN), composite)
    assert np.abs(stack.generate(PROMPT, mode="switch", switch_every=2, **GEN) - switch).max() > 0.01
    # composite averages the branches equally: a near-zero second adapter halves the first one's
    # pull (weights by scale would leave the merge image), and opposite scales are fine.
    stack.set_scales({"ink": 1e-6})
    assert np.abs(stack.generate(PROMPT, mode="composite", **GEN) - merge_alone).max() > 0.05
    stack.set_scales({"ink": -0.7})
    assert np.isfinite(stack.generate(PROMPT, mode="composite", **GEN)).all()
    stack.set_scales({"ink": 0.5})
    assert np.array_equal(stack.generate(PROMPT, **MERGE), merge)  # modes leave the fused state as stored
    with pytest.raises(ValueError, match="unknown mode 'mix'"):
        stack.generate(PROMPT, mode="mix")
    # The shared range check (config.check_generation), as the CLI and generate_images use it.
    for bad, message in [({"steps": 0}, r"steps must be a whole number from 1 to"),
                         ({"guidance": -1.0}, r"guidance must be a number from 0 to 100"),
                         ({"seed": -1}, r"seed must be a whole number from 0 to 2\*\*63-1")]:
        with pytest.raises(ValueError, match=message):
            stack.generate(PROMPT, **{**GEN, **bad})


def test_concurrent_generate_with_scales_has_no_cross_talk(stack, adapters):
    stack.add("pastel", adapters["pastel"])
    stack.add("ink", adapters["ink"])
    jobs = [{"pastel": 1.0}, {"ink": 0.8}, {"pastel": 0.3, "ink": {"unet": 1.0, "text_encoder": 0.0}}]
    expected = [stack.generate(PROMPT, scales=s, **MERGE) for s in jobs]
    got, errors = {}, []

    def worker(i):
        try:
            for _ in range(2):
                got.setdefault(i, []).append(stack.generate(PROMPT, scales=jobs[i], **MERGE))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, images in got.items():
        assert len(images) == 2 and all(np.array_equal(img, expected[i]) for img in images)
    assert stack.scales == {"pastel": Scale(1.0, 1.0), "ink": Scale(1.0, 1.0)}  # per-call scales are not stored


def test_svd_merge_exact_at_full_rank_and_truncates_below(stack, pipe, adapters):
    items = [(adapters["pastel"], 0.7), (adapters["ink"], {"unet": 0.3, "text_encoder": 0.0})]
    merged, rel = merge_adapters(items, rank=None)
    assert rel < 1e-5
    assert len(merged.layers) == 32 + 21 and merged.rank == 4  # pastel and ink touch disjoint layers: ranks 4 and 2
    for key, layer in merged.layers.items():
        want = sum(s.of(key) * ad.layers[key].delta() for ad, s in ((a, Scale.parse(s)) for a, s in items)
                   if key in ad.layers)
        assert layer.alpha == layer.rank and torch.allclose(layer.delta(), want, atol=1e-5, rtol=0)
    overlap = [(adapters["pastel"], 0.7), (rand_adapter(pipe, list(adapters["pastel"].layers), 4, 4.0, 5), 0.3)]
    full, rel_full = merge_adapters(overlap)
    low, rel_low = merge_adapters(overlap, rank=2)
    assert full.rank == 8 and rel_full < 1e-5
    assert low.rank == 2 and 0.3 < rel_low < 0.9
    stack.add("a", overlap[0][0], 0.7)
    stack.add("b", overlap[1][0], 0.3)
    both = stack.generate(PROMPT, **MERGE)
    stack.reset()
    stack.add("m", full)
    assert np.abs(stack.generate(PROMPT, **MERGE) - both).max() <= 1e-4
    with pytest.raises(ValueError, match="every scale is 0"):
        merge_adapters([(adapters["pastel"], 0.0)])


def test_prompt_lora_tags(tmp_path, adapters):
    save_adapter(adapters["pastel"], tmp_path / "pastel.safetensors")
    save_adapter(adapters["ink"], tmp_path / "ink.safetensors")
    clean, found = parse_prompt_loras("<lora:pastel:0.8> a red star, <lora:ink> on white <lora:pastel:-1.5>", tmp_path)
    assert clean == "a red star, on white"
    both = lambda w: {"unet": w, "text_encoder": w}  # noqa: E731
    assert found == [(tmp_path / "pastel.safetensors", both(0.8)), (tmp_path / "ink.safetensors", both(1.0)),
                     (tmp_path / "pastel.safetensors", both(-1.5))]
    assert parse_prompt_loras("a star, <lora:ink:0.5>", tmp_path) == ("a star", [(tmp_path / "ink.safetensors", both(0.5))])
    for bad in ("<lora:pastel:strong>", "<lora:>", "<lora::1>", "<lora:../x:1>", "a <lora:pastel:1"):
        with pytest.raises(ValueError, match="malformed prompt tag|unclosed <lora"):
            parse_prompt_loras(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no .*missing\.safetensors \(adapters in .*: ink, pastel\)"):
        parse_prompt_loras("<lora:missing:1>", tmp_path)


def test_conv_layers_match_diffusers(stack, pipe, tmp_path):
    g = torch.Generator().manual_seed(7)
    layers = {}
    for key in ("unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.1.resnets.1.conv2"):
        out, inp, kh, kw = resolve_module(pipe, key).weight.shape
        layers[key] = LoraFactors(torch.randn(4, inp, kh, kw, generator=g) / (inp * kh * kw) ** 0.5,
                                torch.randn(out, 4, 1, 1, generator=g) * 0.4, 8.0)
    conv = Adapter(layers=layers)
    stack.add("conv", conv, 0.9)
    ours = stack.generate(PROMPT, **MERGE)
    stack.reset()
    assert np.abs(ours - base_image(pipe)).max() > 0.02
    assert np.abs(ours - diffusers_image(pipe, tmp_path, {"conv": (conv, 0.9)})).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [None, 48])  # None: whole layers; 48 elements: many row blocks per layer
def test_half_precision_weights_are_blended_in_float32(tiny_random_pipe, adapters, monkeypatch, dtype, block):
    import stylelora.blend as blend

    if block:
        monkeypatch.setattr(blend, "_HALF_BLOCK", block)
    half = copy.deepcopy(tiny_random_pipe).to(dtype=dtype)
    stack = AdapterStack(half)
    layers = adapters["pastel"].layers
    w0 = {k: resolve_module(half, k).weight.detach().clone() for k in layers}
    stack.add("pastel", adapters["pastel"], 0.5)
    exact = []
    for key, layer in layers.items():
        weight = resolve_module(half, key).weight
        want = (w0[key].float() + 0.5 * layer.delta()).to(dtype)  # the float32 sum, rounded once
        assert weight.dtype == dtype
        # One half-precision step of the operands' size: float32 rounding may move a value across a rounding
        # edge, and bf16 rounds the factors before its GEMM (a sum that cancels to ~0 is rounded at the
        # operands' scale, not its own).
        terms = (layer.up.flatten(1).abs() @ layer.down.flatten(1).abs() * layer.scale).view(want.shape)
        step = torch.finfo(dtype).eps * (w0[key].float().abs() + 0.5 * terms)
        assert ((weight.float() - want.float()).abs() <= step).all(), key
        exact.append((weight == want).float().mean())
    # most values are the float32 sum rounded once, exactly (bf16's rounded factors: about 70% here)
    assert min(exact) > (0.6 if dtype == torch.bfloat16 else 0.99), min(exact)
    after = {k: resolve_module(half, k).weight.detach().clone() for k in layers}
    with pytest.raises(ValueError, match="lower the scales"):  # past the half type's range: refused, undone
        stack.set_scales({"pastel": 1e6 if dtype == torch.float16 else 1e39})
    assert all(torch.equal(resolve_module(half, k).weight, after[k]) for k in layers)
    stack.reset()
    assert all(torch.equal(resolve_module(half, k).weight, w0[k]) for k in layers)
    stack.add("pastel", adapters["pastel"], 0.5)
    assert all(torch.equal(resolve_module(half, k).weight, after[k]) for k in layers)  # deterministic


def test_overflowing_scales_are_refused_and_leave_the_weights_as_they_were(stack, pipe, adapters):
    stack.add("pastel", adapters["pastel"], 0.5)
    before = weights(pipe)
    with pytest.raises(ValueError, match=r"gives NaN/inf in torch\.float32: lower the scales"):
        stack.set_scales({"pastel": 1e39})  # finite as a Python float, inf once in float32
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    stack.set_scales({"pastel": 0.5})  # still usable afterwards
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    # Only the up blocks overflow: the text encoder and down/mid layers are rewritten first and
    # must be put back too, and a failed add() leaves no trace.
    with pytest.raises(ValueError, match="lower the scales"):
        stack.set_scales({"pastel": {"unet": 0.7, "text_encoder": 0.7, "blocks": {"up": 1e39}}})
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    with pytest.raises(ValueError, match="lower the scales"):
        stack.add("ink", adapters["ink"], {"blocks": {"up": 1e39}})
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    assert list(stack.scales) == ["pastel"] and stack.scales["pastel"].unet == 0.5
    assert not any("attn1" in k for k in stack._w0), "the failed adapter's W0 copies were kept"
    # A failed replacement puts the adapter it replaced back, in its place, weights bit for bit.
    stack.add("ink", adapters["ink"], 0.3)
    both = weights(pipe)
    with pytest.raises(ValueError, match="lower the scales"):
        stack.add("pastel", adapters["ink"], {"blocks": {"up": 1e39}})
    assert list(stack.scales) == ["pastel", "ink"] and stack.scales["pastel"].unet == 0.5
    assert all(torch.equal(v, both[k]) for k, v in weights(pipe).items())
    stack.remove("ink")


def test_balanced_mode(stack, adapters):
    """balanced mode: one adapter is plain merge bit for bit; N active adapters are merged at
    N ** (-BALANCE_EXPONENT) of their scales; scales 0 give the base bit for bit; a seed fixes the image.
    The default mode (no mode given) is merge."""
    BAL = dict(GEN, mode="balanced")
    base = stack.generate(PROMPT, **MERGE)
    stack.add("pastel", adapters["pastel"], 0.7)
    assert np.array_equal(stack.generate(PROMPT, **BAL), stack.generate(PROMPT, **MERGE))
    stack.add("ink", adapters["ink"], 0.5)
    balanced = stack.generate(PROMPT, **BAL)
    k = 2 ** (-BALANCE_EXPONENT)
    assert k == pytest.approx(0.933, abs=1e-3)
    by_hand = stack.generate(PROMPT, scales={"pastel": 0.7 * k, "ink": 0.5 * k}, **MERGE)
    assert np.array_equal(balanced, by_hand)
    assert np.abs(balanced - stack.generate(PROMPT, **MERGE)).max() > 0.01
    assert np.array_equal(stack.generate(PROMPT, **BAL), balanced)  # deterministic
    assert np.array_equal(stack.generate(PROMPT, scales={"pastel": 0.0, "ink": 0.0}, **BAL), base)
    with stack.fused("balanced") as pipe:  # batched callers (evaluation) see the same weights
        fused = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(fused, balanced)
    assert np.array_equal(stack.generate(PROMPT, **MERGE), stack.generate(PROMPT, **MERGE))
    assert np.array_equal(stack.generate(PROMPT, **GEN), stack.generate(PROMPT, **MERGE))  # the default


def test_balanced_mode_on_sd15_layout():
    """balanced mode on SD1.5's layout (bench/blend.py's builder: 4 levels, 2 layers per block,
    12 text layers; --smoke widths), random weights and two random rank-4 adapters."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_blend", Path(__file__).parents[1] / "bench" / "blend.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe = bench.sd15_pipe(smoke=True)
    first, second = bench.random_adapters(pipe, 2, 4)
    stack = AdapterStack(pipe)
    gen = dict(steps=2, size=(64, 64), seed=5, output_type="np", mode="balanced")
    base = stack.generate(PROMPT, **gen)
    stack.add("a", first)
    assert np.array_equal(stack.generate(PROMPT, **gen), stack.generate(PROMPT, **{**gen, "mode": "merge"}))
    stack.add("b", second)
    both = stack.generate(PROMPT, **gen)
    assert np.isfinite(both).all() and np.array_equal(stack.generate(PROMPT, **gen), both)
    assert np.abs(both - stack.generate(PROMPT, **{**gen, "mode": "merge"})).max() > 1e-3
    assert np.array_equal(stack.generate(PROMPT, scales={"a": 0, "b": 0}, **gen), base)
