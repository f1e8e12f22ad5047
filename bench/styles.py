"""Train every example style in datasets/ and score it with the judge; then stack one palette and
one technique adapter and compare the composition modes, and merge every palette x technique pair.
All of it twice: with the default TrainConfig (LoRA on the UNet's cross-attention) and with the
`targets="attn-ff"` preset (self- and cross-attention and the feed-forward layers), the one to
use for styles meant to be stacked.

    python bench/styles.py [--n 100] [--out runs/styles]

For each style: training time, then on held-out prompts (trigger word + caption) the fraction
of images the judge calls that style at adapter scales 0, 0.25, 0.5, 0.75, 1.0, and shape /
colour kept at 1.0. Writes bench/results/styles.md (the README tables), docs/styles_grid.png
(style x strength, defaults), docs/stack_grid.png (one stack's composition modes) and
docs/loss.png (the first style's loss curve).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from stylelora.base import load_base
from stylelora.blend import AdapterStack
from stylelora.evaluate import evaluate, heldout_scenes, score
from stylelora.grid import image_grid
from stylelora.train import TrainConfig, train
from stylelora.world.render import PALETTES

ROOT = Path(__file__).resolve().parent.parent
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
MODES = ("merge", "switch", "composite")
# label -> TrainConfig overrides; the first is the defaults (the per-style goals are scored on it)
VARIANTS = {"defaults": {}, "targets=attn-ff": {"targets": "attn-ff"}}


def stack_images(pipe, folder: Path, palette: str, technique: str, scenes, mode: str, scales=(1.0, 1.0)) -> list:
    stack = AdapterStack(pipe)
    for name, scale in zip((palette, technique), scales):
        stack.add(name, folder / f"{name}.safetensors", scale=scale)
    images = [stack.generate(f"{s.caption()}, {palette}, {technique}", seed=i, mode=mode) for i, s in enumerate(scenes)]
    stack.reset()
    return images


def stacked(pipe, folder: Path, palette: str, technique: str, scenes, mode: str) -> str:
    """Table cells for one palette + technique stack at 1.0 / 1.0: both-hit, each hit, shape, colour."""
    r = score(stack_images(pipe, folder, palette, technique, scenes, mode), scenes, per_image=True)
    both = sum(a == palette and b == technique
               for a, b in zip(r["per_image"]["palette"], r["per_image"]["technique"])) / len(scenes)
    return (f"{both:.0%} | {r['palette'][palette]:.0%} | {r['technique'][technique]:.0%} "
            f"| {r['shape_acc']:.0%} | {r['color_acc']:.0%}")


def singles(pipe, styles: list[str], folder: Path, overrides: dict, n: int, label: str) -> tuple[list[dict], list]:
    """Train each style, score it at every scale; also one strength row per style for the grid."""
    rows, grid_rows = [], []
    scene = heldout_scenes(1, seed=7)[0]
    for style in styles:
        adapter = folder / f"{style}.safetensors"
        t = time.time()
        train(TrainConfig(dataset=str(ROOT / "datasets" / style), out=str(adapter), progress=False, **overrides))
        seconds = time.time() - t
        family = "palette" if style in PALETTES else "technique"
        stack = AdapterStack(pipe)
        stack.add(style, adapter)
        hits, kept = [], None
        for s in SCALES:
            stack.set_scales({style: s})
            r = evaluate(pipe, n=n, triggers=[style])
            hits.append(r[family][style])
            kept = r
        grid_rows += stack.sweep(f"{scene.caption()}, {style}", list(SCALES), seed=7)  # one row: one adapter
        stack.reset()
        rows.append({"variant": label, "style": style, "family": family, "train_s": round(seconds), "hit": hits,
                     "shape_at_1": kept["shape_acc"], "color_at_1": kept["color_acc"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows, grid_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per scale")
    ap.add_argument("--out", default=str(ROOT / "runs" / "styles"))
    ap.add_argument("--styles", default=None, help="comma-separated subset of datasets/")
    args = ap.parse_args()
    styles = args.styles.split(",") if args.styles else sorted(p.name for p in (ROOT / "datasets").iterdir())
    palettes = [s for s in styles if s in PALETTES]
    techniques = [s for s in styles if s not in PALETTES]
    out = Path(args.out)
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    scenes = heldout_scenes(args.n)

    rows, modes, pairs, grids = [], [], [], {}
    for label, overrides in VARIANTS.items():
        folder = out / label.replace("=", "-")
        new_rows, grids[label] = singles(pipe, styles, folder, overrides, args.n, label)
        rows += new_rows
        # Zhong et al. 2024's comparison: one palette + one technique adapter at 1.0 / 1.0.
        for mode in MODES:
            t = time.time()
            cells = stacked(pipe, folder, palettes[0], techniques[0], scenes, mode)
            modes.append(f"| {label} | {mode} | {cells} | {(time.time() - t) / len(scenes):.2f} |")
            print(modes[-1], flush=True)
        # Every palette x technique pair merged at 1.0 / 1.0: the pair above is one of several.
        for pal in palettes:
            for tech in techniques:
                pairs.append(f"| {label} | {pal} + {tech} | {stacked(pipe, folder, pal, tech, scenes, 'merge')} |")
                print(pairs[-1], flush=True)

    lines = ["| style | adapters | train (s) | " + " | ".join(f"hit @ {s:g}" for s in SCALES)
             + " | shape @ 1 | colour @ 1 |", "|---" * (len(SCALES) + 5) + "|"]
    for r in rows:
        lines.append(f"| {r['style']} ({r['family']}) | {r['variant']} | {r['train_s']} | "
                     + " | ".join(f"{h:.0%}" for h in r["hit"])
                     + f" | {r['shape_at_1']:.0%} | {r['color_at_1']:.0%} |")
    table = "\n".join(lines)
    compose = "\n".join([f"| adapters | mode ({palettes[0]} + {techniques[0]}, 1.0 / 1.0) | both styles | "
                         f"{palettes[0]} | {techniques[0]} | shape | colour | s / image |", "|---" * 8 + "|", *modes])
    pair_table = "\n".join(["| adapters | merge, 1.0 / 1.0 | both styles | palette | technique | shape | colour |",
                            "|---" * 7 + "|", *pairs])
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "styles.md").write_text(f"{table}\n\n{compose}\n\n{pair_table}\n\n{args.n} held-out prompts per "
                                       "cell; adapters: the default TrainConfig, or with the one override named; "
                                       "`python bench/styles.py`\n")

    (ROOT / "docs").mkdir(exist_ok=True)
    default = next(iter(VARIANTS))
    image_grid(grids[default], styles, [f"{s:g}" for s in SCALES], scale=2).save(ROOT / "docs" / "styles_grid.png")
    shutil.copy(out / default / f"{styles[0]}.run" / "loss.png", ROOT / "docs" / "loss.png")
    # One stack, six held-out prompts: each adapter alone, then both in every mode.
    label, pal, tech, few = list(VARIANTS)[-1], palettes[0], techniques[0], scenes[:6]
    folder = out / label.replace("=", "-")
    stack_rows = [stack_images(pipe, folder, pal, tech, few, "merge", (0.0, 0.0)),
                  stack_images(pipe, folder, pal, tech, few, "merge", (1.0, 0.0)),
                  stack_images(pipe, folder, pal, tech, few, "merge", (0.0, 1.0)),
                  *(stack_images(pipe, folder, pal, tech, few, mode) for mode in MODES)]
    image_grid(stack_rows, ["base", f"{pal} 1", f"{tech} 1", *(f"{m} 1/1" for m in MODES)],
               [s.caption().removeprefix("a ").split(" on ")[0] for s in few], scale=2).save(ROOT / "docs" / "stack_grid.png")
    print(table + "\n\n" + compose + "\n\n" + pair_table)


if __name__ == "__main__":
    main()
