"""Bad inputs at the public boundaries: every case gets one clear error (or one report line) that
names the file or value and says what to do -- never a traceback, a hang or a half-written file.

test_data.py / test_adapters.py / test_train.py check the pieces (discover's skip reasons,
load_adapter's refusals, TrainConfig); this file checks what a user meets: a CaptionFolder's
report, a sample that trains, and `python -m stylelora.cli ...` in a real subprocess (exit code 2,
one "stylelora: error:" line, no "Traceback", no output file).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stylelora.adapters import LoraFactors, load_adapter, save_adapter
from stylelora.blend import AdapterStack, parse_prompt_loras
from stylelora.data import CaptionFolder, discover
from stylelora.train import TrainConfig, load_toml, train

from test_adapters import UNET_KEYS, make_adapter
from test_data import png_claiming, solid

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
LONG = ", ".join(["a red star on a white background"] * 12)  # 97 tokens for the world tokenizer


@pytest.fixture(autouse=True)
def deadline():
    """Nothing hangs: a test still running after 120 s fails (SIGALRM; no pytest-timeout needed)."""
    def expired(*_):
        raise TimeoutError("test ran over 120 s: a bad input made something hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The few trainings here are tiny: one thread each avoids oversubscribing a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stylelora.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error(done: subprocess.CompletedProcess, *patterns: str) -> str:
    """Exit 2, exactly one 'stylelora: error:' line matching every pattern, no traceback."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("stylelora: error:")]
    assert done.returncode == 2 and len(errors) == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for i, color in enumerate((RED, BLUE)):
        solid(root / f"{i}.png", (64, 64), color, caption=f"outline, a shape {i}")
    return root


# ----------------------------------------------------------------------------- images
# Each maker writes one problem file next to a good image; the good one must still train.

def _noise(path: Path, size=(32, 32), **save) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **save)
    return path.read_bytes()


def _bytes(name: str, data: bytes):
    def make(root: Path) -> str:
        (root / name).write_bytes(data)
        return name
    return make


def _saved(name: str, image: Image.Image):
    def make(root: Path) -> str:
        image.save(root / name)
        return name
    return make


def _truncated_png(root):
    data = _noise(root / "cut.png")
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    return "cut.png"


def _truncated_jpeg(root):
    data = _noise(root / "cut.jpg", quality=90)
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    return "cut.jpg"


def _sixteen_bit(root):
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "g16.png")
    return "g16.png"


def _cmyk(root):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(root / "cmyk.jpg", quality=95)
    return "cmyk.jpg"


def _palette_transparency(root):
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (8, 0, 16, 16))
    p.save(root / "pal.png", transparency=0)
    return "pal.png"


def _animated_gif(root):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, GREEN)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return "anim.gif"


def _exif_rotated(root):
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: shown 90 degrees counter-clockwise, so 40x20 becomes 20x40
    Image.new("RGB", (40, 20), BLUE).save(root / "rot.jpg", exif=exif, quality=95)
    return "rot.jpg"


IMAGE_SKIPS = {  # id: (maker, the report line's reason)
    "zero-bytes": (_bytes("empty.png", b""), r"empty file \(0 bytes\); export the image again or delete it"),
    "truncated-png": (_truncated_png, r"truncated or corrupt image .*; export it again or delete it"),
    "truncated-jpeg": (_truncated_jpeg, r"truncated or corrupt image .*; export it again or delete it"),
    "text-as-png": (_bytes("notes.png", b"not a picture\n"),
                    r"not an image PIL can read \(wrong extension or not an image\); delete or convert it"),
    "text-as-jpeg": (_bytes("readme.jpg", b"<html></html>"), r"not an image PIL can read"),
    "bomb-dimensions": (lambda r: png_claiming(r / "bomb.png", 30000, 30000).name,
                        r"too large.*decompression bomb.*downscale it"),
    "one-by-one": (_saved("dot.png", Image.new("RGB", (1, 1))),
                   r"too small: 1x1, need at least 8 px per side; use a larger image"),
    # 8,000,000 x 8 is exactly 64 MP (under the pixel limit) in a few hundred bytes of PNG; resized to
    # cover a 2:1 bucket it would be gigapixels. It must be refused before anything decodes it.
    "very-wide": (lambda r: png_claiming(r / "strip.png", 8_000_000, 8).name,
                  r"too elongated: 8000000x8 is more than 8:1.*crop it"),
    "very-tall": (_saved("pole.png", Image.new("RGB", (8, 200))), r"too elongated: 8x200"),
    "lab-mode": (_saved("lab.tif", Image.new("LAB", (16, 16))),
                 r"colour mode LAB is not supported; convert it to RGB"),
}


