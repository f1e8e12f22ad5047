"""Weight-space ways to merge two adapters, scored by the judge (docs/stacking.md, "What did not work").

Each variant turns the two adapters' per-layer updates dA, dB (dense, alpha / rank applied) into one
update, fused as a single adapter; the stack prompt names both trigger words:

  merge       dA + dB (the plain weighted sum at 1.0 / 1.0)
  kF          F * (dA + dB): the balanced mode's factor F for two adapters (k0.93 = the balanced mode for two; merge is the default)
  aFbG        F * dA + G * dB: a factor per adapter (palette F, technique G): what any per-adapter
              choice of fused scales can reach (a0.9b0.8)
  GROUP=F     the layers whose group (see --layers: 'up0 ff', 'mid cross-attn', 'text encoder', ...)
              contains GROUP at F * (dA + dB), the others at dA + dB (ff=0.75, text=0.75)
  uFtG        the UNet's layers at F * (dA + dB), the text encoder's at G * (dA + dB)
  proj        dA + dB minus half of each one's projection on the other (a shared part counted once)
  rms         dA + dB rescaled per layer to the norm sqrt(|dA|^2 + |dB|^2) (what two orthogonal ones sum to)
  maxagree    elementwise: where the signs agree the larger of the two, else the sum
  tiesD       TIES (Yadav et al. 2023): keep each update's top-D fraction by magnitude, elect each element's
              sign by the sum, average the kept values that agree with it
  alone       each adapter by itself with its own trigger word only ("both" = its hit rate)
  --rescale R guidance rescale (Lin et al. 2024, diffusers' guidance_rescale) on top of the variant
  --steps N, --sampler S   sampling steps and sampler (SAMPLERS below; the base's is DPM++ 2M) for every variant

--folder / --folder-b take DIR or DIR1+DIR2+...: each adapter is then the mean of the runs' updates
(a "soup" of trainings with different seeds); --folder-b pairs palettes of one run with techniques
of another (the spread between training runs).

Prompts: 48 from the pretraining combinations (seed 500), so nothing is tuned on the held-out prompts
the README's tables use; --heldout for those.

    python bench/stack_merges.py --folder runs/styles/defaults --variants merge,k0.93,proj,ties0.3
    # one JSON line per pair x variant; ~5 s per line on 2 cores
    python bench/stack_merges.py --folder runs/styles/defaults --layers
    # where each style acts: per layer group, each style's |dW| and two pairs' mean per-layer cosine;
    # then per style the mean norms of the LoRA factors and how concentrated each layer's update is
    python bench/stack_merges.py --folder runs/styles/defaults --variants merge --heldout --n 100 \
        --misses docs/stack_misses.png
    # also which shapes are missed (judged as what) and which styles; a row of missed images per pair
"""
import argparse
import json
import re
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image

from stylelora.adapters import Adapter, load_adapter
from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.evaluate import both_rate, heldout_scenes, score, stack_images
from stylelora.grid import image_grid
from stylelora.lycoris import FullDiff
from stylelora.world.render import TRAIN_COMBOS, Scene

PAIRS = "pastel+dots,pastel+stripes,sepia+dots,sepia+stripes"
# name -> (diffusers scheduler class, config overrides); the embedded base samples with DPM++ 2M
SAMPLERS = {"dpm2m": ("DPMSolverMultistepScheduler", {}),
            "dpm2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
            "euler-a": ("EulerAncestralDiscreteScheduler", {}),
            "euler": ("EulerDiscreteScheduler", {}),
            "ddim": ("DDIMScheduler", {})}


def use_sampler(pipe, name: str) -> None:
    import diffusers

    cls, overrides = SAMPLERS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)


def ties(a: torch.Tensor, b: torch.Tensor, density: float) -> torch.Tensor:
    def trim(x):
        k = max(1, int(density * x.numel()))
        threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values
        return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))

    ta, tb = trim(a), trim(b)
    sign = torch.sign(ta + tb)
    keep_a, keep_b = (torch.sign(ta) == sign) & (ta != 0), (torch.sign(tb) == sign) & (tb != 0)
    count = keep_a.float() + keep_b.float()
    return torch.where(count > 0, (ta * keep_a + tb * keep_b) / count.clamp_min(1), torch.zeros_like(ta))


