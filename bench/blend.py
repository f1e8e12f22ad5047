"""Blending benchmark: stylelora's AdapterStack against plain diffusers on the same adapters.

  (a) generation time with 4 adapters blended / the base alone (goal <= 1.03), beside diffusers'
      unfused set_adapters path;
  (b) time to apply new scales with 4 active + 8 inactive adapters loaded, against diffusers'
      unfuse_lora + set_adapters + fuse_lora (goal <= 0.25x).

Bases: the embedded shapes base (skipped with a note while it is missing) and an SD1.5-architecture
UNet + CLIP-L text encoder with random weights (a tiny VAE decodes: it is not what is measured),
at a small resolution. Adapters: 12 random rank-16 LoRAs on attn2 q/k/v/out + text-encoder
q/k/v/out projections, made here. Writes a markdown table to stdout and bench/results/blend.md.

    python bench/blend.py                 # ~3 min on 2 cores
    python bench/blend.py --smoke         # seconds: an SD1.5-shaped but narrow model, code paths only
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


def random_adapters(pipe, n: int, rank: int) -> list[Adapter]:
    keys = (["unet." + k for k in find_targets(pipe.unet, r"attn2\.(to_q|to_k|to_v|to_out\.0)")]
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


def bench(label: str, pipe, steps: int, size: int, repeats: int) -> dict:
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    active = names[:N_ACTIVE]
    scale_sets = [{n: 0.2 + 0.1 * ((i + r) % 5) for i, n in enumerate(active)} for r in range(repeats + 1)]
    gen = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=size, height=size)
    seeded = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    adapters = random_adapters(pipe, N_ADAPTERS, RANK)
    targeted = sum(resolve_module(pipe, k).weight.numel() for k in adapters[0].layers)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "attn2" in k}

    stack = AdapterStack(pipe)
    for name, ad in zip(names, adapters):
        stack.add(name, ad, 0.0)
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
    t_apply = [seconds(lambda s=s: stack.set_scales(s)) for s in scale_sets[1:]]
    stack.reset()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items()), "reset is not exact"

    with tempfile.TemporaryDirectory() as tmp:
        t_load = seconds(lambda: [pipe.load_lora_weights(str(save_adapter(ad, Path(tmp) / f"{n}.safetensors")),
                                                         adapter_name=n) for n, ad in zip(names, adapters)])
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
    return {"base": label, "targeted_params": targeted, "gen_base_s": med(t_base), "gen_ours_s": med(t_ours),
            "gen_diffusers_unfused_s": med(t_unfused), "apply_ours_ms": 1e3 * med(t_apply),
            "apply_diffusers_refuse_ms": 1e3 * med(t_refuse), "set_adapters_only_ms": 1e3 * med(t_set_only),
            "diffusers_load_12_s": t_load, "max_abs_diff": float(np.abs(ours_img - theirs_img).max())}


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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="SD1.5-architecture image size in pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="narrow SD-shaped model, 1 repeat: checks the code runs")
    p.add_argument("--out", default=None, help="default: bench/results/blend.md (a smoke run writes nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.size, args.steps = 1, 64, 2
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()  # per-adapter load reports would bury the table
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
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
    text = table(rows, notes, args)
    print(text)
    out = args.out or (None if args.smoke else Path(__file__).parent / "results" / "blend.md")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


if __name__ == "__main__":
    main()