@pytest.mark.parametrize("case", list(IMAGE_SKIPS))
def test_bad_image_is_skipped_with_one_line_naming_it(tmp_path, case):
    make, reason = IMAGE_SKIPS[case]
    solid(tmp_path / "good.png", (16, 16), RED, caption="good")
    name = make(tmp_path)
    t0 = time.perf_counter()
    data = CaptionFolder(tmp_path, resolution=64)
    assert time.perf_counter() - t0 < 10, "discovery must not decode bombs or strips"
    lines = [line for line in data.report.splitlines() if line.startswith("skipped")]
    assert len(lines) == 1 and lines[0].startswith(f"skipped {tmp_path / name}: "), data.report
    assert re.search(reason, lines[0]), lines[0]
    assert [it.rel for it in data.items] == ["good.png"]
    assert data[0]["pixel_values"].shape == (3, 64, 64)


IMAGE_ACCEPTED = {  # id: (maker, expected bucket (w, h), expected mean RGB in [-1, 1])
    "16-bit": (_sixteen_bit, (64, 64), (1.0, 1.0, 1.0)),
    "cmyk": (_cmyk, (64, 64), (-1.0, 1.0, 1.0)),  # cyan
    "palette-transparency": (_palette_transparency, (64, 64), (0.0, 1.0, 0.0)),  # half white, half green
    "animated-gif": (_animated_gif, (64, 64), (1.0, -1.0, -1.0)),  # the first frame: red
    "exif-rotated": (_exif_rotated, (48, 88), (-1.0, -1.0, 1.0)),  # upright it is tall
    "wide-4-to-1": (_saved("pano.png", Image.new("RGB", (64, 16), GREEN)), (88, 48), (-1.0, 1.0, -1.0)),
}


@pytest.mark.parametrize("case", list(IMAGE_ACCEPTED))
def test_unusual_image_is_converted_and_trains(tmp_path, case):
    make, bucket, mean = IMAGE_ACCEPTED[case]
    name = make(tmp_path)
    (tmp_path / name).with_suffix(".txt").write_text("a caption")
    data = CaptionFolder(tmp_path, resolution=64)
    assert data.skipped == [] and [it.rel for it in data.items] == [name]
    sample = data[0]
    pix = sample["pixel_values"]
    assert sample["bucket"] == bucket and pix.shape == (3, bucket[1], bucket[0])
    assert torch.isfinite(pix).all() and pix.min() >= -1 and pix.max() <= 1
    got = pix.mean(dim=(1, 2)).tolist()
    assert got == pytest.approx(list(mean), abs=0.05), got


# ----------------------------------------------------------------------------- unreadable files

