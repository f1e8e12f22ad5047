"""Data: discovery and its checks, mode conversion, captions, buckets, transforms, the sampler.
Every fixture image is drawn here with PIL, a few pixels wide, so the file runs in seconds."""

import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stylelora.data import (
    BucketBatchSampler,
    CaptionFolder,
    CaptionProcessor,
    assign_bucket,
    discover,
    fit_to_bucket,
    format_report,
    load_image,
    make_buckets,
    to_rgb,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(path: Path, size=(16, 16), color=RED, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def png_claiming(path: Path, w: int, h: int) -> Path:
    """A valid tiny PNG whose IHDR (CRC fixed up) claims w x h: a bomb header without the bytes."""
    solid(path, (8, 8))
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def pixels(path) -> list:
    return list(load_image(path).getdata())


# ----------------------------------------------------------------------------- image modes

def test_rgba_la_transparency_composites_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    im.save(tmp_path / "rgba.png")
    assert pixels(tmp_path / "rgba.png") == [WHITE, BLUE, (127, 127, 127)]
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    la.save(tmp_path / "la.png")
    assert pixels(tmp_path / "la.png") == [WHITE, (40, 40, 40)]


def test_palette_with_transparency_and_gray_and_bilevel(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1])
    p.save(tmp_path / "p.png", transparency=0)
    assert pixels(tmp_path / "p.png") == [WHITE, GREEN]
    p.save(tmp_path / "opaque.png")
    assert pixels(tmp_path / "opaque.png") == [(0, 0, 0), GREEN]
    Image.new("L", (1, 1), 100).save(tmp_path / "l.png")
    assert pixels(tmp_path / "l.png") == [(100, 100, 100)]
    one = Image.new("1", (2, 1))
    one.putdata([0, 255])
    one.save(tmp_path / "1.png")
    assert pixels(tmp_path / "1.png") == [(0, 0, 0), WHITE]


def test_cmyk_cyan_becomes_rgb_cyan(tmp_path):
    Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(tmp_path / "c.tif")
    assert set(pixels(tmp_path / "c.tif")) == {(0, 255, 255)}
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg")).reshape(-1, 3).mean(0)
    assert r < 8 and g > 247 and b > 247


def test_high_depth_modes_scale_by_their_range(tmp_path):
    a16 = np.array([[0, 256, 65535, 32768]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").mode == "RGB"
    assert [p[0] for p in pixels(tmp_path / "g16.png")] == [0, 1, 255, 128]
    big_endian = Image.frombytes("I;16B", (4, 1), a16.astype(">u2").tobytes())
    assert [p[0] for p in to_rgb(big_endian).getdata()] == [0, 1, 255, 128]
    # "I" does not state a depth: 16-bit data is shifted by 8, 8-bit data kept, negatives clipped.
    assert [p[0] for p in to_rgb(Image.fromarray(a16.astype(np.int32))).getdata()] == [0, 1, 255, 128]
    assert [p[0] for p in to_rgb(Image.fromarray(np.array([[-5, 7, 200]], np.int32))).getdata()] == [0, 7, 200]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    assert [p for p in to_rgb(f).getdata()] == [(0, 0, 0), (128, 128, 128), WHITE, (0, 0, 0)]


def test_exif_orientation_6_turns_a_wide_image_tall(tmp_path):
    im = Image.new("RGB", (20, 10), RED)
    im.paste(BLUE, (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = 90 degrees clockwise
    im.save(tmp_path / "rot.png", exif=exif)
    up = load_image(tmp_path / "rot.png")
    assert up.size == (10, 20)
    assert up.getpixel((5, 2)) == RED and up.getpixel((5, 17)) == BLUE
    items, _ = discover(tmp_path)
    assert items[0].size == (10, 20)  # buckets are chosen on the upright size


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, GREEN)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert set(pixels(tmp_path / "anim.gif")) == {RED}


# ----------------------------------------------------------------------------- discovery

def test_repeats_captions_and_order(tmp_path):
    solid(tmp_path / "a.png", caption="  plain caption \n")
    solid(tmp_path / "3_style" / "b.png", caption="styled")
    solid(tmp_path / "3_style" / "deep" / "C.PNG", caption="deeper")  # inherits 3; extension any case
    solid(tmp_path / "0_zero" / "d.jpg", caption="zero is not a positive count")
    solid(tmp_path / "notes" / "e.webp", caption="other folders repeat once")
    solid(tmp_path / ".cache" / "hidden.png", caption="ignored")
    (tmp_path / "bom.txt").write_bytes("\ufeffwith bom".encode("utf-8"))
    solid(tmp_path / "bom.png")
    items, skipped = discover(tmp_path)
    assert skipped == []
    assert [(it.rel, it.repeats, it.caption) for it in items] == [
        ("0_zero/d.jpg", 1, "zero is not a positive count"),
        ("3_style/b.png", 3, "styled"),
        ("3_style/deep/C.PNG", 3, "deeper"),
        ("a.png", 1, "plain caption"),
        ("bom.png", 1, "with bom"),
        ("notes/e.webp", 1, "other folders repeat once"),
    ]
    data = CaptionFolder(tmp_path)
    assert len(data) == 10 and data.n_images == 6
    assert data.summary() == {"n_images": 6, "n_samples": 10, "n_skipped": 0, "folders": 5}
    assert format_report(items, skipped) == "6 images (5 folders, 10 samples with repeats), 0 skipped"


def test_metadata_jsonl_takes_precedence(tmp_path):
    solid(tmp_path / "a.png", caption="from the txt")
    solid(tmp_path / "sub" / "b.png")
    solid(tmp_path / "c.png", caption="txt for c")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": " from jsonl "}\n\n'
        '{"file_name": "./sub/b.png", "text": "b from jsonl"}\n'
        '{"file_name": "ghost.png", "text": "nobody"}\n')
    items, skipped = discover(tmp_path)
    assert [(it.rel, it.caption, it.caption_source) for it in items] == [
        ("a.png", "from jsonl", "metadata.jsonl"), ("c.png", "txt for c", "c.txt"),
        ("sub/b.png", "b from jsonl", "metadata.jsonl")]
    assert len(skipped) == 1 and skipped[0][0].name == "ghost.png"
    assert "metadata.jsonl line 4 but not found" in skipped[0][1]


@pytest.mark.parametrize("text, message", [
    ('{"file_name": "a.png", "text": "ok"}\n{not json\n', r"metadata.jsonl line 2 is not valid JSON"),
    ('{"file_name": "a.png"}\n', r'metadata.jsonl line 1 needs string fields "file_name" and "text"'),
    ('["a.png", "x"]\n', r"metadata.jsonl line 1 needs string fields"),
    ('{"file_name": "a.png", "text": "1"}\n{"file_name": "a.png", "text": "2"}\n',
     r"metadata.jsonl line 2: 'a.png' already has a caption on line 1; keep one"),
])
def test_malformed_metadata_names_file_and_line(tmp_path, text, message):
    solid(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        discover(tmp_path)


def test_bad_files_are_skipped_with_one_reason_each(tmp_path):
    solid(tmp_path / "good.png", caption="fine")
    (tmp_path / "empty.png").write_bytes(b"")
    png = solid(tmp_path / "whole.png", (32, 32), caption="x").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 30])
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "photo.jpg", quality=90)
    jpg = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "notes.png").write_text("this is text, not a PNG\n")
    png_claiming(tmp_path / "bomb_error.png", 20000, 20000)  # > 2x PIL's limit: PIL raises
    png_claiming(tmp_path / "bomb_warning.png", 10000, 10000)  # between 1x and 2x: PIL only warns
    png_claiming(tmp_path / "bomb_ours.png", 9000, 8000)  # 72 MP: under PIL's limit, over ours
    solid(tmp_path / "tiny.png", (4, 30))
    solid(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    items, skipped = discover(tmp_path)
    assert [it.rel for it in items] == ["good.png", "photo.jpg", "whole.png"]
    reasons = {p.name: r for p, r in skipped}
    assert reasons["empty.png"].startswith("empty file (0 bytes)")
    assert reasons["cut.png"].startswith("truncated or corrupt image")
    assert reasons["cut.jpg"].startswith("truncated or corrupt image")
    assert reasons["notes.png"].startswith("not an image PIL can read")
    for name in ("bomb_error.png", "bomb_warning.png", "bomb_ours.png"):
        assert reasons[name].startswith("too large") and "decompression bomb" in reasons[name]
    assert "9000x8000 is over the 64-megapixel limit" in reasons["bomb_ours.png"]
    assert reasons["tiny.png"] == "too small: 4x30, need at least 8 px per side; use a larger image"
    assert reasons["latin1.png"] == "caption latin1.txt is not UTF-8; re-save it as UTF-8"
    assert len(skipped) == 9
    report = format_report(items, skipped).splitlines()
    assert len(report) == 9 + 2  # one line per skip, the missing-caption warning, the summary
    assert report[-2].startswith("warning: 1 image without a caption train with an empty caption (photo.jpg)")
    assert report[-1] == "3 images (1 folder, 3 samples with repeats), 9 skipped"


def test_missing_captions_and_shared_stems_warn_once(tmp_path):
    solid(tmp_path / "a.png", caption="shared")
    solid(tmp_path / "a.jpg")
    solid(tmp_path / "b.png")
    solid(tmp_path / "c.png")
    items, skipped = discover(tmp_path)
    assert [(it.rel, it.caption) for it in items] == [("a.jpg", "shared"), ("a.png", "shared"), ("b.png", ""),
                                                      ("c.png", "")]
    warn = [line for line in format_report(items, skipped).splitlines() if line.startswith("warning")]
    assert warn == [
        "warning: 2 images without a caption train with an empty caption (b.png, c.png); "
        "add same-stem caption files or metadata.jsonl lines",
        "warning: images sharing a stem share one caption (a.jpg + a.png); "
        "rename them if they need different captions"]


def test_folder_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere does not exist: check the path"):
        discover(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images in .*empty \(looked recursively for .*\.png"):
        CaptionFolder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / "b.jpg").write_text("text")
    with pytest.raises(ValueError, match=r"no usable image in .*bad: 2 file\(s\) skipped \(a.png: empty file"):
        discover(tmp_path / "bad")
    solid(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"caption_ext must be .* got 'txt': try '.txt'"):
        discover(tmp_path, caption_ext="txt")


# ----------------------------------------------------------------------------- captions

def test_caption_processor_trigger_keep_and_determinism():
    rng = random.Random(0)
    assert CaptionProcessor("outline")("a, b", rng) == "outline, a, b"
    assert CaptionProcessor("outline")("a, outline, b", rng) == "a, outline, b"  # never duplicated
    assert CaptionProcessor("outline")("", rng) == "outline"
    assert CaptionProcessor("neon, outline")("outline, a", rng) == "neon, outline, a"
    assert CaptionProcessor()(" a ,, b ,", rng) == "a, b"
    tags = [f"t{i}" for i in range(12)]
    proc = CaptionProcessor("sty", shuffle=True, keep_tokens=2)
    outs = {proc(", ".join(tags), random.Random(s)) for s in range(20)}
    assert len(outs) > 15  # it does shuffle
    for out in outs:  # the prepended trigger is kept in addition to keep_tokens
        assert out.split(", ")[:3] == ["sty", "t0", "t1"] and sorted(out.split(", ")[3:]) == sorted(tags[2:])
    assert proc(", ".join(tags), random.Random(7)) == proc(", ".join(tags), random.Random(7))
    # dropout only adds "" to a caption's strings: still cacheable by string; shuffle is not
    assert CaptionProcessor().cacheable and CaptionProcessor(dropout=0.1).cacheable and not proc.cacheable
    with pytest.raises(ValueError, match="keep_tokens must be >= 0"):
        CaptionProcessor(keep_tokens=-1)


def test_caption_dropout_rate():
    proc = CaptionProcessor("tr", dropout=0.3)
    dropped = sum(proc("a, b", random.Random(s)) == "" for s in range(4000))
    assert 0.27 < dropped / 4000 < 0.33
    assert {CaptionProcessor(dropout=0.999999)("a", random.Random(s)) for s in range(5)} == {""}
    with pytest.raises(ValueError, match=r"caption dropout must be in \[0, 1\), got 1.0"):
        CaptionProcessor(dropout=1.0)  # would train on no caption at all


tag = st.text(st.characters(blacklist_characters=",", blacklist_categories=("Cs",)), min_size=1,
              max_size=6).map(str.strip).filter(bool)


@settings(max_examples=150, deadline=None)
@given(tags=st.lists(tag, max_size=10), k=st.integers(0, 12), seed=st.integers(0, 2**32))
def test_shuffle_keeps_the_first_k_tags_and_the_multiset(tags, k, seed):
    out = CaptionProcessor(shuffle=True, keep_tokens=k)(", ".join(tags), random.Random(seed))
    got = out.split(", ") if out else []
    assert got[:k] == tags[:k] and sorted(got) == sorted(tags)


# ----------------------------------------------------------------------------- buckets, transforms

@pytest.mark.parametrize("resolution, step", [(64, 8), (512, 64), (768, 64), (1024, 64)])
def test_buckets_have_step_sides_and_target_area(resolution, step):
    buckets = make_buckets(resolution, step)
    assert (resolution, resolution) in buckets and len(buckets) >= 3
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert abs(w * h / resolution**2 - 1) <= 0.15 and max(w, h) / min(w, h) <= 2.0
        assert (h, w) in buckets
    assert assign_bucket(200, 100, buckets)[0] > assign_bucket(200, 100, buckets)[1]
    assert assign_bucket(100, 100, buckets) == (resolution, resolution)
    assert assign_bucket(100, 1000, buckets) == min(buckets, key=lambda b: b[0] / b[1])
    with pytest.raises(ValueError, match=f"resolution {resolution + 4} must be a positive multiple"):
        make_buckets(resolution + 4, step)


def test_items_go_to_buckets_and_come_out_in_range(tmp_path):
    solid(tmp_path / "wide.png", (128, 64), RED, caption="wide one")
    solid(tmp_path / "square.png", (16, 16), BLUE, caption="square one")
    data = CaptionFolder(tmp_path, resolution=64, captions=CaptionProcessor("sty"))
    assert data.buckets == [(48, 88), (56, 72), (64, 64), (72, 56), (88, 48)]
    sq, wide = data[0], data[1]
    assert wide["bucket"] == (88, 48) and wide["pixel_values"].shape == (3, 48, 88)
    assert wide["caption"] == "sty, wide one" and wide["index"] == 1
    assert sq["bucket"] == (64, 64) and sq["pixel_values"].dtype == torch.float32
    # solid colours survive resizing exactly and map 255 -> 1, 0 -> -1
    assert torch.equal(sq["pixel_values"], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 64, 64))
    assert data.deterministic_pixels and data.cacheable_captions
    flat = CaptionFolder(tmp_path, resolution=64, bucket=False)
    assert {flat[i]["pixel_values"].shape for i in range(2)} == {(3, 64, 64)}
    assert "buckets: 64x64 (1), 88x48 (1)" in data.report
    with pytest.raises(IndexError, match="sample 2 out of range"):
        data[2]


def thirds(path: Path) -> Path:
    im = Image.new("RGB", (48, 16), RED)
    im.paste(GREEN, (16, 0, 32, 16))
    im.paste(BLUE, (32, 0, 48, 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def test_center_crop_random_crop_and_flip(tmp_path):
    img = load_image(thirds(tmp_path / "t.png"))
    assert set(fit_to_bucket(img, (16, 16)).getdata()) == {GREEN}
    crops = {tuple(fit_to_bucket(img, (16, 16), random.Random(s), random_crop=True).getdata()) for s in range(30)}
    assert len(crops) > 10  # many offsets, each a 16x16 window of the strip
    flips = [fit_to_bucket(img, (48, 16), random.Random(s), flip=True) for s in range(30)]
    firsts = {f.getpixel((0, 0)) for f in flips}
    assert firsts == {RED, BLUE}  # unflipped and mirrored both occur, nothing else


def test_randomness_is_a_function_of_seed_epoch_and_index(tmp_path):
    thirds(tmp_path / "8_strip" / "t.png")
    (tmp_path / "8_strip" / "t.txt").write_text("a, b, c, d, e, f")
    kw = dict(resolution=16, bucket=False, random_crop=True, flip=True,
              captions=CaptionProcessor(shuffle=True), seed=3)
    one, two = CaptionFolder(tmp_path, **kw), CaptionFolder(tmp_path, **kw)
    assert not one.deterministic_pixels and not one.cacheable_captions
    first = [one[i] for i in range(8)]
    assert len({tuple(s["pixel_values"].flatten().tolist()) for s in first}) > 1
    for a, b in zip(first, (two[i] for i in range(8))):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    two.set_epoch(1)
    assert [s["caption"] for s in first] != [two[i]["caption"] for i in range(8)]


def test_sampling_helpers(tmp_path):
    for i in range(3):
        solid(tmp_path / f"{i}.png", caption=f"outline, thing {i}")
    solid(tmp_path / "3.png")  # uncaptioned images do not veto a trigger
    data = CaptionFolder(tmp_path, captions=CaptionProcessor("neon", shuffle=True, dropout=0.5))
    assert data.guess_triggers() == ["outline"]
    assert data.caption_for_sampling(1) == "neon, outline, thing 1"
    solo = tmp_path / "solo"
    solid(solo / "a.png", caption="pastel, a red star")
    assert CaptionFolder(solo).guess_triggers() == []  # "pastel, a red star" or "a red star, pastel"?
    trailing = tmp_path / "trailing"  # the example datasets' convention: "caption, trigger"
    for i in range(3):
        solid(trailing / f"{i}.png", caption=f"a thing {i}, sepia, dots")
    assert CaptionFolder(trailing).guess_triggers() == ["sepia", "dots"]


# ----------------------------------------------------------------------------- sampler

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    for i in range(7):
        solid(root / f"sq{i}.png", (16, 16))
    for i in range(4):
        solid(root / f"wide{i}.png", (32, 16))
    solid(root / "2_tall" / "tall.png", (16, 32))
    return CaptionFolder(root, resolution=64)


def test_sampler_batches_are_single_bucket_and_cover_each_index_once(mixed):
    assert len(mixed) == 13
    sampler = BucketBatchSampler(mixed, 3, seed=0)
    for epoch in range(4):
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(13))
        assert all(len({mixed.bucket_of(i) for i in b}) == 1 and 1 <= len(b) <= 3 for b in batches)
        assert len(batches) == len(sampler) == 3 + 2 + 1  # ceil(7/3) + ceil(4/3) + ceil(2/3)
    assert sampler.batches(1) == BucketBatchSampler(mixed, 3, seed=0).batches(1)
    assert sampler.batches(0) != sampler.batches(1)
    assert sampler.batches(0) != BucketBatchSampler(mixed, 3, seed=1).batches(0)
    sampler.set_epoch(2)
    assert list(sampler) == sampler.batches(2)
    sampler.batches(2)[0].append(99)  # callers get copies
    assert 99 not in sampler.batches(2)[0]


def test_sampler_drop_last(mixed):
    batches = BucketBatchSampler(mixed, 3, seed=0, drop_last=True).batches(0)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)  # 2 square + 1 wide
    with pytest.raises(ValueError, match="drop_last with batch_size 9 leaves no batch"):
        BucketBatchSampler(mixed, 9, seed=0, drop_last=True)
