"""Blending benchmark: stylelora's AdapterStack against plain diffusers on the same adapters.

  (a) generation time with 4 adapters blended / the base alone (goal <= 1.03), beside diffusers'
      unfused set_adapters path;
  (b) time to apply new scales with 4 active + 8 inactive adapters loaded, against diffusers'
      unfuse_lora + set_adapters + fuse_lora (goal <= 0.25x; the SDXL row <= 0.1x);
  (c) --sdxl only (issue #15): (b) against its floor, one torch.addmm per targeted layer, W += B @ A
      with the 4 active adapters' factors concatenated (floor_work; goal <= 1.5x).

Bases: the embedded shapes base (skipped with a note while it is missing) and an SD1.5-architecture
UNet + CLIP-L text encoder with random weights (a tiny VAE decodes: it is not what is measured),
at a small resolution. Adapters: 12 random rank-16 LoRAs on attn2 q/k/v/out + text-encoder
q/k/v/out projections, made here. Writes a markdown table to stdout and bench/results/blend.md.

--sdxl: one SDXL-size row instead, to bench/results/blend-sdxl.md: SDXL base 1.0's UNet and both text
encoders (bench/train.py's sdxl_configs), random weights, the tiny VAE; 12 random rank-16 adapters on
kohya's full SDXL module set (722 UNet + 264 text-encoder modules, asserted), saved with save_adapter
(kohya keys) for diffusers' side; 2 steps at 256 px. In bfloat16 by default: in float32 the pipeline
(13.5 GB) plus AdapterStack's W0 copies of the targeted layers (11.7 GB) and the adapters (2.7 GB) need
~30 GB; the script estimates the RAM on the meta device first and refuses what MemAvailable cannot hold.
The stack's W0 copies are dropped (reset) before diffusers loads the adapters, so the two halves do not
add up.

    python bench/blend.py                 # ~3 min on 2 cores
    python bench/blend.py --smoke         # seconds: an SD1.5-shaped but narrow model, code paths only
    python bench/blend.py --sdxl          # ESTIMATE ~10-20 min on 2 idle cores, peak RAM ~16-17 GB
    python bench/blend.py --sdxl --smoke  # ~40 s: the SDXL layout at toy widths (writes nothing)
    python bench/blend.py --sdxl --count-only   # module counts and RAM estimate, no weights (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Not on huge pages (THP_MEM_ALLOC_ENABLE, which the `stylelora` command sets): with them, base and
# blended calls, the same work, differed by -3..+11% between runs here (page-fault compaction stalls);
# without, by under 1%. Without them, the diffusers column is confounded instead: see the README.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stylelora.adapters import Adapter, LoraFactors, resolve_module, save_adapter  # noqa: E402
from stylelora.blend import AdapterStack  # noqa: E402
from stylelora.lora import find_targets  # noqa: E402

PROMPT = "a red star on a white background"
N_ADAPTERS, N_ACTIVE, RANK = 12, 4, 16


def sd15_pipe(smoke: bool):
    """SD1.5's UNet and CLIP-L configs (as published in its model_index components), random weights.
    --smoke keeps the layout (4 levels, 2 layers per block, 12 text layers) at a fraction of the width."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylelora.world.models import make_vae
    from stylelora.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    width, text = ((32, 64, 64, 64), 64) if smoke else ((320, 640, 1280, 1280), 768)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=width,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text, attention_head_dim=8, norm_num_groups=32 if not smoke else 16)
    tok = build_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text, intermediate_size=4 * text, num_hidden_layers=12,
        num_attention_heads=12 if not smoke else 4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=text, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id))
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(make_vae(), te, tok, unet, sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipe(smoke: bool, dtype: torch.dtype):
    """SDXL base 1.0's UNet and both text encoders (bench/train.py's sdxl_configs, from the published
    configs), random weights, each cast to `dtype` as soon as it is built; the tiny VAE of the SD1.5 row
    (decoding is not what is measured). --smoke keeps the layout at toy widths."""
    from diffusers import StableDiffusionXLPipeline

    from bench.train import sdxl_models, sdxl_scheduler
    from stylelora.world.models import make_vae
    from stylelora.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    m = sdxl_models(smoke, tok, dtype=dtype, vae=False)
    pipe = StableDiffusionXLPipeline(vae=make_vae().to(dtype), text_encoder=m["text_encoder"],
                                     text_encoder_2=m["text_encoder_2"], tokenizer=tok, tokenizer_2=tok, unet=m["unet"],
                                     scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# kohya's full SDXL module set by its names (what a full kohya SDXL LoRA holds: 722 UNet + 264 text-encoder
# modules); kohya_keys finds it by module class, as sd-scripts' networks/lora.py does, and checks both agree.
KOHYA_UNET = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)"
KOHYA_TE = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
KOHYA_SDXL_COUNTS = {"unet": 722, "text_encoders": 264}


def kohya_keys(models: dict) -> list[str]:
    """Adapter keys of kohya sd-scripts' LoRA module set (networks/lora.py) on SDXL components {"unet",
    "text_encoder", "text_encoder_2"}: every nn.Linear (and 1x1 Conv2d) inside the UNet's
    Transformer2DModel blocks (attn1/attn2 q/k/v/out, ff.net.0.proj, ff.net.2, proj_in, proj_out) and inside
    the text encoders' CLIPAttention and CLIPMLP (q/k/v/out_proj, fc1, fc2). Raises if that class-based set
    and the names KOHYA_UNET / KOHYA_TE differ."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP

    def inside(model, classes) -> list[str]:
        found = []
        for name, mod in model.named_modules():
            if isinstance(mod, classes):
                found += [f"{name}.{sub}" for sub, m in mod.named_modules() if sub and (
                    isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)))]
        return found

    keys = []
    for comp, classes, names in (("unet", Transformer2DModel, KOHYA_UNET), ("text_encoder", (CLIPAttention, CLIPMLP),
                                 KOHYA_TE), ("text_encoder_2", (CLIPAttention, CLIPMLP), KOHYA_TE)):
        by_class, by_name = inside(models[comp], classes), find_targets(models[comp], names)
        if sorted(by_class) != sorted(by_name):
            raise AssertionError(f"{comp}: kohya's classes give {len(by_class)} modules, the names {len(by_name)}: "
                                 f"{sorted(set(by_class) ^ set(by_name))[:5]}")
        # adapter keys name text-encoder modules without `text_model.` (stylelora.adapters' convention;
        # transformers 5 keeps that level in CLIPTextModelWithProjection only)
        keys += [f"{comp}.{k.removeprefix('text_model.') if comp != 'unet' else k}" for k in by_name]
    return keys


def count_kohya(keys: list[str]) -> dict[str, int]:
    unet = sum(k.startswith("unet.") for k in keys)
    return {"unet": unet, "text_encoders": len(keys) - unet}


def sdxl_memory(smoke: bool, dtype: torch.dtype) -> tuple[dict[str, float], list[str]]:
    """The SDXL row's RAM (bytes) by part, and the kohya keys, from the architecture on the meta device
    (no weights): pipeline, AdapterStack's W0 copies of every targeted layer, the 12 float32 adapters, the
    floor's concatenated factors, and a margin for libraries and activations."""
    from accelerate import init_empty_weights

    from bench.train import sdxl_models
    from stylelora.world.tokenizer import build_tokenizer

    with init_empty_weights():
        models = sdxl_models(smoke, build_tokenizer(), vae=False)
    keys = kohya_keys(models)
    mods = {k: resolve_module(SimpleNamespace(**models), k) for k in keys}
    side = sum(m.weight.shape[0] + m.weight[0].numel() for m in mods.values())  # sum of (out + in) over layers
    size = torch.empty((), dtype=dtype).element_size()
    parts = {"pipeline weights": size * sum(p.numel() for m in models.values() for p in m.parameters()),
             "AdapterStack W0 copies": size * sum(m.weight.numel() for m in mods.values()),
             f"{N_ADAPTERS} random adapters (float32)": 4 * N_ADAPTERS * RANK * side,
             "floor factors": size * N_ACTIVE * RANK * side, "libraries, activations, margin": 1.5e9}
    return parts, keys


def random_adapters(pipe, n: int, rank: int, keys: list[str] | None = None) -> list[Adapter]:
    """n random rank-`rank` LoRAs on `keys` (default: SD's attn2 q/k/v/out + text-encoder q/k/v/out)."""
    keys = keys or (["unet." + k for k in find_targets(pipe.unet, r"attn2\.(to_q|to_k|to_v|to_out\.0)")]
                    + ["text_encoder." + k for k in find_targets(pipe.text_encoder, r"self_attn\.(q|k|v|out)_proj")])
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        layers = {}
        for key in keys:
            o, i = resolve_module(pipe, key).weight.shape
            layers[key] = LoraFactors(torch.randn(rank, i, generator=g) / i ** 0.5,
                                    torch.randn(o, rank, generator=g) * 0.3 / rank ** 0.5, float(rank))
        out.append(Adapter(layers=layers))
    return out


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def floor_work(pipe, adapters: list[Adapter], scales: dict[str, float], names: list[str]):
    """The floor of applying new scales: one torch.addmm per targeted layer, W += B @ A, in the weight's own
    dtype, with B = [s_i * (alpha_i / r_i) * B_i] (out, 4 x 16) and A = [A_i] (4 x 16, in) of the active
    adapters concatenated beforehand -- the one matrix product and the one read and write of every
    targeted weight that AdapterStack's fused rewrite (addmm of the kept W0 straight into the weight)
    cannot avoid. Returns the function doing it; it leaves the weights changed (AdapterStack rewrites them
    from W0 on its next scale change, and reset() restores W0)."""
    active = [(adapters[names.index(n)], s) for n, s in scales.items()]
    work = []
    for key in adapters[0].layers:
        weight = resolve_module(pipe, key).weight.detach()
        w = weight.view(weight.shape[0], -1)
        up = torch.cat([ad.layers[key].up.flatten(1) * (s * ad.layers[key].scale) for ad, s in active], 1)
        down = torch.cat([ad.layers[key].down.flatten(1) for ad, _ in active], 0)
        work.append((w, up.to(w.dtype), down.to(w.dtype)))

    @torch.no_grad()
    def run():
        for w, up, down in work:
            w.addmm_(up, down)
    return run


def diffusers_lora_modules(pipe, adapter: str) -> int:
    """Modules diffusers put `adapter`'s LoRA on, over the UNet and the text encoders."""
    from peft.tuners.lora import LoraLayer

    models = [getattr(pipe, c, None) for c in ("unet", "text_encoder", "text_encoder_2")]
    return sum(isinstance(m, LoraLayer) and adapter in m.lora_A for model in models if model is not None
               for m in model.modules())


def bench(label: str, pipe, steps: int, size: int, repeats: int, keys: list[str] | None = None,
          floor: bool = False) -> dict:
    """One row. keys: the targeted modules (default: random_adapters'); floor: also time floor_work,
    interleaved with the scale changes it is the floor of."""
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    active = names[:N_ACTIVE]
    scale_sets = [{n: 0.2 + 0.1 * ((i + r) % 5) for i, n in enumerate(active)} for r in range(repeats + 1)]
    gen = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size)
    seeded = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    t0 = time.perf_counter()
    adapters = random_adapters(pipe, N_ADAPTERS, RANK, keys)
    keys = list(adapters[0].layers)
    targeted = sum(resolve_module(pipe, k).weight.numel() for k in keys)
    # reset() must restore W0 bit for bit: kept for 40 of the targeted layers at most (SDXL's are 6-12 GB)
    before = {k: resolve_module(pipe, k).weight.detach().clone() for k in keys[::max(1, len(keys) // 40)]}

    stack = AdapterStack(pipe)
    for name, ad in zip(names, adapters):
        stack.add(name, ad, 0.0)
    t_setup = time.perf_counter() - t0
    t_base, t_ours = [], []
    for r in range(repeats + 1):  # interleaved; round 0 warms up
        stack.set_scales({n: 0.0 for n in active})
        tb = seconds(lambda: pipe(**gen, generator=seeded()))
        stack.set_scales(scale_sets[0])
        to = seconds(lambda: stack.generate(PROMPT, seed=0, steps=steps, guidance=5.0, size=(size, size), mode="merge"))
        if r:
            t_base.append(tb)
            t_ours.append(to)
    ours_img = stack.generate(PROMPT, seed=0, steps=steps, guidance=5.0, size=(size, size), output_type="np",
                              mode="merge")  # the weighted sum diffusers computes
    t_apply, t_floor = [], []
    lowest = floor_work(pipe, adapters, scale_sets[1], names) if floor else None
    for s in scale_sets[1:]:  # every active scale changes each time, so every targeted layer is rewritten
        t_apply.append(seconds(lambda s=s: stack.set_scales(s)))
        if lowest is not None:
            t_floor.append(seconds(lowest))
    del lowest
    stack.reset()  # from here on, no W0 copies: the diffusers half has the memory the stack had
    assert all(torch.equal(v, resolve_module(pipe, k).weight) for k, v in before.items()), "reset is not exact"
    del stack, before

    with tempfile.TemporaryDirectory() as tmp:
        files = [save_adapter(ad, Path(tmp) / f"{n}.safetensors") for n, ad in zip(names, adapters)]
        del adapters
        t_load = seconds(lambda: [pipe.load_lora_weights(str(f), adapter_name=n) for n, f in zip(names, files)])
    loaded = diffusers_lora_modules(pipe, names[0])
    assert loaded == len(keys), f"diffusers loaded {loaded} of the {len(keys)} adapted modules"
    pipe.set_adapters(active, [scale_sets[0][n] for n in active])
    theirs_img = pipe(**gen, generator=seeded(), output_type="np").images[0]
    t_unfused = [seconds(lambda: pipe(**gen, generator=seeded())) for _ in range(repeats)]
    t_refuse = []
    for r, s in enumerate(scale_sets[1:]):
        def refuse(s=s, first=(r == 0)):
            if not first:
                pipe.unfuse_lora()
            pipe.set_adapters(active, [s[n] for n in active])
            pipe.fuse_lora(adapter_names=active)
        t_refuse.append(seconds(refuse))
    pipe.unfuse_lora()  # before set_adapters: unfusing after a scale change would not restore W0 (#5604)
    t_set_only = [seconds(lambda s=s: pipe.set_adapters(active, [s[n] for n in active])) for s in scale_sets[1:]]
    pipe.unload_lora_weights()

    med = statistics.median
    return {"base": label, "targeted_params": targeted, "modules": count_kohya(keys) | {"all": len(keys)},
            "gen_base_s": med(t_base), "gen_ours_s": med(t_ours),
            "gen_diffusers_unfused_s": med(t_unfused), "apply_ours_ms": 1e3 * med(t_apply),
            "apply_floor_ms": 1e3 * med(t_floor) if t_floor else None,
            "apply_diffusers_refuse_ms": 1e3 * med(t_refuse), "set_adapters_only_ms": 1e3 * med(t_set_only),
            "diffusers_load_12_s": t_load, "setup_s": t_setup,
            "max_abs_diff": float(np.abs(ours_img - theirs_img).max())}


def table(rows: list[dict], notes: list[str], args) -> str:
    lines = [f"# AdapterStack vs diffusers ({N_ADAPTERS} rank-{RANK} adapters loaded, {N_ACTIVE} active; "
             f"{args.steps} steps, CFG 5, {torch.get_num_threads()} threads)", "",
             "| base | targeted params | base gen s | blended gen s (ratio, goal <= 1.03) | diffusers unfused gen s (ratio) "
             "| apply scales: ours ms | diffusers unfuse+set+fuse ms | ours / diffusers (goal <= 0.25) "
             "| diffusers set_adapters only ms | max abs pixel diff vs diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["gen_base_s"]
        lines.append(f"| {r['base']} | {r['targeted_params'] / 1e6:.1f}M | {b:.3f} | {r['gen_ours_s']:.3f} "
                     f"({r['gen_ours_s'] / b:.3f}) | {r['gen_diffusers_unfused_s']:.3f} "
                     f"({r['gen_diffusers_unfused_s'] / b:.3f}) | {r['apply_ours_ms']:.1f} | "
                     f"{r['apply_diffusers_refuse_ms']:.1f} | {r['apply_ours_ms'] / r['apply_diffusers_refuse_ms']:.3f} "
                     f"| {r['set_adapters_only_ms']:.1f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def table_sdxl(row: dict, notes: list[str], args) -> str:
    """The SDXL-size row with issue #15's goals: generation <= 1.03x base; applying new scales <= 0.1x
    diffusers' unfuse + set_adapters + fuse and <= 1.5x the floor (floor_work)."""
    r, b = row, row["gen_base_s"]
    m = r["modules"]
    lines = [f"# AdapterStack vs diffusers on SDXL ({N_ADAPTERS} rank-{RANK} adapters loaded, {N_ACTIVE} active, "
             f"kohya's full module set; {args.steps} steps at {args.size} px, CFG 5, "
             f"{torch.get_num_threads()} threads)",
             "", "| base | weights | modules (UNet + TE) | targeted params | base gen s "
             "| blended gen s (ratio, goal <= 1.03) | diffusers unfused gen s (ratio) | apply scales: ours ms "
             "| floor: one addmm per layer ms "
             "| ours / floor (goal <= 1.5) | diffusers unfuse+set+fuse ms | ours / diffusers (goal <= 0.1) "
             "| diffusers set_adapters only ms | max abs pixel diff vs diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {r['base']} | {args.dtype} | {m['unet']} + {m['text_encoders']} | {r['targeted_params'] / 1e6:.0f}M "
             f"| {b:.3f} | {r['gen_ours_s']:.3f} ({r['gen_ours_s'] / b:.3f}) | {r['gen_diffusers_unfused_s']:.3f} "
             f"({r['gen_diffusers_unfused_s'] / b:.3f}) | {r['apply_ours_ms']:.1f} | {r['apply_floor_ms']:.1f} "
             f"| {r['apply_ours_ms'] / r['apply_floor_ms']:.2f} | {r['apply_diffusers_refuse_ms']:.1f} "
             f"| {r['apply_ours_ms'] / r['apply_diffusers_refuse_ms']:.3f} | {r['set_adapters_only_ms']:.1f} "
             f"| {r['max_abs_diff']:.1e} |"]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def _mem_available() -> float | None:
    try:
        return int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def publish(text: str, args, name: str) -> str:
    """Print the table and write it to --out or bench/results/NAME (a smoke run writes nothing)."""
    print(text)
    out = args.out or (None if args.smoke else Path(__file__).parent / "results" / name)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def main_sdxl(args) -> str:
    """The SDXL-size row (issue #15): memory estimate and module count first (meta device), then the row."""
    import resource

    dtype = getattr(torch, args.dtype)
    parts, keys = sdxl_memory(args.smoke, dtype)
    counts, need, avail = count_kohya(keys), sum(parts.values()), _mem_available()
    print(f"kohya's SDXL module set ({'narrow, --smoke' if args.smoke else 'full size'}): {counts['unet']} UNet + "
          f"{counts['text_encoders']} text-encoder modules", file=sys.stderr)
    if not args.smoke and counts != KOHYA_SDXL_COUNTS:
        raise SystemExit(f"kohya's full SDXL set is {KOHYA_SDXL_COUNTS}, this architecture gives {counts}")
    estimate = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items())
    print(f"RAM estimate in {args.dtype}: {need / 1e9:.1f} GB ({estimate}); MemAvailable "
          f"{'?' if avail is None else f'{avail / 1e9:.1f} GB'}", file=sys.stderr)
    if args.count_only:
        return ""
    if avail is not None and need > avail:
        raise SystemExit(f"the SDXL row in {args.dtype} needs ~{need / 1e9:.1f} GB ({estimate}) and this machine has "
                         f"{avail / 1e9:.1f} GB available: run it with --dtype bfloat16, alone, or on a bigger machine")
    full32 = sum(sdxl_memory(False, torch.float32)[0].values())
    t0 = time.perf_counter()
    pipe = sdxl_pipe(args.smoke, dtype)
    t_build = time.perf_counter() - t0
    label = "SDXL layout, narrow (smoke)" if args.smoke else "SDXL UNet + CLIP-L + bigG, random"
    row = bench(label, pipe, args.steps, args.size, args.repeats, keys=keys, floor=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    notes = (["smoke run: SDXL layout at toy widths, timings mean nothing"] if args.smoke else []) + [
        f"modules: kohya sd-scripts' SDXL LoRA set (networks/lora.py: every Linear in the UNet's Transformer2DModel "
        "blocks -- attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out -- and in both "
        "text encoders' CLIPAttention/CLIPMLP -- q/k/v/out_proj, fc1, fc2); counted by class and by name, the same "
        f"{counts['unet']} + {counts['text_encoders']}; diffusers' load_lora_weights of our saved (kohya-key) files "
        f"put LoRA on all {row['modules']['all']} of them (checked)",
        f"weights in {args.dtype}: UNet, both text encoders and the tiny VAE (not what is measured). At full size "
        f"float32 would need ~{full32 / 1e9:.1f} GB, more than a 24 GiB machine has (hence bfloat16 by default): "
        "the float32 pipeline plus AdapterStack's float32 copy of W0 for every targeted layer (kohya's set is 86% "
        "of the UNet's and 87% of the text encoders' weights) plus the adapters",
        "blended gen = AdapterStack.generate with the 4 fused (8 more loaded at scale 0); base gen = the same "
        "pipeline call with no adapter; both interleaved, medians after one warm-up round",
        "apply scales: ours = AdapterStack.set_scales with all 4 active scales changed, every targeted layer "
        "rewritten; diffusers = unfuse_lora + set_adapters + fuse_lora (first round: no unfuse), all 12 loaded",
        "floor = one torch.addmm per targeted layer: W += B @ A in the weight's dtype, B (out, 64) and A (64, in) "
        "the 4 active adapters' factors concatenated (scales folded into B) beforehand: the one product and the "
        "one read and write of each weight any rewrite needs; timed interleaved with ours. "
        + ("In bfloat16 AdapterStack's rewrite is a bf16 addmm too, from its kept W0 into the weight (the "
           "same product; the floor adds in place)" if dtype != torch.float32 else
           "In float32 AdapterStack's own rewrite is this addmm, from its kept W0 straight into the weight"),
        f"RAM: estimated {need / 1e9:.1f} GB ({estimate}); measured peak RSS of this process {peak / 1e9:.1f} GB; "
        f"MemAvailable at start {'?' if avail is None else f'{avail / 1e9:.1f} GB'}",
        f"time: pipeline built in {t_build:.0f} s, 12 adapters made and added to the stack in {row['setup_s']:.0f} s, "
        f"12 loaded into diffusers in {row['diffusers_load_12_s']:.0f} s",
        "max abs pixel diff: our fused image vs diffusers' unfused image, float32 before quantization"
        + (" (in bfloat16 fused and unfused weights round differently: ~1e-2 expected)" if dtype != torch.float32
           else "")]
    return publish(table_sdxl(row, notes, args), args, "blend-sdxl.md")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 4; --sdxl 2)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels of the SD1.5 (default 128) or "
                                                          "SDXL (default 256) row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="narrow SD-shaped model, 1 repeat: checks the code runs")
    p.add_argument("--sdxl", action="store_true", help="the SDXL-size row instead (issue #15; kohya's full module "
                                                       "set); writes bench/results/blend-sdxl.md")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="--sdxl: the weights' dtype (float32 needs ~30 GB at full size)")
    p.add_argument("--count-only", action="store_true",
                   help="--sdxl: count kohya's modules and estimate RAM on the meta device (no weights), then exit")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="default: bench/results/blend.md, or blend-sdxl.md with --sdxl "
                                               "(a smoke run writes nothing)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.sdxl else 4)
    args.size = args.size or (256 if args.sdxl else 128)
    if args.smoke:
        args.repeats, args.size, args.steps = 1, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()  # per-adapter load reports would bury the table
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    if args.sdxl:
        return main_sdxl(args)
    rows, notes = [], []
    from stylelora.base import EMBEDDED_DIR, load_base

    if args.smoke:
        notes.append("smoke run: narrow SD1.5-shaped model, timings mean nothing")
    elif (EMBEDDED_DIR / "model_index.json").is_file():
        # 0.06 s a call: many rounds, so hiccups of a few ms on a shared VM do not move the median
        rows.append(bench("embedded shapes base (64 px)", load_base(), args.steps, 64, 20 * args.repeats))
    else:
        notes.append(f"embedded base skipped: {EMBEDDED_DIR} has no model_index.json yet")
    label = "SD1.5-shaped, narrow (smoke)" if args.smoke else f"SD1.5 UNet + CLIP-L, random ({args.size} px)"
    rows.append(bench(label, sd15_pipe(args.smoke), args.steps, args.size, args.repeats))
    notes += ["blended gen = AdapterStack.generate with the 4 fused (8 more loaded at scale 0); base gen = the "
              "same pipeline call with no adapter; both interleaved, medians after one warm-up round",
              "apply scales: ours = AdapterStack.set_scales with all 4 active scales changed; diffusers = "
              "unfuse_lora + set_adapters + fuse_lora (first round: no unfuse), with all 12 loaded",
              "max abs pixel diff: our fused image vs diffusers' unfused image, float32 before quantization"]
    return publish(table(rows, notes, args), args, "blend.md")


if __name__ == "__main__":
    main()
