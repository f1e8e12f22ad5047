"""Train every example style in datasets/ with default settings and score it with the judge;
then stack one palette and one technique adapter and compare the composition modes, and merge
every palette x technique pair.

    python bench/styles.py [--n 100] [--out runs/styles]

For each style: training time, then on held-out prompts (trigger word + caption) the fraction
of images the judge calls that style at adapter scales 0, 0.25, 0.5, 0.75, 1.0, and shape /
colour kept at 1.0. Writes bench/results/styles.md (the README table), docs/styles_grid.png
(style x strength) and docs/loss.png (the first style's loss curve).
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


def stacked(pipe, folder: Path, palette: str, technique: str, scenes, mode: str) -> str:
    """Table cells for one palette + technique stack at 1.0 / 1.0: both-hit, each hit, shape, colour."""
    stack = AdapterStack(pipe)
    for name in (palette, technique):
        stack.add(name, folder / f"{name}.safetensors")
    images = [stack.generate(f"{s.caption()}, {palette}, {technique}", seed=i, mode=mode) for i, s in enumerate(scenes)]
    stack.reset()
    r = score(images, scenes, per_image=True)
    both = sum(a == palette and b == technique
               for a, b in zip(r["per_image"]["palette"], r["per_image"]["technique"])) / len(scenes)
    return (f"{both:.0%} | {r['palette'][palette]:.0%} | {r['technique'][technique]:.0%} "
            f"| {r['shape_acc']:.0%} | {r['color_acc']:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per scale")
    ap.add_argument("--out", default=str(ROOT / "runs" / "styles"))
    ap.add_argument("--styles", default=None, help="comma-separated subset of datasets/")
    args = ap.parse_args()
    styles = args.styles.split(",") if args.styles else sorted(p.name for p in (ROOT / "datasets").iterdir())
    out = Path(args.out)

    rows, grid_rows = [], []
    pipe = load_base()
    pipe.set_progress_bar_config(disable=True)
    scene = heldout_scenes(1, seed=7)[0]
    for style in styles:
        adapter = out / f"{style}.safetensors"
        t = time.time()
        train(TrainConfig(dataset=str(ROOT / "datasets" / style), out=str(adapter), progress=False))
        seconds = time.time() - t
        family = "palette" if style in PALETTES else "technique"
        stack = AdapterStack(pipe)
        stack.add(style, adapter)
        hits, kept = [], None
        for s in SCALES:
            stack.set_scales({style: s})
            r = evaluate(pipe, n=args.n, triggers=[style])
            hits.append(r[family][style])
            kept = r
        grid_rows += stack.sweep(f"{scene.caption()}, {style}", list(SCALES), seed=7)  # one row: one adapter
        stack.reset()
        rows.append({"style": style, "family": family, "train_s": round(seconds), "hit": hits,
                     "shape_at_1": kept["shape_acc"], "color_at_1": kept["color_acc"]})
        print(json.dumps(rows[-1]), flush=True)

    # Stacking (Zhong et al. 2024's comparison): one palette + one technique adapter at 1.0 / 1.0.
    palette = next(r["style"] for r in rows if r["family"] == "palette")
    technique = next(r["style"] for r in rows if r["family"] == "technique")
    scenes = heldout_scenes(args.n)
    modes = []
    for mode in ("merge", "switch", "composite"):
        t = time.time()
        cells = stacked(pipe, out, palette, technique, scenes, mode)
        modes.append(f"| {mode} | {cells} | {(time.time() - t) / len(scenes):.2f} |")
        print(modes[-1], flush=True)

    # Every palette x technique pair merged at 1.0 / 1.0: the pair above is one of several.
    pairs = []
    for pal in (r["style"] for r in rows if r["family"] == "palette"):
        for tech in (r["style"] for r in rows if r["family"] == "technique"):
            pairs.append(f"| {pal} + {tech} | {stacked(pipe, out, pal, tech, scenes, 'merge')} |")
            print(pairs[-1], flush=True)

    lines = ["| style | train (s) | " + " | ".join(f"hit @ {s:g}" for s in SCALES) + " | shape @ 1 | colour @ 1 |",
             "|---" * (len(SCALES) + 4) + "|"]
    for r in rows:
        lines.append(f"| {r['style']} ({r['family']}) | {r['train_s']} | "
                     + " | ".join(f"{h:.0%}" for h in r["hit"])
                     + f" | {r['shape_at_1']:.0%} | {r['color_at_1']:.0%} |")
    table = "\n".join(lines)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    compose = "\n".join([f"| mode ({palette} + {technique}, 1.0 / 1.0) | both styles | {palette} | {technique} "
                         "| shape | colour | s / image |", "|---" * 7 + "|", *modes])
    pair_table = "\n".join(["| merge, 1.0 / 1.0 | both styles | palette | technique | shape | colour |",
                            "|---" * 6 + "|", *pairs])
    (results / "styles.md").write_text(f"{table}\n\n{compose}\n\n{pair_table}\n\n{args.n} held-out prompts per "
                                       "cell, default TrainConfig, `python bench/styles.py`\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    image_grid(grid_rows, styles, [f"{s:g}" for s in SCALES], scale=2).save(ROOT / "docs" / "styles_grid.png")
    shutil.copy(out / f"{styles[0]}.run" / "loss.png", ROOT / "docs" / "loss.png")
    print(table + "\n\n" + compose + "\n\n" + pair_table)


if __name__ == "__main__":
    main()
