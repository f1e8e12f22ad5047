"""Parsers for what users type: number lists (CLI --sweep, the UI's strengths and weights) and
adapter specs (PATH[:SCALE[:TE_SCALE]]). Torch-free, like config.py."""

from __future__ import annotations

import math
import re
from pathlib import Path


def parse_number_list(text: str) -> list[float]:
    """Numbers separated by commas and/or white space ("0, 0.5 1" -> [0.0, 0.5, 1.0]); blank text
    gives []. ValueError for anything that is not a number: callers add what the list is for."""
    return [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]


def parse_adapter_spec(spec: str) -> tuple[str, float, float | None]:
    """'PATH', 'PATH:SCALE' or 'PATH:SCALE:TE_SCALE' -> (path, scale, te_scale or None)."""
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if any(not math.isfinite(x) for x in numbers):
        raise ValueError(f"adapter scale in {spec!r} is not a finite number: use e.g. "
                         f"{path or 'PATH'}:0.8")
    if not path or (spec.count(":") > len(numbers) and not Path(path).exists()):
        raise ValueError(f"malformed adapter {spec!r}: use PATH, PATH:SCALE or PATH:SCALE:TE_SCALE "
                         "(e.g. pastel.safetensors:0.8)")
    return path, (numbers[0] if numbers else 1.0), (numbers[1] if len(numbers) > 1 else None)
