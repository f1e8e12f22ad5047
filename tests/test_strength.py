"""Calibrated strength: the map's arithmetic, its checks, and AdapterStack / merge applying it."""

import json

import numpy as np
import pytest
import torch

from stylelora.adapters import Adapter, LoraFactors, describe
from stylelora.blend import AdapterStack, merge_adapters
from stylelora.strength import MAP_KEY, read_map, strength_map, to_raw

POINTS = [[0.0, 0.0], [0.2, 0.5], [0.6, 0.75], [1.0, 1.0]]


def test_strength_map_is_increasing_and_pinned():
    # a dip (0.3 after 0.4) and an overshoot (1.2) are flattened; 0 and 1 stay where they are
    points = strength_map([0.0, 0.1, 0.4, 0.3, 0.7, 1.2, 1.0], (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0))
    assert points == [[0.0, 0.0], [0.1, 0.25], [0.4, 0.5], [0.7, 0.75], [1.0, 1.0]]
    assert strength_map([0.0, 0.0, 0.0, 1.0], (0.0, 0.25, 0.5, 1.0)) == [[0.0, 0.0], [1.0, 1.0]]


def test_to_raw():
    assert to_raw(POINTS, 0.0) == 0.0 and to_raw(POINTS, 1.0) == 1.0
    assert to_raw(POINTS, 0.2) == pytest.approx(0.5) and to_raw(POINTS, 0.4) == pytest.approx(0.625)
    assert to_raw(POINTS, -0.4) == pytest.approx(-0.625)  # odd
    assert to_raw(POINTS, 1.5) == 1.5 and to_raw(POINTS, -2.0) == -2.0  # past 1: as given
    assert to_raw(None, 0.3) == 0.3  # no map: strength = raw scale


@pytest.mark.parametrize("bad", ["[[0, 0], [1, 2]]", "[[0, 0], [0.5, 0.9], [0.4, 0.95], [1, 1]]", "nope",
                                 "[[0, 0]]", '[[0, 0], ["a", 1], [1, 1]]'])
def test_bad_maps_are_one_error_naming_the_entry(bad):
    with pytest.raises(ValueError, match=rf"f.safetensors: metadata '{MAP_KEY}' must be increasing"):
        read_map({MAP_KEY: bad}, "f.safetensors")


def _adapter(pipe, points=None) -> Adapter:
    g = torch.Generator().manual_seed(0)
    key = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    w = dict(pipe.unet.named_modules())[key].weight
    layer = LoraFactors(torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g) * 0.5, 2.0)
    return Adapter({f"unet.{key}": layer}, {MAP_KEY: json.dumps(points)} if points else {})


def test_stack_turns_strengths_into_raw_scales(tiny_random_pipe):
    pipe, gen = tiny_random_pipe, dict(steps=2, seed=1, output_type="np")
    calibrated = _adapter(pipe, POINTS)
    assert describe(calibrated)["strength_map"] == POINTS
    stack = AdapterStack(pipe)
    stack.add("plain", _adapter(pipe))
    stack.add("cal", calibrated)
    off = {"plain": 0.0, "cal": 0.0}
    # strength 0.2 of the calibrated adapter = raw 0.5 = the plain adapter (same weights) at 0.5
    at_strength = stack.generate("a red star", scales={**off, "cal": 0.2}, **gen)
    assert np.array_equal(at_strength, stack.generate("a red star", scales={**off, "plain": 0.5}, **gen))
    raw = stack.generate("a red star", scales={**off, "cal": {"unet": 0.2, "text_encoder": 0.2, "raw": True}}, **gen)
    assert np.array_equal(raw, stack.generate("a red star", scales={**off, "plain": 0.2}, **gen))
    assert not np.array_equal(raw, at_strength)
    for s in (0.0, 1.0):  # the ends are the same in both
        assert np.array_equal(stack.generate("a red star", scales={**off, "cal": s}, **gen),
                              stack.generate("a red star", scales={**off, "plain": s}, **gen))
    stack.reset()
    merged, _ = merge_adapters([(calibrated, 0.2)])  # the merged file (no map) holds raw 0.5
    expected = calibrated.layers[next(iter(calibrated.layers))].delta() * 0.5
    assert torch.allclose(next(iter(merged.layers.values())).delta(), expected, atol=1e-5)


def test_eval_intensity_is_0_at_strength_0_and_1_at_strength_1(tiny_random_pipe):
    from stylelora.evaluate import evaluate

    stack = AdapterStack(tiny_random_pipe)
    stack.add("cal", _adapter(tiny_random_pipe, POINTS))
    for s in (0.0, 1.0):  # the images are then the ends themselves, exactly
        stack.set_scales({"cal": s})
        r = evaluate(tiny_random_pipe, n=2, triggers=["pastel"], stack=stack, intensity=True, steps=2)
        assert r["mode"] == "merge" and r["intensity"] == {"pastel": s}, r
    stack.set_scales({"cal": 0.5})
    assert stack.scales["cal"].unet == 0.5  # restored after the extra generations
    stack.reset()
