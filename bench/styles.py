"""Train every example style in datasets/ and score it with the judge; then stack every palette x
technique pair in every composition mode. Twice: with the default TrainConfig and with the old
default targets (cross-attention only), for comparison.

    python bench/styles.py [--n 100] [--out runs/styles]
    python bench/styles.py --base embedded-xl     # the SDXL-architecture twin: defaults only, fused modes
    python bench/styles.py --variants defaults    # the defaults only (~45 min on 2 cores)


For each style: training time, then on held-out prompts (caption + trigger word) the fraction of
images the judge calls that style at adapter scales 0, 0.25, 0.5, 0.75, 1.0, the style intensity at
each scale (evaluate.style_intensity: 0 = like scale 0, 1 = like scale 1, in the judge's eyes) and
shape / colour kept at 1.0. For each pair and mode at 1.0 / 1.0: both styles seen, each style, shape,
colour, and the time of one image relative to the base (no adapter), one image per call.
Writes bench/results/styles.md (the README tables), docs/styles_grid.png (style x strength,
defaults), docs/stack_grid.png (one stack in every mode) and docs/loss.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.config import MODES
from stylelora.evaluate import both_rate, family_of, heldout_scenes, score, stack_images, style_intensity
from stylelora.grid import image_grid
from stylelora.train import TrainConfig, train
from stylelora.world.render import PALETTES

ROOT = Path(__file__).resolve().parent.parent
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
# label -> TrainConfig overrides; the first is the defaults (the per-style goals are scored on it)
VARIANTS = {"defaults": {}, "targets=cross-attn": {"targets": "cross-attn"}}
VARIANT_MODES = {"defaults": MODES, "targets=cross-attn": ("balanced", "merge")}


def singles(pipe, styles: list[str], folder: Path, overrides: dict, n: int, label: str) -> tuple[list[dict], list]:
    """Train each style, score it at every scale; also one strength row per style for the grid."""
    rows, grid_rows = [], []
    scenes, scene = heldout_scenes(n), heldout_scenes(1, seed=7)[0]
    for style in styles:
        adapter = folder / f"{style}.safetensors"
        t = time.time()
        train(TrainConfig(dataset=str(ROOT / "datasets" / style), out=str(adapter), progress=False, **overrides))
        seconds = time.time() - t
        stack = AdapterStack(pipe)
        stack.add(style, adapter)
        prompts, seeds = [f"{s.caption()}, {style}" for s in scenes], list(range(n))
        images, results = {}, {}
        for s in SCALES:
            stack.set_scales({style: s})
            images[s] = stack_images(stack, pipe, prompts, seeds)
            results[s] = score(images[s], scenes)
        grid_rows += stack.sweep(f"{scene.caption()}, {style}", list(SCALES), seed=7)  # one row: one adapter
        stack.reset()
        family = family_of(style)
        rows.append({"variant": label, "style": style, "family": family, "train_s": round(seconds),
                     "hit": [results[s][family][style] for s in SCALES],
                     "intensity": [style_intensity(images[s], images[0.0], images[1.0], style) for s in SCALES],
                     "shape_at_1": results[1.0]["shape_acc"], "color_at_1": results[1.0]["color_acc"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows, grid_rows


def seconds_per_image(stack, prompt: str, mode: str, repeats: int = 8) -> float:
    stack.generate(prompt, mode=mode)  # warm-up
    t = time.perf_counter()
    for i in range(repeats):
        stack.generate(prompt, seed=i, mode=mode)
    return (time.perf_counter() - t) / repeats


def stacked(pipe, folder: Path, pal: str, tech: str, scenes, mode: str, scales=(1.0, 1.0)) -> dict:
    """One palette + technique stack: the judge's rates on held-out prompts, and its cost."""
    stack = AdapterStack(pipe)
    for name, scale in zip((pal, tech), scales):
        stack.add(name, folder / f"{name}.safetensors", scale=scale)
    prompts = [f"{s.caption()}, {pal}, {tech}" for s in scenes]
    r = score(stack_images(stack, pipe, prompts, list(range(len(scenes))), mode), scenes, per_image=True)
    cost = seconds_per_image(stack, prompts[0], mode)
    stack.reset()
    return {"both": both_rate(r["per_image"], [pal, tech]), "palette": r["palette"][pal],
            "technique": r["technique"][tech], "shape": r["shape_acc"], "colour": r["color_acc"], "s": cost}


def stack_tables(pipe, out: Path, palettes, techniques, scenes) -> tuple[list[str], list[str]]:
    """Every pair in every mode at 1.0 / 1.0 (cost relative to the base), and the default mode at
    0.5 / 0.5 (neither style may be stronger there than at 1.0 / 1.0)."""
    base_stack = AdapterStack(pipe)
    base_s = seconds_per_image(base_stack, "a red star on a white background", MODES[0])
    rows, halves = [], []
    for label, modes in VARIANT_MODES.items():
        folder = out / label.replace("=", "-")
        for pal in palettes:
            for tech in techniques:
                for mode in modes:
                    c = stacked(pipe, folder, pal, tech, scenes, mode)
                    rows.append(f"| {label} | {pal} + {tech} | {mode} | {c['both']:.0%} | {c['palette']:.0%} | "
                                f"{c['technique']:.0%} | {c['shape']:.0%} | {c['colour']:.0%} | {c['s'] / base_s:.2f}x |")
                    print(rows[-1], flush=True)
                if label == "defaults":
                    h = stacked(pipe, folder, pal, tech, scenes, MODES[0], (0.5, 0.5))
                    halves.append(f"| {pal} + {tech} | {h['both']:.0%} | {h['palette']:.0%} | {h['technique']:.0%} "
                                  f"| {h['shape']:.0%} | {h['colour']:.0%} |")
                    print(halves[-1], flush=True)
    return rows, halves


