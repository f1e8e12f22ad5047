"""The balanced mode's factor k (each of two adapters at k x its raw scale) against guidance, on
prompts from the pretraining combinations (not the held-out ones the README's tables use), so the
default can be chosen without looking at the held-out prompts.

    python bench/stack_factor.py --folder runs/styles/defaults --n 48 --seed 500 \
        --k 0.79,0.87,1.0 --guidance 3,4,5      # ~12 min on 2 cores

Prints one JSON line per pair x k x guidance: both styles seen, shape and colour kept.
"""
import argparse
import itertools
import json
import time

import numpy as np

import stylelora.blend as blend
from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.evaluate import both_rate, score, stack_images
from stylelora.world.render import TRAIN_COMBOS, Scene

PAIRS = ("pastel+dots", "pastel+stripes", "sepia+dots", "sepia+stripes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True, help="holds PALETTE.safetensors and TECHNIQUE.safetensors")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--k", default="0.79,0.87,1.0")
    ap.add_argument("--guidance", default="3,4,5")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    scenes = [Scene(*TRAIN_COMBOS[i]) for i in rng.choice(len(TRAIN_COMBOS), args.n, replace=False)]
    pipe = load_base()
    default = blend.balanced
    for pair in args.pairs.split(","):
        a, b = pair.split("+")
        stack = AdapterStack(pipe)
        for name in (a, b):
            stack.add(name, f"{args.folder}/{name}.safetensors", 1.0)
        prompts = [", ".join([s.caption(), a, b]) for s in scenes]
        for k, g in itertools.product(map(float, args.k.split(",")), map(float, args.guidance.split(","))):
            # the factor is the module's function: replaced for this measurement only
            blend.balanced = lambda scales, active, k=k: {n: s.times(k) if n in active else s for n, s in scales.items()}
            t = time.time()
            images = stack_images(stack, pipe, prompts, [args.seed + i for i in range(args.n)], "balanced", guidance=g)
            r = score(images, scenes, per_image=True)
            print(json.dumps({"pair": pair, "k": k, "guidance": g, "both": round(both_rate(r.pop("per_image"), [a, b]), 3),
                              "shape": round(r["shape_acc"], 3), "colour": round(r["color_acc"], 3),
                              "s": round(time.time() - t, 1)}), flush=True)
        blend.balanced = default
        stack.reset()


if __name__ == "__main__":
    main()
