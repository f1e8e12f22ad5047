"""The shapes world: renderer, captions, tokenizer, judge, and the `stylelora world` commands."""

import json

import numpy as np
import pytest

from stylelora.cli import main
from stylelora.world import render as W
from stylelora.world.tokenizer import build_tokenizer, world_words


def test_render_is_deterministic_and_seed_sensitive():
    a = [np.asarray(im) for _, im in W.render_batch(6, 3, "neon", "stripes")]
    b = [np.asarray(im) for _, im in W.render_batch(6, 3, "neon", "stripes")]
    c = [np.asarray(im) for _, im in W.render_batch(6, 4, "neon", "stripes")]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_flat_render_shows_what_the_caption_says():
    scene = W.Scene("square", "blue", "mint", size=0.7, cx=0.5, cy=0.5)
    img = np.asarray(W.render(scene))
    assert img.shape == (64, 64, 3)
    assert tuple(img[32, 32]) == W.COLORS["blue"]  # centre of the square
    assert tuple(img[1, 1]) == W.BACKGROUNDS["mint"]  # corner
    assert scene.caption() == "a blue square on a mint background"


@pytest.mark.parametrize("palette", W.PALETTES)
@pytest.mark.parametrize("technique", W.TECHNIQUES)
def test_every_style_pair_renders_and_differs_from_flat(palette, technique):
    scene = W.Scene("star", "red", "white", size=0.75)
    img = np.asarray(W.render(scene, palette, technique)).astype(int)
    flat = np.asarray(W.render(scene)).astype(int)
    assert img.shape == (64, 64, 3)
    changed = np.abs(img - flat).sum(-1) > 30
    if (palette, technique) == ("flat", "flat"):
        assert not changed.any()
    else:
        assert changed.mean() > 0.02, "a style must visibly change the image"


def test_styles_compose_orthogonally():
    assert W.parse_style("neon+stripes") == ("neon", "stripes")
    assert W.parse_style("pixel") == ("flat", "pixel")
    assert W.parse_style("flat") == ("flat", "flat")
    with pytest.raises(ValueError, match="unknown style 'glitter'"):
        W.parse_style("glitter")
    scene = W.Scene("circle", "green", "gray")
    assert W.styled_caption(scene, "pastel", "dots") == "a green circle on a gray background, pastel, dots"


def test_heldout_combos_are_disjoint_and_cover_every_value():
    train, held = set(W.TRAIN_COMBOS), set(W.HELDOUT_COMBOS)
    assert not train & held and len(train | held) == len(W.SHAPES) * len(W.COLORS) * len(W.BACKGROUNDS)
    for i, values in enumerate((W.SHAPES, W.COLORS, W.BACKGROUNDS)):
        assert {c[i] for c in train} == set(values)


def test_tokenizer_known_words_are_single_tokens_and_unknown_fall_back():
    tok = build_tokenizer()
    for word in world_words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} splits into {tok.convert_ids_to_tokens(ids)}"
    prompt = "neon, a purple cross on a beige background"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "neon , a purple cross on a beige background"
    odd = tok("zebra", add_special_tokens=False).input_ids
    assert tok.decode(odd) == "zebra" and len(odd) > 1


def test_tokenizer_saves_and_loads(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    prompt = "stripes, a yellow triangle on a white background"
    assert again(prompt).input_ids == tok(prompt).input_ids


def test_judge_is_accurate_on_fresh_renders():
    from stylelora.world.judge import check

    acc = check(n_per_style=12, seed=987_654)
    assert min(acc.values()) >= 0.97, acc


def test_cli_render_writes_pairs(tmp_path, capsys):
    assert main(["world", "render", "--style", "pastel+outline", "--n", "3", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0001.png", "0001.txt", "0002.png", "0002.txt", "0003.png", "0003.txt"]
    caption = (tmp_path / "0001.txt").read_text().strip()
    # Trigger tags go last (see render.styled_caption for why).
    assert caption.startswith("a ") and caption.endswith(" background, pastel, outline"), caption


def test_cli_styles_json(capsys):
    assert main(["world", "styles", "--json"]) == 0
    styles = json.loads(capsys.readouterr().out)
    assert styles == {"palette": ["pastel", "neon", "sepia"], "technique": ["outline", "stripes", "pixel", "dots"]}


def test_cli_bad_style_is_one_clear_error(tmp_path, capsys):
    assert main(["world", "render", "--style", "glitter", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown style 'glitter'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_cli_judge_check_json(capsys):
    assert main(["world", "judge-check", "--n", "4", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert set(acc) == {"shape", "color", "palette", "technique"}
    assert all(0.9 <= v <= 1 for v in acc.values())