def merged(variant: str, a: torch.Tensor, b: torch.Tensor, key: str) -> torch.Tensor:
    text_encoder = not key.startswith("unet.")
    if "=" in variant:
        group, factor = variant.split("=")
        return (a + b) * (float(factor) if group in group_of(key) else 1.0)
    if variant == "merge":
        return a + b
    if variant.startswith("k"):
        return (a + b) * float(variant[1:])
    if re.fullmatch(r"a[\d.]+b[\d.]+", variant):
        fa, fb = map(float, variant[1:].split("b"))
        return fa * a + fb * b
    if variant.startswith("u"):
        unet, te = map(float, variant[1:].split("t"))
        return (a + b) * (te if text_encoder else unet)
    if variant == "proj":
        dot = (a * b).sum()
        return a + b - (0.5 * dot * (a / (a * a).sum() + b / (b * b).sum()) if dot > 0 else 0)
    if variant == "rms":
        return (a + b) * ((a * a).sum() + (b * b).sum()).sqrt() / (a + b).norm().clamp_min(1e-12)
    if variant == "maxagree":
        return torch.where(torch.sign(a) == torch.sign(b), torch.where(a.abs() > b.abs(), a, b), a + b)
    if variant.startswith("ties"):
        return ties(a, b, float(variant[4:]))
    raise ValueError(f"unknown variant {variant!r}")


def report(images, scenes, styles: list[str], pal: str, tech: str, **fields) -> dict[str, list[str]]:
    """One JSON line: `fields` first, then the judge's both-styles rate over `styles`, each family's
    rate for the pair's palette and technique, shape and colour accuracy. Returns the judge's
    per-image labels."""
    r = score(images, scenes, per_image=True)
    per_image = r.pop("per_image")
    print(json.dumps({**fields, "both": round(both_rate(per_image, styles), 3),
                      pal: round(r["palette"][pal], 2), tech: round(r["technique"][tech], 2),
                      "shape": round(r["shape_acc"], 3), "colour": round(r["color_acc"], 3)}), flush=True)
    return per_image


def prompt_scenes(heldout: bool, n: int, seed: int = 500) -> tuple[list[Scene], list[int]]:
    """The stacking scripts' prompts and seeds: n held-out scenes with seeds 0.., or n distinct
    pretraining combinations drawn with `seed`, with seeds seed, seed + 1, ..."""
    if heldout:
        return heldout_scenes(n), list(range(n))
    rng = np.random.default_rng(seed)
    return [Scene(*TRAIN_COMBOS[i]) for i in rng.choice(len(TRAIN_COMBOS), n, replace=False)], [seed + i for i in range(n)]


def pair_args(doc: str) -> argparse.ArgumentParser:
    """The stacking scripts' shared arguments: --folder, --pairs, --heldout."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--folder", required=True, help="holds PALETTE.safetensors and TECHNIQUE.safetensors")
    ap.add_argument("--pairs", default=PAIRS)
    ap.add_argument("--heldout", action="store_true", help="the 100 held-out prompts instead of 48 pretraining ones")
    return ap


def pair_stacks(pipe, folder: str, pairs: str = PAIRS):
    """Per 'palette+technique' pair of `pairs`: (pair, palette, technique, an AdapterStack on `pipe` with
    both adapters of `folder` loaded at raw scale 1). The stack is reset when the caller moves on."""
    for pair in pairs.split(","):
        pal, tech = pair.split("+")
        stack = AdapterStack(pipe)
        for style in (pal, tech):
            stack.add(style, f"{folder}/{style}.safetensors", {"raw": True})
        yield pair, pal, tech, stack
        stack.reset()


def misses(images, scenes, pred: dict[str, list[str]], pal: str, tech: str, **fields) -> list:
    """One JSON line from the judge's per-image labels `pred`: per true shape the images whose shape
    was missed, the commonest confusions, and what was seen where a style was missed. Returns the
    missed images."""
    shape_ok = [p == s.shape for p, s in zip(pred["shape"], scenes)]
    style_ok = [p == pal and t == tech for p, t in zip(pred["palette"], pred["technique"])]
    per_shape = Counter(s.shape for s in scenes)
    missed = Counter(s.shape for s, ok in zip(scenes, shape_ok) if not ok)
    confusions = Counter(f"{s.shape}->{p}" for s, p, ok in zip(scenes, pred["shape"], shape_ok) if not ok)
    styles_seen = Counter(f"{p}+{t}" for p, t, ok in zip(pred["palette"], pred["technique"], style_ok) if not ok)
    print(json.dumps({**fields, "shape missed": {k: f"{missed[k]}/{n}" for k, n in sorted(per_shape.items())},
                      "confusions": confusions.most_common(4), "style missed, seen instead": styles_seen.most_common(4)}),
          flush=True)
    return [im for im, a, b in zip(images, shape_ok, style_ok) if not (a and b)]


def soup(folders: str, style: str) -> dict[str, torch.Tensor]:
    """Each layer's update (alpha / rank applied), averaged over the runs in 'DIR1+DIR2+...'."""
    runs = [load_adapter(f"{folder}/{style}.safetensors") for folder in folders.split("+")]
    return {k: sum(r.layers[k].delta() for r in runs) / len(runs) for k in runs[0].layers}