def _deny(monkeypatch, targets: set[Path]) -> None:
    """chmod 000 as seen by root: root reads anything, so make open/scandir refuse these paths."""
    denied = {str(p) for p in targets}

    def guard(real):
        def wrapped(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) in denied:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real(file, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(io, "open", guard(io.open))
    monkeypatch.setattr(os, "scandir", guard(os.scandir))


@pytest.fixture
def make_unreadable(monkeypatch):
    """chmod 000 -- or, as root (whom chmod does not stop), a simulation of it."""
    changed: list[Path] = []

    def lock(path: Path) -> None:
        if os.geteuid() == 0:
            _deny(monkeypatch, {path})
        else:
            path.chmod(0)
            changed.append(path)

    yield lock
    for path in changed:
        path.chmod(0o755)


def test_unreadable_image_is_skipped_naming_permissions(tmp_path, make_unreadable):
    solid(tmp_path / "good.png", caption="fine")
    locked = solid(tmp_path / "locked.png", caption="fine too")
    make_unreadable(locked)
    items, skipped = discover(tmp_path)
    assert [it.rel for it in items] == ["good.png"]
    assert skipped == [(locked, "not readable (Permission denied); fix its permissions (chmod +r) or delete it")]


def test_unreadable_caption_skips_the_pair_instead_of_training_it_uncaptioned(tmp_path, make_unreadable):
    solid(tmp_path / "good.png", caption="fine")
    solid(tmp_path / "a.png", caption="secret")
    make_unreadable(tmp_path / "a.txt")
    items, skipped = discover(tmp_path)
    assert [it.rel for it in items] == ["good.png"]
    assert skipped == [(tmp_path / "a.png", "caption a.txt is not readable (Permission denied); "
                                            "fix its permissions (chmod +r)")]


def test_unreadable_folder_is_reported_not_silently_dropped(tmp_path, make_unreadable):
    solid(tmp_path / "good.png", caption="fine")
    solid(tmp_path / "3_style" / "b.png", caption="hidden by permissions")
    make_unreadable(tmp_path / "3_style")
    data = CaptionFolder(tmp_path)
    assert [it.rel for it in data.items] == ["good.png"]
    assert f"skipped {tmp_path / '3_style'}: folder not readable (Permission denied); fix its permissions " \
           "(chmod +rx) or move it out of the dataset" in data.report.splitlines()


# ----------------------------------------------------------------------------- captions

def _warnings(root: Path) -> list[str]:
    return [line for line in CaptionFolder(root).report.splitlines() if line.startswith("warning")]


def test_missing_caption_warns_naming_the_image(tmp_path):
    solid(tmp_path / "a.png", caption="ok")
    solid(tmp_path / "sub" / "nocap.png")
    assert _warnings(tmp_path) == [
        "warning: 1 image without a caption train with an empty caption (sub/nocap.png); "
        "add same-stem caption files or metadata.jsonl lines"]


def test_empty_caption_file_warns_naming_the_file(tmp_path):
    solid(tmp_path / "a.png", caption="ok")
    solid(tmp_path / "sub" / "b.png", caption="  \n")
    assert _warnings(tmp_path) == [
        "warning: 1 caption is empty (sub/b.txt), so its image trains with an empty caption; write the captions"]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_non_utf8_caption_skips_the_image_naming_the_caption(tmp_path, encoding):
    solid(tmp_path / "a.png", caption="ok")
    solid(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("café crème".encode(encoding))
    items, skipped = discover(tmp_path)
    assert [it.rel for it in items] == ["a.png"]
    assert skipped == [(tmp_path / "b.png", "caption b.txt is not UTF-8; re-save it as UTF-8")]


def test_caption_longer_than_the_text_encoder_warns_naming_the_file(tmp_path):
    from stylelora.world.tokenizer import build_tokenizer

    solid(tmp_path / "short.png", caption="a red star")
    solid(tmp_path / "sub" / "long.png", caption=LONG)
    solid(tmp_path / "m.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "m.png", "text": "%s"}\n' % LONG)
    tok = build_tokenizer()
    assert CaptionFolder(tmp_path).long_captions(tok) == [
        "warning: 2 captions are longer than the text encoder's 77 tokens and will be truncated "
        "(metadata.jsonl (m.png): 97 tokens, sub/long.txt: 97 tokens); shorten them or move the important "
        "tags to the front"]
    # The trigger counts too: it is part of what the text encoder reads.
    fits = ", ".join(["a red star on a white background"] * 9)  # 73 tokens with BOS/EOS
    solo = tmp_path / "solo"
    solid(solo / "a.png", caption=fits)
    assert CaptionFolder(solo).long_captions(tok) == []
    from stylelora.data import CaptionProcessor

    assert "1 caption is longer" in CaptionFolder(solo, captions=CaptionProcessor("neon pastel outline stripes"
                                                                                 " dotted")).long_captions(tok)[0]


def test_training_prints_the_long_caption_warning(tmp_path, tiny_base, capsys):
    solid(tmp_path / "data" / "a.png", (64, 64), RED, caption="outline, a red square")
    solid(tmp_path / "data" / "b.png", (64, 64), BLUE, caption=LONG)
    out = train(TrainConfig(dataset=str(tmp_path / "data"), out=str(tmp_path / "a.safetensors"), base=str(tiny_base),
                            steps=1, batch_size=1, rank=1, sample_every=0, checkpoint_every=0, progress=False,
                            device="cpu"))
    printed = capsys.readouterr().out
    assert re.search(r"warning: 1 caption is longer than the text encoder's 77 tokens and will be truncated "
                     r"\(b\.txt: 97 tokens\)", printed), printed
    assert load_adapter(out).layers


def test_duplicate_stems_share_a_caption_and_warn(tmp_path):
    solid(tmp_path / "a.png", caption="one caption")
    solid(tmp_path / "a.webp")
    items, _ = discover(tmp_path)
    assert [(it.rel, it.caption) for it in items] == [("a.png", "one caption"), ("a.webp", "one caption")]
    assert _warnings(tmp_path) == ["warning: images sharing a stem share one caption (a.png + a.webp); "
                                   "rename them if they need different captions"]


# ----------------------------------------------------------------------------- folders

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere does not exist: check the path"):
        CaptionFolder(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match=rf"no images in {re.escape(str(tmp_path))} \(looked recursively.*add images"):
        CaptionFolder(tmp_path)


def test_folder_of_captions_without_images(tmp_path):
    for name in ("a.txt", "b.txt", "metadata.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "pics.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ValueError, match=r"no images in .*\.png.*add images with same-stem \.txt captions"):
        CaptionFolder(tmp_path)


def test_folder_of_only_bad_images_names_them(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    solid(tmp_path / "b.png", (2, 2))
    with pytest.raises(ValueError, match=r"no usable image in .*: 2 file\(s\) skipped \(a\.png: empty file.*"
                                         r"b\.png: too small.*fix or replace them"):
        CaptionFolder(tmp_path)


def test_dataset_path_is_a_file(tmp_path):
    solid(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.png is a file, not a folder: pass the folder that holds the images"):
        CaptionFolder(tmp_path / "a.png")


def test_nested_repeats_folders_warn_that_only_the_top_level_counts(tmp_path):
    solid(tmp_path / "3_style" / "a.png", caption="x")
    solid(tmp_path / "3_style" / "2_more" / "b.png", caption="x")
    solid(tmp_path / "plain" / "5_deep" / "c.png", caption="x")
    data = CaptionFolder(tmp_path)
    assert [(it.rel, it.repeats) for it in data.items] == [
        ("3_style/2_more/b.png", 3), ("3_style/a.png", 3), ("plain/5_deep/c.png", 1)]
    assert _warnings(tmp_path) == [
        "warning: repeats folders below the top level set no count (3_style/2_more, plain/5_deep): only a "
        "folder directly in the dataset folder sets repeats, for every image below it; move the folder up "
        "a level if it needs its own count"]


# ----------------------------------------------------------------------------- adapter files
# Each is refused by load_adapter with a ValueError naming the file and the fix (which the CLI
# prints as one line: a few go through `stylelora inspect` to show it).

def _good(pipe, path: Path) -> Path:
    return save_adapter(make_adapter(pipe, keys=UNET_KEYS[:2]), path)


def _cut(pipe, path, keep):
    path.write_bytes(_good(pipe, path).read_bytes()[:keep])


OK = {"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)}
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
ADAPTERS = {  # id: (writer(pipe, path), message pattern)
    "zero-bytes": (lambda pipe, p: p.write_bytes(b""),
                   r"x\.safetensors is truncated \(0 bytes, less than a safetensors header\); re-export it"),
    "truncated-header": (lambda pipe, p: _cut(pipe, p, 200),
                         r"x\.safetensors is truncated: its header claims \d+ bytes but only 192 follow; re-download"),
    "truncated-tensors": (lambda pipe, p: _cut(pipe, p, -100),
                          r"x\.safetensors is not a valid safetensors file .* truncated or corrupt: re-download"),
    "oversized-header": (lambda pipe, p: p.write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 64),
                         r"x\.safetensors declares a 1099511627776-byte header, over max_header_bytes=100000000"),
    "header-not-json": (lambda pipe, p: p.write_bytes(struct.pack("<Q", 16) + b"{not json at all"),
                        r"x\.safetensors is not a valid safetensors file .*invalid JSON.*re-download or re-export"),
    "nan": (lambda pipe, p: save_file({**OK, "unet.a.lora_A.weight": torch.tensor([[1.0, float("nan")]])}, p),
            r"x\.safetensors: tensor unet\.a\.lora_A\.weight contains NaN/inf.*re-export it from a good checkpoint"),
    "inf": (lambda pipe, p: save_file({**OK, "unet.a.lora_B.weight": torch.tensor([[float("-inf")], [1.0]])}, p),
            r"x\.safetensors: tensor unet\.a\.lora_B\.weight contains NaN/inf"),
    "unknown-keys": (lambda pipe, p: save_file({"model.diffusion_model.out.2.weight": torch.ones(2, 2)}, p),
                     r"x\.safetensors: 1 key\(s\) are not LoRA weights .*model\.diffusion_model\.out\.2\.weight.*"
                     r"export a plain SD 1\.x/2\.x LoRA"),
    "pickle-renamed": (lambda pipe, p: p.write_bytes(pickle.dumps({"state_dict": [1, 2]}, protocol=2)),
                       r"x\.safetensors is a pickle-based file; stylelora only loads \.safetensors\. Convert it"),
    "metadata-not-json": (lambda pipe, p: save_file(OK, p, metadata={"stylelora.training": "{steps: 5"}),
                          r"x\.safetensors: metadata 'stylelora\.training' is not valid JSON .*"
                          r"fix or delete that entry"),
    "metadata-wrong-json-type": (lambda pipe, p: save_file(OK, p, metadata={"lora_adapter_metadata": "[1, 2]"}),
                                 r"x\.safetensors: metadata 'lora_adapter_metadata' must be a JSON object, got "
                                 r"'\[1, 2\]'; fix or delete that entry"),
    "trigger-words-a-string": (lambda pipe, p: save_file(OK, p, metadata={"stylelora.trigger_words": '"neon"'}),
                               r"metadata 'stylelora\.trigger_words' must be a JSON list of strings"),
    "lora-config-alpha-not-a-number": (
        lambda pipe, p: save_file(OK, p, metadata={"lora_adapter_metadata": '{"unet.lora_alpha": "high"}'}),
        r"x\.safetensors: metadata 'lora_adapter_metadata' has unet\.lora_alpha = 'high', which must be a number"),
    "alpha-not-a-scalar": (lambda pipe, p: save_file({f"{KOHYA}.lora_down.weight": torch.ones(2, 64),
                                                      f"{KOHYA}.lora_up.weight": torch.ones(64, 2),
                                                      f"{KOHYA}.alpha": torch.ones(2)}, p),
                           rf"x\.safetensors: {KOHYA}\.alpha should hold one number .* shape \(2,\); the file is "
                           r"corrupt, re-export it"),
    "integer-weights": (lambda pipe, p: save_file({k: v.long() for k, v in OK.items()}, p),
                        r"x\.safetensors: layer unet\.a: LoRA down/up are torch\.int64/torch\.int64: LoRA weights "
                        r"must be floating point"),
    "down-without-up": (lambda pipe, p: save_file({"unet.a.lora_A.weight": torch.ones(1, 2)}, p),
                        r"x\.safetensors: unet\.a has lora_A without its partner; the file is incomplete, re-export"),
    "ranks-do-not-pair": (lambda pipe, p: save_file({**OK, "unet.a.lora_A.weight": torch.ones(3, 2)}, p),
                          r"x\.safetensors: layer unet\.a: LoRA down \(3, 2\) and up \(2, 1\) do not pair"),
    "no-tensors": (lambda pipe, p: save_file({}, p), r"x\.safetensors holds no tensors; it is not a LoRA adapter"),
}


THROUGH_CLI = {"zero-bytes", "oversized-header", "nan", "pickle-renamed", "metadata-wrong-json-type"}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_bad_adapter_file_is_refused(tmp_path, tiny_random_pipe, case):
    write, pattern = ADAPTERS[case]
    path = tmp_path / "x.safetensors"
    write(tiny_random_pipe, path)
    with pytest.raises(ValueError, match=pattern):
        load_adapter(path)
    if case in THROUGH_CLI:
        assert_one_error(cli("inspect", path, cwd=tmp_path), pattern)


def test_pickle_suffix_is_refused_before_reading(tmp_path):
    (tmp_path / "style.ckpt").write_bytes(b"\x80\x04K\x01.")
    done = cli("convert", "style.ckpt", "--to", "kohya", "-o", "out.safetensors", cwd=tmp_path)
    assert_one_error(done, r"style\.ckpt is a pickle-based file; stylelora only loads \.safetensors", "Convert it")
    assert not (tmp_path / "out.safetensors").exists()


def test_adapter_for_another_base_names_the_layer_and_both_shapes(tmp_path, tiny_random_pipe, tiny_base):
    ad = make_adapter(tiny_random_pipe, keys=UNET_KEYS[:2])
    key = UNET_KEYS[1]  # attn2.to_k: (64, 64) in this base; give the adapter a 32-wide input
    ad.layers[key] = LoraFactors(torch.zeros(4, 32), torch.zeros(64, 4), 4.0)
    path = save_adapter(ad, tmp_path / "other.safetensors")
    pattern = rf"adapter layer {re.escape(key)} does not fit this base model: .*\(64, 32\) \(out, in\) but the " \
              r"base weight is \(64, 64\); the adapter was trained for a different base"
    with pytest.raises(ValueError, match=pattern):
        AdapterStack(tiny_random_pipe).add("other", path)
    done = cli("generate", "a red star", "--adapter", path, "--base", tiny_base, "--steps", 1, "-o", "x.png",
               cwd=tmp_path)
    assert_one_error(done, pattern)
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- configs and the CLI

@pytest.mark.parametrize("flags, pattern", [
    (["--rank", "0"], r"rank must be a positive integer, got 0: try --rank 4"),
    (["--rank=-3"], r"rank must be a positive integer, got -3: try --rank 4"),
    (["--lr", "0"], r"learning rate must be positive, got 0\.0: try --lr 2e-3"),
    (["--lr=-0.001"], r"learning rate must be positive, got -0\.001: try --lr 2e-3"),
    (["--resolution", "60"], r"resolution must be a positive multiple of 8, got 60: try 64"),
    (["--keep-checkpoints", "0"], r"keep_checkpoints must be >= 1, got 0 .*use checkpoint_every = 0 for none"),
    (["--log-every", "0"], r"log_every must be positive, got 0: try 10"),
    (["--out", "style.ckpt"], r"out must end in \.safetensors, got 'style\.ckpt'"),
], ids=["rank-0", "rank-negative", "lr-0", "lr-negative", "resolution-not-multiple-of-8", "keep-checkpoints-0",
        "log-every-0", "out-not-safetensors"])
def test_train_flag_errors(tmp_path, dataset, flags, pattern):
    done = cli("train", dataset, *flags, cwd=tmp_path)
    assert_one_error(done, pattern)
    assert list(tmp_path.iterdir()) == []  # no adapter, no run folder


@pytest.mark.parametrize("toml, pattern", [
    ("rank = 8\nlearning_rate = 1e-3\n", r"unknown key\(s\) \['learning_rate'\] in .*t\.toml; known keys are"),
    ('rank = "four"\n', r"rank must be an integer, got 'four' \(str\)"),
    ("lr = true\n", r"lr must be a number, got True \(bool\)"),
    ("sample_prompts = 'a red star'\n", r"sample_prompts must be a list of strings, got 'a red star'"),
    ("rank = 4\n[train]\nlr = 1e-3\n", r"t\.toml has key\(s\) \['rank'\] outside its \[train\] table, where they "
                                       r"would be ignored: move them into \[train\]"),
    ("rank = \n", r"config file .*t\.toml is not valid TOML"),
], ids=["unknown-key", "wrong-type-int", "wrong-type-float", "wrong-type-list", "keys-outside-table", "syntax"])
def test_train_toml_errors(tmp_path, dataset, toml, pattern):
    (tmp_path / "t.toml").write_text(toml)
    done = cli("train", dataset, "--config", "t.toml", cwd=tmp_path)
    assert_one_error(done, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]


def test_toml_errors_in_the_library_too(tmp_path):
    (tmp_path / "t.toml").write_text("[train]\nrank = 8.5\n")
    with pytest.raises(ValueError, match=r"rank must be an integer, got 8\.5 \(float\)"):
        TrainConfig(**load_toml(tmp_path / "t.toml"))
    with pytest.raises(FileNotFoundError, match=r"config file .*nope\.toml does not exist"):
        load_toml(tmp_path / "nope.toml")
    cfg = TrainConfig(dataset=tmp_path, out=tmp_path / "a.safetensors")  # paths are fine, and become strings
    assert cfg.dataset == str(tmp_path) and cfg.out == str(tmp_path / "a.safetensors")


def test_missing_dataset_fails_before_loading_the_base(tmp_path, tiny_base):
    t0 = time.perf_counter()
    done = cli("train", tmp_path / "nowhere", "--base", tiny_base, "--device", "cpu", cwd=tmp_path)
    assert_one_error(done, r"dataset folder .*nowhere does not exist: check the path")
    assert list(tmp_path.iterdir()) == [] and time.perf_counter() - t0 < 60


def test_missing_dataset_is_reported_without_loading_the_base(tmp_path, monkeypatch, capsys):
    import stylelora.base
    from stylelora.cli import main

    def no_load(*a, **k):
        raise AssertionError("the base was loaded before the dataset was checked")

    monkeypatch.setattr(stylelora.base, "load_base", no_load)
    assert main(["train", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert re.search(r"dataset folder .*nowhere does not exist: check the path", capsys.readouterr().err)


def test_dataset_of_only_bad_images_is_one_error(tmp_path, tiny_base):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_text("text")
    done = cli("train", "data", "--base", tiny_base, "--device", "cpu", cwd=tmp_path)
    assert_one_error(done, r"no usable image in data: 1 file\(s\) skipped \(a\.png: not an image.*fix or replace them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_rank_above_the_layer_size(tmp_path, dataset, tiny_base):
    done = cli("train", dataset, "--base", tiny_base, "--rank", 65, "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert_one_error(done, r"rank 65 is larger than layer .*attn1\.to_q allows \(64x64, at most 64\): "
                           r"choose --rank 64 or less")
    assert list(tmp_path.iterdir()) == []


def test_resume_with_a_different_rank_names_the_mismatch(tmp_path, dataset, tiny_base):
    common = dict(dataset=str(dataset), base=str(tiny_base), steps=2, batch_size=1, sample_every=0, progress=False,
                  device="cpu", checkpoint_every=1, out=str(tmp_path / "a.safetensors"))
    train(TrainConfig(rank=1, **common))
    with pytest.raises(ValueError, match=r"checkpoint .*step-000001 was trained with different settings: rank=1 "
                                         r"there, 2 here\. Resume with the checkpoint's settings"):
        train(TrainConfig(rank=2, resume=str(tmp_path / "a.run"), **common))
    # A checkpoint without its settings (hand-made, or damaged state.json): the tensors' shapes still tell.
    state = tmp_path / "a.run" / "checkpoints" / "step-000001" / "state.json"
    state.write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match=r"checkpoint .*step-000001 does not match this run's LoRA layout \(.* is "
                                         r"\(1, \d+\) there, \(2, \d+\) here\): resume with the same targets, rank"):
        train(TrainConfig(rank=2, resume=str(tmp_path / "a.run"), **common))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*nothing: pass a run folder's checkpoints"):
        train(TrainConfig(rank=1, resume=str(tmp_path / "nothing"), **common))


@pytest.mark.parametrize("spec, pattern", [
    ("pastel.safetensors:strong", r"malformed adapter 'pastel\.safetensors:strong': use PATH, PATH:SCALE or "
                                  r"PATH:SCALE:TE_SCALE \(e\.g\. pastel\.safetensors:0\.8\)"),
    (":0.5", r"malformed adapter ':0\.5'"),
    ("pastel.safetensors:1:2:3", r"malformed adapter 'pastel\.safetensors:1:2:3'"),
    ("pastel.safetensors:nan", r"adapter scale in 'pastel\.safetensors:nan' is not a finite number: use e\.g\. "
                               r"pastel\.safetensors:0\.8"),
    ("pastel.safetensors:1:inf", r"adapter scale in 'pastel\.safetensors:1:inf' is not a finite number"),
], ids=["adapter-scale-not-a-number", "adapter-no-path", "adapter-too-many-scales", "adapter-scale-nan",
        "adapter-te-scale-inf"])
def test_generate_adapter_spec_errors(tmp_path, spec, pattern):
    done = cli("generate", "a red star", "--adapter", spec, "-o", "x.png", cwd=tmp_path)
    assert_one_error(done, pattern)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt, pattern", [
    ("a star <lora:pastel:strong>", r"malformed prompt tag <lora:pastel:strong>: use <lora:NAME> or "
                                    r"<lora:NAME:SCALE> .*\(e\.g\. <lora:pastel:0\.8>\)"),
    ("a star <lora::0.5>", r"malformed prompt tag <lora::0\.5>"),
    ("a star <lora:../secrets:1>", r"malformed prompt tag <lora:\.\./secrets:1>"),
    ("a star <lora:pastel:inf>", r"malformed prompt tag <lora:pastel:inf>"),
    ("a star <lora:pastel:0.8", r"unclosed <lora:\.\.\.> tag in prompt 'a star <lora:pastel:0\.8': write "
                                r"<lora:NAME:SCALE>"),
    ("a star <lora:ghost>", r"<lora:ghost>: no adapters/ghost\.safetensors \(adapters in adapters: none\); pass "
                            r"--adapters-dir DIR"),
], ids=["tag-scale-not-a-number", "tag-no-name", "tag-path-traversal", "tag-scale-inf", "tag-unclosed",
        "tag-missing-file"])
def test_generate_lora_tag_errors(tmp_path, prompt, pattern):
    (tmp_path / "adapters").mkdir()
    done = cli("generate", prompt, "-o", "x.png", cwd=tmp_path)
    assert_one_error(done, pattern)
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]
    with pytest.raises((ValueError, FileNotFoundError)):  # the library raises the same
        parse_prompt_loras(prompt, tmp_path / "adapters")


def test_atomic_path_leaves_the_old_file_or_the_new_one(tmp_path):
    from stylelora.fileio import atomic_path, write_text

    target = write_text(tmp_path / "a.txt", "old\n")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("mid-write")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with atomic_path(tmp_path / "b.png") as tmp:  # the real suffix stays last: PIL picks PNG from it
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        Image.new("RGB", (4, 4)).save(tmp)
    assert Image.open(tmp_path / "b.png").format == "PNG"
    # Modes: a new file gets what open() would give it (not mkstemp's 0600), a rewritten one keeps its own.
    from stylelora.fileio import _umask

    old_mask = os.umask(0o027)
    try:
        assert _umask() == 0o027
        assert write_text(tmp_path / "new.txt", "x").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old_mask)
    os.chmod(target, 0o604)
    assert write_text(target, "newer\n").stat().st_mode & 0o777 == 0o604


def test_a_write_killed_midway_is_swept_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from stylelora.fileio import write_text

    target = tmp_path / "a.safetensors"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from stylelora.fileio import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)])
    assert killed.returncode == -signal.SIGKILL
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".a.safetensors.") and not target.exists()
    live = tmp_path / f".a.safetensors.{os.getpid()}.x.tmp.safetensors"  # a writer still running
    live.write_bytes(b"")
    dead_pid = orphans[0].split(".")[3]
    other = tmp_path / f".b.safetensors.{dead_pid}.x.tmp.safetensors"  # another file's: not this write's
    other.write_bytes(b"")
    write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--out", "x.unknown"], r"--out x\.unknown: unknown image type '\.unknown'; use \.png"),
    (["world", "pretrain", "--out", "o", "--stages", "judge,unett"], r"unknown --stages unett: choose from"),
    (["generate", "x", "--out", "x.png", "--device", "bogus"], r"unknown device 'bogus': use auto, cpu, cuda"),
])
def test_cli_refuses_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    from stylelora.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
