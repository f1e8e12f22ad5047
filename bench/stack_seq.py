"""Stacking in stages, measured (docs/stacking.md, "What did not work"): draw with one set of fused
scales, re-noise the result's latent to `strength` and finish with another (img2img on latents).

A plan is 'P1,T1/P2,T2@S': stage 1 with the palette at P1 and the technique at T1 (20 steps), stage 2
from strength S with P2, T2 (S x 20 steps). 1,0/0,1@0.5 = the palette draws, the technique restyles
the second half. Costs 1 + S base images. Same 48 prompts as bench/stack_merges.py (pretraining
combinations, seed 500).

    python bench/stack_seq.py --folder runs/styles/defaults --plans "1,0/0,1@0.5;0,1/1,0@0.3"
"""
import argparse
import time

import torch
from diffusers import StableDiffusionImg2ImgPipeline

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stack_merges import pair_stacks, prompt_scenes, report  # bench/ is on the path when run as a script


def raw_scales(names: list[str], text: str) -> dict:
    """'P,T' as AdapterStack scales: raw (no strength map), the same on the UNet and the text encoder."""
    return {n: {"unet": float(v), "text_encoder": float(v), "raw": True} for n, v in zip(names, text.split(","))}


def staged(pipe, img2img, stack: AdapterStack, plan: str, prompts: list[str], seeds: list[int]):
    """set_scales writes the merge of the given scales into the weights the plain pipelines use."""
    first, rest = plan.split("/")
    second, strength = rest.split("@")
    common = {"negative_prompt": [""] * len(prompts), "num_inference_steps": 20, "guidance_scale": 5.0}
    stack.set_scales(raw_scales(stack.names, first))
    latents = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                   output_type="latent", **common).images
    stack.set_scales(raw_scales(stack.names, second))
    return img2img(prompt=prompts, image=latents, strength=float(strength),
                   generator=[torch.Generator().manual_seed(s + 10_000) for s in seeds], **common).images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--pairs", default="pastel+dots,pastel+stripes,sepia+dots,sepia+stripes")
    ap.add_argument("--plans", required=True, help="';'-separated P1,T1/P2,T2@S")
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    scenes, seeds = prompt_scenes(False, args.n)
    for pair, pal, tech, stack in pair_stacks(pipe, args.folder, args.pairs):
        prompts = [", ".join([s.caption(), pal, tech]) for s in scenes]
        for plan in args.plans.split(";"):
            t = time.time()
            images = staged(pipe, img2img, stack, plan, prompts, seeds)
            report(images, scenes, [pal, tech], pal, tech, pair=pair, plan=plan, s=round(time.time() - t, 1))


if __name__ == "__main__":
    main()
