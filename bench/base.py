"""Base-model benchmark: how fast the embedded base loads and draws, against its goals and beside
a plain diffusers call on the same weights.

  load:       load_base() in a fresh interpreter, cold (imports included) and after the imports
              (goal: the load <= 1 s);
  generation: one 64x64 image, 20 steps, guidance 5, through stylelora's generate_images and
              through a plain StableDiffusionPipeline.from_pretrained(...)(prompt) call on the
              same folder (goal: <= 0.5 s per image); and images/s at eval's batch of 32.

    python bench/base.py          # ~1 min on 2 cores; writes bench/results/base.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red star on a white background"
GOAL_LOAD_S, GOAL_IMAGE_S = 1.0, 0.5

# Run in a fresh interpreter: the cold number must include importing torch and diffusers.
LOAD_PROBE = """
import time, json
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel
from stylelora.base import load_base
t1 = time.perf_counter()
load_base()
t2 = time.perf_counter()
load_base()
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "first_load": t2 - t1, "second_load": t3 - t2}))
"""


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed single-image generations per contender")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "base.md"))
    args = ap.parse_args()

    loads = [json.loads(subprocess.run([sys.executable, "-c", LOAD_PROBE], capture_output=True, text=True,
                                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                                       ).stdout.strip().splitlines()[-1]) for _ in range(3)]
    load = {k: statistics.median(d[k] for d in loads) for k in loads[0]}

    import torch
    from diffusers import StableDiffusionPipeline

    from stylelora.base import EMBEDDED_DIR, load_base
    from stylelora.config import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from stylelora.generate import generate_images

    ours = load_base()
    plain = StableDiffusionPipeline.from_pretrained(EMBEDDED_DIR, safety_checker=None, requires_safety_checker=False,
                                                    use_safetensors=True, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    steps, guidance = DEFAULT_STEPS, DEFAULT_GUIDANCE
    t_ours = median_seconds(lambda: generate_images(ours, [PROMPT], [0], steps=steps, guidance=guidance),
                            args.repeats)
    t_plain = median_seconds(lambda: plain(PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                                           generator=torch.Generator("cpu").manual_seed(0)), args.repeats)
    prompts = [PROMPT] * 32
    t_batch = median_seconds(lambda: generate_images(ours, prompts, list(range(32)), steps=steps, guidance=guidance),
                             3, warmup=1)
    size_mb = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*.safetensors")) / 2**20

    ok = lambda good: "✓" if good else "✗"  # noqa: E731
    rows = [
        ("load_base(), after the imports (fresh process)", f"{load['first_load']:.3f} s",
         f"≤ {GOAL_LOAD_S:g} s {ok(load['first_load'] <= GOAL_LOAD_S)}"),
        ("load_base(), a second time in that process", f"{load['second_load']:.3f} s", "—"),
        ("importing torch, StableDiffusionPipeline, CLIPTextModel, stylelora", f"{load['imports']:.2f} s", "—"),
        (f"one image, {steps} steps, guidance {guidance:g}: stylelora generate_images", f"{t_ours:.3f} s",
         f"≤ {GOAL_IMAGE_S:g} s {ok(t_ours <= GOAL_IMAGE_S)}"),
        (f"one image, {steps} steps, guidance {guidance:g}: plain diffusers pipeline call (peer)",
         f"{t_plain:.3f} s", f"stylelora / diffusers = {t_ours / t_plain:.2f}×"),
        (f"batch of 32 (eval's batch), {steps} steps", f"{t_batch:.2f} s = {32 / t_batch:.1f} images/s", "—"),
    ]
    lines = ["# Base-model benchmark: the embedded base", "",
             f"`python bench/base.py` — CPU, {torch.get_num_threads()} torch threads, 64×64, weights {size_mb:.1f} MB; "
             f"load: median of 3 fresh processes; generation: median of {args.repeats} after 2 warm-up calls.", "",
             "| what | time | goal / ratio |", "|---|---:|---|",
             *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)


if __name__ == "__main__":
    main()
