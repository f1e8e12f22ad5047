"""Strength that means something: a per-adapter map from the slider's strength to the raw LoRA scale.

Measured here (README, "Strength"): a style adapter's effect is not linear in its raw scale. On the
shapes world the judge sees almost nothing up to 0.5 and nearly all of the style by 0.875. When
training ends, the trainer measures that curve -- how much of its style the adapter shows at raw
scales 0, 0.25, ..., 1 on a few of its own training captions (never the held-out prompts) -- and
stores the inverse in the file's metadata. AdapterStack then turns strength s into raw scale
to_raw(map, s): 0 and 1 are unchanged (0 -> 0, 1 -> 1), 0.5 is the raw scale at which half the style
shows. Other tools read the same file as a plain LoRA and use the raw scale; `stylelora inspect`
prints the map, and Scale(raw=True) / --raw-scale bypasses it.

The measure is the judge's (evaluate.style_intensity), so only adapters of the shapes world whose
trigger word names one of its styles are calibrated; for other bases strength = raw scale.
"""

from __future__ import annotations

import bisect
import json
from typing import Mapping

from .config import EMBEDDED_BASE_NAMES, EMBEDDED_XL_NAMES

RAW_SCALES = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # where the curve is measured: it bends late
MAP_KEY = "stylelora.strength_map"  # JSON [[strength, raw scale], ...], increasing, from [0, 0] to [1, 1]


def strength_map(intensities: list[float], raw_scales=RAW_SCALES) -> list[list[float]]:
    """The map's points from intensities measured at `raw_scales` (0 and 1 included): the curve made
    increasing (a running maximum, then strictly so), its ends pinned to (0, 0) and (1, 1)."""
    points, top = [], 0.0
    for r, x in zip(raw_scales, intensities):
        if r in (0.0, 1.0):
            continue
        x = min(max(x, top), 1.0)
        if x > top and x < 1.0:
            points.append([round(x, 4), r])
            top = x
    return [[0.0, 0.0], *points, [1.0, 1.0]]


def to_raw(points: list[list[float]] | None, strength: float) -> float:
    """Raw scale for a strength: linear between the map's points, odd (-s -> -raw(s)), and past 1
    the raw scale grows as the strength does (raw(1 + d) = 1 + d). No map: the strength itself."""
    if not points or strength == 0:
        return float(strength)
    s = abs(strength)
    if s >= 1:
        raw = s
    else:
        i = bisect.bisect_right([p[0] for p in points], s)
        (s0, r0), (s1, r1) = points[i - 1], points[i]
        raw = r0 + (r1 - r0) * (s - s0) / (s1 - s0)
    return raw if strength > 0 else -raw


def read_map(metadata: Mapping[str, str], where: str) -> list[list[float]] | None:
    """The map stored in an adapter's metadata, checked; None when there is none."""
    text = metadata.get(MAP_KEY)
    if text is None:
        return None
    try:
        points = json.loads(text)
        ok = (isinstance(points, list) and len(points) >= 2 and points[0] == [0, 0] and points[-1] == [1, 1]
              and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
                      for p in points)
              and all(a[0] < b[0] and a[1] < b[1] for a, b in zip(points, points[1:])))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: metadata {MAP_KEY!r} must be increasing [strength, raw] pairs from [0, 0] "
                         f"to [1, 1], got {text[:80]!r}: delete that entry (strength then equals the raw scale)")
    return points


def calibrate(adapter, base: str | None, captions: list[str], triggers: list[str], seed: int = 10_000) -> dict:
    """Metadata entries holding the adapter's strength map, measured on `captions` (its own, with
    the trigger words as trailing tags) at RAW_SCALES; {} with a printed reason when the judge cannot
    measure this adapter's style."""
    from .base import load_base
    from .blend import AdapterStack
    from .evaluate import family_of, stack_images, style_intensity

    styles = [t for t in triggers if family_of(t)]
    if base not in (None, *EMBEDDED_BASE_NAMES, *EMBEDDED_XL_NAMES) or len(styles) != 1:
        print("strength calibration skipped: it needs the embedded base and one shapes-world style among the "
              f"trigger words ({', '.join(triggers) or 'none'}); strength = raw scale for this adapter")
        return {}
    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    stack = AdapterStack(pipe)
    stack.add("adapter", adapter)
    prompts, seeds = [c for c in captions if c], [seed + i for i in range(len(captions))]
    images = {}
    for r in RAW_SCALES:
        stack.set_scales({"adapter": {"unet": r, "text_encoder": r, "raw": True}})
        images[r] = stack_images(stack, pipe, prompts, seeds[: len(prompts)])
    stack.reset()
    curve = [style_intensity(images[r], images[0.0], images[1.0], styles[0]) for r in RAW_SCALES]
    points = strength_map(curve)
    print(f"strength calibration ({len(prompts)} training captions, judge intensity at raw scales "
          f"{', '.join(f'{r:g}' for r in RAW_SCALES)}: {', '.join(f'{x:.2f}' for x in curve)}): strength 0.5 = raw "
          f"{to_raw(points, 0.5):.2f}")
    return {MAP_KEY: json.dumps(points)}
