"""Fused scales that change during sampling, measured for stacking (docs/stacking.md, "What did not work").

A plan is 'Ea,Eb/La,Lb@F': the palette at Ea and the technique at Eb for the first F of the 20
steps, then La, Lb. '0.8,0.8/1,1@0.3' lays the picture out with both adapters turned down and styles
it at full strength; '1,1/0.85,0.85@0.5' the reverse. A scale change rewrites the fused weights once
(set_scales), so a plan costs a base image. Same 48 prompts as bench/stack_merges.py (pretraining
combinations, seed 500), or the held-out ones with --heldout.

    python bench/stack_ramp.py --folder runs/styles/defaults --pairs sepia+dots \\
        --plans "1,1/1,1@1;0.8,0.8/1,1@0.3;1,1/0.85,0.85@0.5"
"""
import time

import torch

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stack_merges import pair_args, pair_stacks, prompt_scenes, report  # bench/ is on the path when run as a script
from stack_seq import raw_scales


def ramped(pipe, stack: AdapterStack, plan: str, prompts: list[str], seeds: list[int], steps: int = 20):
    early, rest = plan.split("/")
    late, fraction = rest.split("@")
    switch_after = round(float(fraction) * steps)  # steps run with the early scales

    def to_late(pipe, step, timestep, kwargs):
        if step + 1 == switch_after:
            stack.set_scales(raw_scales(stack.names, late))
        return kwargs

    stack.set_scales(raw_scales(stack.names, early))
    return pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_inference_steps=steps, guidance_scale=5.0,
                generator=[torch.Generator().manual_seed(s) for s in seeds], callback_on_step_end=to_late).images


def main() -> None:
    ap = pair_args(__doc__)
    ap.add_argument("--plans", default="1,1/1,1@1;0.8,0.8/1,1@0.3")
    args = ap.parse_args()
    scenes, seeds = prompt_scenes(args.heldout, 100 if args.heldout else 48)
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    for pair, pal, tech, stack in pair_stacks(pipe, args.folder, args.pairs):
        prompts = [", ".join([s.caption(), pal, tech]) for s in scenes]
        for plan in args.plans.split(";"):
            t = time.time()
            images = [im for i in range(0, len(prompts), 32)
                      for im in ramped(pipe, stack, plan, prompts[i:i + 32], seeds[i:i + 32])]
            report(images, scenes, [pal, tech], pal, tech, pair=pair, plan=plan, s=round(time.time() - t, 1))


if __name__ == "__main__":
    main()