def stack_grid(pipe, folder: Path, pal: str, tech: str, scenes) -> None:
    """Six held-out prompts: base, each adapter alone, then both at 1.0 / 1.0 in every mode."""
    def row(mode, scales):
        stack = AdapterStack(pipe)
        for name, scale in zip((pal, tech), scales):
            stack.add(name, folder / f"{name}.safetensors", scale=scale)
        images = [stack.generate(f"{s.caption()}, {pal}, {tech}", seed=i, mode=mode) for i, s in enumerate(scenes)]
        stack.reset()
        return images

    rows = [row("merge", (0, 0)), row("merge", (1, 0)), row("merge", (0, 1)), *(row(m, (1, 1)) for m in MODES)]
    image_grid(rows, ["base", f"{pal} 1", f"{tech} 1", *(f"{m} 1/1" for m in MODES)],
               [s.caption().removeprefix("a ").split(" on ")[0] for s in scenes], scale=2).save(ROOT / "docs" / "stack_grid.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per cell")
    ap.add_argument("--out", default=str(ROOT / "runs" / "styles"))
    ap.add_argument("--styles", default=None, help="comma-separated subset of datasets/")
    ap.add_argument("--smoke", action="store_true", help="20 training steps: checks the script runs, not quality")
    ap.add_argument("--base", default=None, help="another base (embedded-xl): defaults only, results/styles-BASE.md")
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {list(VARIANTS)}")
    args = ap.parse_args()
    for label in set(VARIANTS) - set(args.variants.split(",") if args.variants else VARIANTS):
        del VARIANTS[label], VARIANT_MODES[label]
    if args.base:  # one variant, the fused modes; its own results file and pictures
        VARIANTS.clear(), VARIANT_MODES.clear()
        VARIANTS["defaults"], VARIANT_MODES["defaults"] = {"base": args.base}, ("merge", "balanced")
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-" + args.base))
    if args.smoke:
        for overrides in VARIANTS.values():
            overrides["steps"] = 20
    styles = args.styles.split(",") if args.styles else sorted(p.name for p in (ROOT / "datasets").iterdir())
    palettes = [s for s in styles if s in PALETTES]
    techniques = [s for s in styles if s not in PALETTES]
    out = Path(args.out)
    pipe = load_base(args.base)
    pipe.set_progress_bar_config(disable=True)
    scenes = heldout_scenes(args.n)

    rows, grids = [], {}
    for label, overrides in VARIANTS.items():
        new_rows, grids[label] = singles(pipe, styles, out / label.replace("=", "-"), overrides, args.n, label)
        rows += new_rows
    stacks, halves = stack_tables(pipe, out, palettes, techniques, scenes)

    lines = ["| style | adapters | train (s) | " + " | ".join(f"hit @ {s:g}" for s in SCALES)
             + " | intensity @ 0.25 / 0.5 / 0.75 | shape @ 1 | colour @ 1 |", "|---" * (len(SCALES) + 6) + "|"]
    for r in rows:
        lines.append(f"| {r['style']} ({r['family']}) | {r['variant']} | {r['train_s']} | "
                     + " | ".join(f"{h:.0%}" for h in r["hit"])
                     + " | " + " / ".join(f"{x:.2f}" for x in r["intensity"][1:4])
                     + f" | {r['shape_at_1']:.0%} | {r['color_at_1']:.0%} |")
    stack_table = "\n".join(["| adapters | pair | mode (1.0 / 1.0) | both styles | palette | technique | shape | "
                             "colour | time / base image |", "|---" * 9 + "|", *stacks])
    half_table = "\n".join([f"| pair, {MODES[0]} at 0.5 / 0.5 (defaults) | both styles | palette | technique | shape "
                            "| colour |", "|---" * 6 + "|", *halves])
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.base}" if args.base else ""
    command = "python bench/styles.py" + (f" --base {args.base}" if args.base else "")
    (results / f"styles{suffix}.md").write_text(
        f"{chr(10).join(lines)}\n\n{stack_table}\n\n{half_table}\n\n{args.n} held-out prompts per cell; adapters: "
        f"the default TrainConfig, or with the one override named; `{command}`\n")

    (ROOT / "docs").mkdir(exist_ok=True)
    default = next(iter(VARIANTS))
    image_grid(grids[default], styles, [f"{s:g}" for s in SCALES], scale=2).save(
        ROOT / "docs" / f"styles_grid{suffix}.png")
    if not args.base:
        shutil.copy(out / default / f"{styles[0]}.run" / "loss.png", ROOT / "docs" / "loss.png")
        stack_grid(pipe, out / default, palettes[0], techniques[0], scenes[:6])
    print("\n\n".join(["\n".join(lines), stack_table, half_table]))


if __name__ == "__main__":
    main()