def group_of(key: str) -> str:
    """'up0 ff', 'mid cross-attn', 'text encoder', ...: a UNet level and layer kind."""
    if not key.startswith("unet."):
        return "text encoder"
    parts = key.split(".")
    level = "mid" if parts[1] == "mid_block" else parts[1].split("_")[0] + parts[2]
    return f"{level} {'self-attn' if 'attn1' in key else 'cross-attn' if 'attn2' in key else 'ff'}"


def layer_table(folder: str, styles=("pastel", "sepia", "dots", "stripes"),
                pairs=(("pastel", "dots"), ("dots", "stripes"))) -> None:
    adapters = {n: load_adapter(f"{folder}/{n}.safetensors") for n in styles}
    sq, cos = {}, {}
    for key in adapters[styles[0]].layers:
        d = {n: adapters[n].layers[key].delta().flatten() for n in styles}
        g = group_of(key)
        for n in styles:
            sq[(n, g)] = sq.get((n, g), 0.0) + float(d[n] @ d[n])
        for a, b in pairs:
            cos.setdefault((a, b, g), []).append(float(torch.nn.functional.cosine_similarity(d[a], d[b], dim=0)))
    print("| layers | " + " | ".join(f"|dW| {n}" for n in styles) + " | " + " | ".join(f"cos {a}.{b}" for a, b in pairs) + " |")
    for g in sorted({g for _, g in sq}):
        print(f"| {g} | " + " | ".join(f"{sq[(n, g)] ** 0.5:.1f}" for n in styles) + " | "
              + " | ".join(f"{sum(c) / len(c):+.2f}" for c in (cos[(a, b, g)] for a, b in pairs)) + " |")
    print("\n| style | mean per layer: |A| (down) | |B| (up) | |dW| | top singular direction's share of |dW|^2 |")
    for n, adapter in adapters.items():
        stats = [(float(f.down.float().norm()), float(f.up.float().norm()), float(sv.norm()), float(sv[0] ** 2 / (sv ** 2).sum()))
                 for f in adapter.layers.values() for sv in [torch.linalg.svdvals(f.delta().flatten(1).float())]]
        print(f"| {n} | " + " | ".join(f"{sum(s[i] for s in stats) / len(stats):.3g}" for i in range(4)) + " |")


def main() -> None:
    ap = pair_args(__doc__)
    ap.add_argument("--folder-b", default=None, help="the techniques' folder, if not --folder")
    ap.add_argument("--variants", default="merge,k0.93")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--rescale", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpm2m", choices=list(SAMPLERS))
    ap.add_argument("--layers", action="store_true", help="print where each style acts, and stop")
    ap.add_argument("--misses", default=None, help="PNG: also report what was missed, and draw up to 12 missed "
                                                   "images per pair and variant")
    args = ap.parse_args()
    if args.layers:
        return layer_table(args.folder)
    scenes, seeds = prompt_scenes(args.heldout, args.n, args.seed)
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, args.sampler)
    call = type(pipe).__call__
    type(pipe).__call__ = lambda self, *a, **kw: call(self, *a, guidance_rescale=args.rescale, **kw)
    rows, labels = [], []
    for pair in args.pairs.split(","):
        pal, tech = pair.split("+")
        a = soup(args.folder, pal)
        b = soup(args.folder_b or args.folder, tech)
        jobs = [(v, {k: merged(v, a[k], b[k], k) for k in a}, [pal, tech]) for v in args.variants.split(",") if v != "alone"]
        if "alone" in args.variants.split(","):  # each adapter by itself, its own trigger only
            jobs = [(f"{pal} alone", a, [pal]), (f"{tech} alone", b, [tech])] + jobs
        for variant, deltas, styles in jobs:
            stack = AdapterStack(pipe)
            stack.add("merged", Adapter(layers={k: FullDiff(d) for k, d in deltas.items()}),
                      {"unet": 1.0, "text_encoder": 1.0, "raw": True})
            prompts = [", ".join([s.caption(), *styles]) for s in scenes]
            t = time.time()
            images = stack_images(stack, pipe, prompts, seeds, "merge", guidance=args.guidance, steps=args.steps)
            pred = report(images, scenes, styles, pal, tech, pair=pair, variant=variant, guidance=args.guidance,
                          rescale=args.rescale, steps=args.steps, sampler=args.sampler, s=round(time.time() - t, 1))
            if args.misses and len(styles) == 2:
                rows.append(misses(images, scenes, pred, pal, tech, pair=pair, variant=variant)[:12])
                labels.append(f"{pair} {variant}")
            stack.reset()
    if args.misses and rows:
        blank = Image.new("RGB", images[0].size, "white")
        image_grid([r or [blank] for r in rows], row_labels=labels).save(args.misses)


if __name__ == "__main__":
    main()
