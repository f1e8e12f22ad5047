"""Each adapter reads the prompt with its own text-encoder LoRA, measured for stacking (docs/stacking.md).

In a merge both adapters' text-encoder LoRAs are summed and read a caption with both trigger words,
which neither saw in training. Here the prompt is encoded once per adapter, with only that
adapter's text-encoder LoRA on, and the UNet (both UNet LoRAs summed, as in merge) attends to the
two encodings side by side (concatenated along the token axis, as A1111 does for prompts longer
than 75 tokens; cross-attention has no positions, so the order does not matter). Variants:

  merge     the reference: one encoding, both text-encoder LoRAs summed, both trigger words
  own       per adapter: its text-encoder LoRA only, the caption with its own trigger word only
  both      per adapter: its text-encoder LoRA only, the caption with both trigger words
  ownmean   as own, the two encodings averaged instead of concatenated

With one adapter every variant is that adapter alone. Cost: the text encoder runs once per adapter
(a small part of an image), the UNet once as in merge, with twice the context tokens. Same 48
prompts as bench/stack_merges.py (pretraining combinations, seed 500), or --heldout.

    python bench/stack_embeds.py --folder runs/styles/defaults --variants merge,own,both
"""
import time

import torch

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stack_merges import pair_args, pair_stacks, prompt_scenes, report  # bench/ is on the path when run as a script


def encode(pipe, stack: AdapterStack, te_on: dict[str, float], prompts: list[str]):
    """(prompt, negative) embeddings with the text-encoder LoRAs at `te_on` (the UNet's do not matter here)."""
    stack.set_scales({n: {"unet": 0.0, "text_encoder": te_on.get(n, 0.0), "raw": True} for n in stack.names})
    return pipe.encode_prompt(prompts, pipe._execution_device, 1, True, [""] * len(prompts))


def embeds(pipe, stack: AdapterStack, variant: str, captions: list[str], pal: str, tech: str):
    both = [f"{c}, {pal}, {tech}" for c in captions]
    if variant == "merge":
        return encode(pipe, stack, {pal: 1.0, tech: 1.0}, both)
    parts = [encode(pipe, stack, {name: 1.0}, both if variant == "both" else [f"{c}, {name}" for c in captions])
             for name in (pal, tech)]
    if variant == "ownmean":
        return tuple((a + b) / 2 for a, b in zip(*parts))
    return tuple(torch.cat([a, b], dim=1) for a, b in zip(*parts))


def main() -> None:
    ap = pair_args(__doc__)
    ap.add_argument("--variants", default="merge,own,both")
    ap.add_argument("--n", type=int, default=None, help="prompts (default 48, held out 100)")
    args = ap.parse_args()
    scenes, seeds = prompt_scenes(args.heldout, args.n or (100 if args.heldout else 48))
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    for pair, pal, tech, stack in pair_stacks(pipe, args.folder, args.pairs):
        for variant in args.variants.split(","):
            t, images = time.time(), []
            for i in range(0, len(scenes), 32):
                captions = [s.caption() for s in scenes[i:i + 32]]
                cond, uncond = embeds(pipe, stack, variant, captions, pal, tech)
                stack.set_scales({n: {"unet": 1.0, "text_encoder": 1.0, "raw": True} for n in stack.names})
                images += pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=20,
                               guidance_scale=5.0,
                               generator=[torch.Generator().manual_seed(s) for s in seeds[i:i + 32]]).images
            report(images, scenes, [pal, tech], pal, tech, pair=pair, variant=variant, s=round(time.time() - t, 1))


if __name__ == "__main__":
    main()
