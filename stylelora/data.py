"""Training data: a folder of captioned images as a torch Dataset, with buckets and repeats.

Folder layout (searched recursively; names starting with "." are ignored):

    root/
      a.png  a.txt                  image + same-stem caption (UTF-8; a BOM is accepted)
      3_style/b.jpg  3_style/b.txt  kohya-style repeats: see below
      metadata.jsonl                optional: {"file_name": "a.png", "text": "a caption"} per line
      masks/a.png                   masked loss: a.png's mask (white = learn); see find_masks
      style.run/                    a stylelora run folder (loss curve, sample grids): never searched

- Captions: a line of metadata.jsonl (diffusers imagefolder convention, file_name relative to
  root) wins over a caption file for the image it names. An image with neither trains with an
  empty caption (one warning line in the report).
- Repeats: a folder directly under root named `N_name` (N a positive integer) shows each image
  below it, at any depth, N times per epoch; every other image appears once. N counts samples,
  not steps: `3_style` with 10 images is 30 samples.
- Checks: every image is opened and decoded once here, so a bad file is skipped with one line
  saying why (empty, unreadable, truncated, not an image, over MAX_PIXELS, under MIN_SIDE px,
  more elongated than MAX_ASPECT, unsupported colour mode, caption not UTF-8, unreadable, over
  MAX_CAPTION_BYTES or holding NUL bytes, a name that is not UTF-8, a broken link or a link loop)
  instead of failing a training run hours later. Unreadable folders, folders whose name is not
  UTF-8, links to folders (not followed) and stylelora run folders are reported the same way,
  one line per folder.
- Randomness (crops, flips, caption shuffle/dropout) comes only from a random.Random seeded with
  (seed, epoch, sample index), and batch order from (seed, epoch): a resumed run replays the
  exact samples and batches of an uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import stat
import struct
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

IMAGE_EXTS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
METADATA = "metadata.jsonl"
MAX_PIXELS = 64_000_000  # below PIL's own bomb limit (~89 MP), so we decide first, per file
MIN_SIDE = 8
# Longest side / shortest side. Buckets stop at 2:1, so a 500:1 strip would be upscaled to cover
# a bucket (a 64-MP 8,000,000x8 PNG compresses to kilobytes and becomes gigapixels) only to keep
# a sliver of it: refuse it at discovery instead.
MAX_ASPECT = 8
# Modes load_image turns into RGB; anything else (e.g. LAB) is skipped at discovery.
MODES = frozenset("1 L LA P PA RGB RGBA RGBa RGBX CMYK YCbCr HSV I I;16 I;16B I;16L I;16N F".split())
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})
_REPEAT_DIR = re.compile(r"(\d+)_(.+)")
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the stored image is rotated a quarter turn
# Largest caption (caption file, or a metadata.jsonl "text" field, in UTF-8 bytes). CLIP reads 77
# tokens (a few hundred bytes), so 64 KiB is generous for any real caption; bigger ones are skipped
# before they are read: the tokenizer runs out of memory (a 100 MB caption aborted the process).
MAX_CAPTION_BYTES = 64 * 1024
# A metadata.jsonl line longer than this (characters) cannot hold a caption under the cap, even
# with every character JSON-escaped; it is refused before it is parsed.
_MAX_METADATA_LINE = 8 * MAX_CAPTION_BYTES
# Run folders: train writes `<out>.run/` (or --run-dir) with loss.csv starting with this header,
# samples/ and checkpoints/. A folder holding RUN_MARKER is one too, whatever its name.
RUN_MARKER = ".stylelora-run"
_LOSS_HEADER = b"step,loss,lr"


@dataclass(frozen=True)
class Item:
    """One usable image found by `discover`."""

    path: Path                  # root / rel
    rel: str                    # posix path relative to root: sort key and the name in reports
    caption: str                # raw, stripped; CaptionProcessor adds trigger/shuffle/dropout
    caption_source: str | None  # "a.txt", "metadata.jsonl", or None when there is no caption
    repeats: int
    size: tuple[int, int]       # (w, h) as load_image returns it, i.e. after EXIF orientation


class _Skip(Exception):
    """A file is unusable; the message is the reason shown to the user."""


# ----------------------------------------------------------------------------- discovery

def discover(root: str | os.PathLike, caption_ext: str = ".txt",
             mask_dir: str | os.PathLike | None = None) -> tuple[list[Item], list[tuple[Path, str]]]:
    """Usable images under `root` (sorted by relative path) and the (path, reason) of skipped ones.
    Masks are not training images: `mask_dir` (masked loss on) is skipped when it lies inside root,
    and so is root/masks when every image in it mirrors one outside it (masks for a later run)."""
    root = Path(root)
    if not caption_ext.startswith(".") or caption_ext.lower() in IMAGE_EXTS:
        raise ValueError(f"caption_ext must be a non-image extension starting with a dot, got {caption_ext!r}: "
                         "try '.txt'")
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist: check the path (it should hold images "
                                f"with same-stem {caption_ext} captions)")
    if not root.is_dir():
        raise ValueError(f"dataset {root} is a file, not a folder: pass the folder that holds the images")
    meta = _read_metadata(root / METADATA)
    items, skipped = [], []
    rels = _without_masks(root, _image_files(root, skipped), mask_dir, skipped)
    for rel in rels:
        path = root / rel
        try:
            size = _probe(path)
            caption, source = _caption(path, rel, meta, caption_ext)
        except _Skip as e:
            skipped.append((path, str(e)))
            continue
        items.append(Item(path, rel, caption, source, _repeats(rel), size))
    known = set(rels)
    skipped += [(root / _printable(name), f"named on {METADATA} line {line} but not found among the images; fix "
                                          "its file_name (relative to the dataset folder)")
                for name, (_, line, _) in meta.items() if name not in known]
    if not items:
        if not skipped:
            raise ValueError(f"no images in {root} (looked recursively for {', '.join(IMAGE_EXTS)}): add images "
                             f"with same-stem {caption_ext} captions")
        why = _first([f"{p.name}: {r.split(';')[0]}" for p, r in skipped])
        raise ValueError(f"no usable image in {root}: {len(skipped)} file(s) skipped ({why}); fix or replace them")
    return items, skipped


def _without_masks(root: Path, rels: list[str], mask_dir: str | os.PathLike | None,
                   skipped: list[tuple[Path, str]]) -> list[str]:
    """`rels` without the images of mask folders inside root, each folder one line in `skipped`: the
    masked loss's `mask_dir`, and root/masks when every image in it mirrors one outside it (masks
    kept for a masked run, or for another mask_dir's run)."""
    if mask_dir is not None:
        rels = _leave_out(root, rels, Path(mask_dir), skipped, mirrors_only=False)
    return _leave_out(root, rels, root / MASK_DIR, skipped, mirrors_only=True)


def _leave_out(root: Path, rels: list[str], folder: Path, skipped: list[tuple[Path, str]],
               mirrors_only: bool) -> list[str]:
    try:
        prefix = folder.resolve().relative_to(root.resolve()).as_posix() + "/"
    except (ValueError, OSError):  # outside the dataset: nothing to leave out
        return rels
    if prefix == "./":
        raise ValueError(f"the mask folder {folder} is the dataset folder itself: put the masks in a folder of "
                         f"their own (the default is {root / MASK_DIR})")
    masks = [r for r in rels if r.startswith(prefix)]
    rest = [r for r in rels if not r.startswith(prefix)]
    if not masks:
        return rels
    if mirrors_only:
        stems = {os.path.splitext(r)[0] for r in rest}
        if not all(os.path.splitext(r[len(prefix):])[0] in stems for r in masks):
            return rels
        why = ("a mask folder (each image in it has a same-stem image in the dataset), not training data; "
               "masks are used with masked_loss (--masked-loss)")
    else:
        why = "the mask folder of the masked loss, not training data"
    skipped.append((root / prefix.rstrip("/"), why))
    return rest


def _image_files(root: Path, skipped: list[tuple[Path, str]] | None = None) -> list[str]:
    """Relative posix paths of the image files under root, sorted. Folders that cannot be listed,
    run folders, links to folders and names that are not UTF-8 go to `skipped`, one line each
    (os.walk would otherwise drop them, or pass on names nothing downstream can print)."""
    skipped = [] if skipped is None else skipped

    def unreadable(e: OSError) -> None:
        folder = Path(_printable(os.fspath(e.filename)))
        skipped.append((folder, f"folder not readable ({e.strerror}); fix its permissions (chmod +rx) or move it "
                                "out of the dataset"))

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        keep = []
        for d in dirnames:
            if d.startswith("."):  # .git, .ipynb_checkpoints, ...
                continue
            path = Path(dirpath, d)
            if not _utf8(d):
                skipped.append((Path(dirpath, _printable(d)), f"folder name is not UTF-8 ({os.fsencode(d)!r}); "
                                                              "rename it with UTF-8 characters to train its images"))
            elif path.is_symlink():  # os.walk does not follow it; say so instead of dropping it quietly
                skipped.append((path, "a link to a folder: links to folders are not followed (they can loop or "
                                      "lead out of the dataset); move or copy the images into the dataset"))
            elif _is_run_folder(path):
                skipped.append((path, "a stylelora run folder (loss curve, sample grids, checkpoints), not "
                                      "training data: not searched. Keep runs out of the dataset (--out or "
                                      "--run-dir elsewhere)"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTS:
                continue
            if not _utf8(f):
                skipped.append((Path(dirpath, _printable(f)), f"file name is not UTF-8 ({os.fsencode(f)!r}); "
                                                              "rename it with UTF-8 characters to train it"))
                continue
            found.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(found)


def _utf8(name: str) -> bool:
    """False for names os.listdir could only decode with surrogate escapes (bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """`name` with whatever UTF-8 cannot encode (escaped bytes of a non-UTF-8 file name, a lone
    surrogate from JSON) shown as backslash escapes, so that printing a report never fails."""
    if _utf8(name):
        return name
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_run_folder(path: Path) -> bool:
    """A folder `train` writes into: <out>.run (named so, holding its loss log, samples or
    checkpoints), any folder whose loss.csv has train's header next to samples/ or checkpoints/,
    or any folder holding RUN_MARKER."""
    try:
        if (path / RUN_MARKER).exists():
            return True
        outputs = (path / "samples").is_dir() or (path / "checkpoints").is_dir()
        loss = path / "loss.csv"
        if path.name.lower().endswith(".run") and (outputs or loss.is_file()):
            return True
        if outputs and loss.is_file():
            with open(loss, "rb") as f:
                return f.read(len(_LOSS_HEADER)) == _LOSS_HEADER
    except OSError:  # unreadable: os.walk reports it when it tries to list it
        pass
    return False


def _metadata_lines(path: Path) -> Iterator[str]:
    """The lines of metadata.jsonl, read one at a time (so a huge file is never held whole) and each
    at most _MAX_METADATA_LINE characters: a longer line cannot hold a caption under the cap."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            n = 0
            while line := f.readline(_MAX_METADATA_LINE + 1):
                n += 1
                if len(line) > _MAX_METADATA_LINE:
                    raise ValueError(f"{path} line {n} is over {_MAX_METADATA_LINE} characters, more than a caption "
                                     f"of at most MAX_CAPTION_BYTES = {MAX_CAPTION_BYTES} bytes needs: shorten "
                                     "its text (one line of tags per image)")
                yield line
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8; re-save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{path} is not readable ({e.strerror}); fix its permissions (chmod +r)") from None


def _read_metadata(path: Path) -> dict[str, tuple[str, int, str | None]]:
    """file_name -> (caption, line number, why the caption is unusable or None) from a
    diffusers-style metadata.jsonl, if there is one. An unusable caption (over MAX_CAPTION_BYTES,
    NUL bytes, not encodable) skips its image; a malformed line refuses the whole file."""
    if not path.is_file():
        return {}
    out: dict[str, tuple[str, int, str | None]] = {}
    for n, line in enumerate(_metadata_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}): write one object per line, "
                             'like {"file_name": "a.png", "text": "a caption"}') from None
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("file_name", "text"))):
            raise ValueError(f'{path} line {n} needs string fields "file_name" and "text", '
                             'like {"file_name": "a.png", "text": "a caption"}')
        name = PurePosixPath(row["file_name"].replace("\\", "/")).as_posix()
        if name in out:
            raise ValueError(f"{path} line {n}: {name!r} already has a caption on line {out[name][1]}; keep one")
        text = row["text"]
        where = f"the caption on {METADATA} line {n}"
        try:
            problem = _caption_problem(text.encode("utf-8"), where)
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"), which JSON allows
            problem = (f"{where} holds {text[e.start:e.end].encode('unicode_escape').decode()}, which is not a "
                       "character (a lone surrogate); fix the text")
        out[name] = ("" if problem else text.strip(), n, problem)
    return out


def _too_long(what: str, size: int | str) -> str:
    return (f"{what} is {size} bytes, over MAX_CAPTION_BYTES = {MAX_CAPTION_BYTES}; a caption is a line of tags "
            "that the text encoder reads 77 tokens of: shorten it")


def _caption_problem(data: bytes, what: str) -> str | None:
    """Why caption bytes cannot train (over MAX_CAPTION_BYTES, NUL bytes), or None."""
    if len(data) > MAX_CAPTION_BYTES:
        return _too_long(what, len(data))
    if b"\0" in data:
        # Text never holds NUL: this is UTF-16 without a BOM, a binary file or a damaged one. Not
        # stripped: stripping makes ASCII UTF-16 readable but garbles everything else silently.
        return f"{what} holds NUL bytes (UTF-16, or not text?); re-save it as UTF-8 text"
    return None


def _probe(path: Path) -> tuple[int, int]:
    """Decode the image once; return its (w, h) after EXIF orientation, or raise _Skip(reason)."""
    try:
        st = path.stat()
    except OSError as e:
        if path.is_symlink():
            try:
                target = repr(_printable(os.readlink(path)))
            except OSError:
                target = "?"
            if e.errno == errno.ELOOP:
                raise _Skip(f"a link loop (it points to {target}, which never reaches a file); fix or delete "
                            "the link") from None
            if isinstance(e, FileNotFoundError):
                raise _Skip(f"a broken link: its target {target} does not exist; fix or delete the link") from None
        raise _Skip(f"not readable ({e.strerror}); fix its permissions (chmod +r) or delete it") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block Image.open forever
        raise _Skip("not a regular file (a pipe, socket or device); delete it or replace it with the image")
    if st.st_size == 0:
        raise _Skip("empty file (0 bytes); export the image again or delete it")
    try:
        # PIL warns (and later raises) for huge images; make the warning an error for this call
        # only, so the limit never depends on (or changes) the process-wide filter state.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise _Skip(f"too large: {w}x{h} is over the {MAX_PIXELS / 1e6:.0f}-megapixel limit "
                                "(possible decompression bomb); downscale it")
                if min(w, h) < MIN_SIDE:
                    raise _Skip(f"too small: {w}x{h}, need at least {MIN_SIDE} px per side; use a larger image")
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise _Skip(f"too elongated: {w}x{h} is more than {MAX_ASPECT}:1, and a training crop "
                                "would keep only a sliver of it; crop it into less elongated pieces")
                if im.mode not in MODES:
                    raise _Skip(f"colour mode {im.mode} is not supported; convert it to RGB")
                # JPEG: decode at 1/8 scale. Every byte is still read, so truncation still shows.
                im.draft(im.mode, (w // 8, h // 8))
                im.load()
                quarter_turn = im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Skip(f"too large (possible decompression bomb: {e}); downscale it") from None
    except UnidentifiedImageError:
        raise _Skip("not an image PIL can read (wrong extension or not an image); delete or convert it") from None
    except PermissionError as e:
        raise _Skip(f"not readable ({e.strerror}); fix its permissions (chmod +r) or delete it") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise _Skip(f"truncated or corrupt image ({e}); export it again or delete it") from None
    return (h, w) if quarter_turn else (w, h)


def _caption(path: Path, rel: str, meta: dict[str, tuple[str, int, str | None]],
             caption_ext: str) -> tuple[str, str | None]:
    if rel in meta:
        caption, _, problem = meta[rel]
        if problem:
            raise _Skip(problem)
        return caption, METADATA
    txt = path.with_suffix(caption_ext)
    if not txt.is_file():
        return "", None
    try:
        what = f"caption {txt.name}"
        if (size := txt.stat().st_size) > MAX_CAPTION_BYTES:  # decided by size: a 500 MB caption is never read
            raise _Skip(_too_long(what, size))
        with open(txt, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)  # bounded: the file may have grown since stat
        if len(data) > MAX_CAPTION_BYTES:
            raise _Skip(_too_long(what, f"at least {len(data)}"))
        text = data.decode("utf-8-sig")  # first: UTF-16 with a BOM is "not UTF-8", not "NUL bytes"
        if problem := _caption_problem(data, what):
            raise _Skip(problem)
        return text.strip(), txt.name
    except UnicodeDecodeError:
        raise _Skip(f"caption {txt.name} is not UTF-8; re-save it as UTF-8") from None
    except OSError as e:  # e.g. permission denied: skip the pair rather than train it uncaptioned
        raise _Skip(f"caption {txt.name} is not readable ({e.strerror}); fix its permissions (chmod +r)") from None


def _repeats(rel: str) -> int:
    parts = PurePosixPath(rel).parts
    m = _REPEAT_DIR.fullmatch(parts[0]) if len(parts) > 1 else None
    return max(1, int(m.group(1))) if m else 1


def format_report(items: list[Item], skipped: list[tuple[Path, str]]) -> str:
    """One line per skipped file, warnings, then '37 images (2 folders, 112 samples with repeats), 3 skipped'."""
    lines = [f"skipped {path}: {reason}" for path, reason in skipped]
    missing = [it.rel for it in items if it.caption_source is None]
    if missing:
        lines.append(f"warning: {_plural(len(missing), 'image')} without a caption train with an empty caption "
                     f"({_first(missing)}); add same-stem caption files or {METADATA} lines")
    blank = [caption_file(it) for it in items if it.caption_source is not None and not it.caption]
    if blank:
        lines.append(f"warning: {_plural(len(blank), 'caption')} {'is' if len(blank) == 1 else 'are'} empty "
                     f"({_first(blank)}), so {'its image trains' if len(blank) == 1 else 'their images train'} "
                     "with an empty caption; write the captions")
    nested = sorted({"/".join(PurePosixPath(it.rel).parts[:i + 1]) for it in items
                     for i, part in enumerate(PurePosixPath(it.rel).parts[1:-1], 1) if _REPEAT_DIR.fullmatch(part)})
    if nested:
        lines.append(f"warning: repeats folders below the top level set no count ({_first(nested)}): only a "
                     "folder directly in the dataset folder sets repeats, for every image below it; move "
                     "the folder up a level if it needs its own count")
    stems = defaultdict(list)  # same stem, same folder, one caption file (or none) between them
    for it in items:
        if it.caption_source != METADATA:
            stems[os.path.splitext(it.rel)[0]].append(it.rel)
    shared = [" + ".join(v) for v in stems.values() if len(v) > 1]
    if shared:
        lines.append(f"warning: images sharing a stem share one caption ({_first(shared)}); "
                     "rename them if they need different captions")
    folders = len({PurePosixPath(it.rel).parent for it in items})
    samples = sum(it.repeats for it in items)
    lines.append(f"{_plural(len(items), 'image')} ({_plural(folders, 'folder')}, "
                 f"{_plural(samples, 'sample')} with repeats), {len(skipped)} skipped")
    return "\n".join(lines)


def caption_file(it: Item) -> str:
    """Where an item's caption comes from, relative to the dataset: 'sub/a.txt' or 'metadata.jsonl (sub/a.png)'."""
    if it.caption_source == METADATA:
        return f"{METADATA} ({it.rel})"
    return str(PurePosixPath(it.rel).with_name(it.caption_source or "-"))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _first(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


# ----------------------------------------------------------------------------- images

def load_image(path: str | os.PathLike) -> Image.Image:
    """The image as 8-bit RGB, upright (EXIF orientation applied); animations give their first frame."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read image {path} ({e}); export it again or delete it") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on white, 16-bit/32-bit/float scaled to 8 bits."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(im), im.mode), "L").convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:  # tRNS colour keys too (P, L, RGB)
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if im.mode not in MODES:
        raise ValueError(f"colour mode {im.mode} is not supported; convert the image to RGB")
    return im.convert("RGB")  # also a copy for RGB, so callers never share the file's buffer


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):  # the mode says 16 bits: keep the top 8, however dark the image is
        return (a.astype(np.uint32) >> 8).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    peak = float(a.max(initial=0))
    if mode == "F" and peak <= 1.0:  # float images are usually 0..1
        return np.rint(a * 255).astype(np.uint8)
    # "I" does not say its depth: take the smallest of 8/16/32 bits that holds the data.
    bits = 8 if peak < 2**8 else 16 if peak < 2**16 else 32
    return np.floor(a / 2 ** (bits - 8)).clip(max=255).astype(np.uint8)


def crop_geometry(size: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None = None,
                  random_crop: bool = False, flip: bool = False) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """How fit_to_bucket maps an image of `size` (w, h) into `bucket` (w, h): the resized size that
    covers the bucket, the crop's (left, top) in it, and whether it is mirrored. Draws from `rng`
    in a fixed order (crop, then flip), so geometry and pixels agree for one seed."""
    bw, bh = bucket
    w, h = size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (random_crop or flip) and rng is None:
        raise ValueError("random_crop/flip need an rng: pass random.Random(seed)")
    if random_crop:
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
    else:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    return (nw, nh), (left, top), bool(flip and rng.random() < 0.5)


def fit_to_bucket(img: Image.Image, size: tuple[int, int], rng: random.Random | None = None,
                  random_crop: bool = False, flip: bool = False) -> Image.Image:
    """Resize (keeping aspect) to cover `size`, crop to it (centre or random), maybe mirror."""
    return apply_crop(img, size, crop_geometry(img.size, size, rng, random_crop, flip))


def apply_crop(img: Image.Image, size: tuple[int, int], geometry, mask: bool = False) -> Image.Image:
    """`img` resized, cropped to `size` (w, h) and mirrored as `geometry` (crop_geometry's) says: one
    geometry serves an image and its mask, so the two stay aligned pixel for pixel. Images: Lanczos
    for downscaling (sharp, no aliasing), bicubic for enlarging (rings less). Masks: area average for
    downscaling, bilinear for enlarging: neither rings, so black stays exactly 0 away from an edge."""
    (nw, nh), (left, top), flipped = geometry
    if (nw, nh) != img.size:
        down = max(size[0] / img.size[0], size[1] / img.size[1]) < 1
        if mask:
            resample = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
        else:
            resample = Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC
        img = img.resize((nw, nh), resample)
    img = img.crop((left, top, left + size[0], top + size[1]))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else img


def micro_conditioning(size: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None = None,
                       random_crop: bool = False, flip: bool = False) -> list[int]:
    """SDXL's add_time_ids for one training image: original (h, w), the crop's (top, left) in the
    resized image, and the target (h, w). A mirrored crop reports the mirrored crop's left edge."""
    (nw, _), (left, top), flipped = crop_geometry(size, bucket, rng, random_crop, flip)
    if flipped:
        left = nw - left - bucket[0]
    return [size[1], size[0], top, left, bucket[1], bucket[0]]


# ----------------------------------------------------------------------------- masks
#
# Masked loss (kohya's --masked_loss and alpha_mask): a gray mask per image weights the diffusion
# loss per latent pixel, white = learn, black = ignore, gray in between. A mask comes from a file in
# the mask folder at the image's relative path and stem (any image type: masks/sub/a.png for
# sub/a.jpg), else from the image's alpha channel; an image with neither is an error (as kohya's
# mask folder is: training it whole would teach exactly what its mask was meant to hide).

MASK_DIR = "masks"  # the default mask folder, directly in the dataset
ALPHA = "alpha"  # a mask source: the image's own alpha channel


def load_mask(path: str | os.PathLike, like: Item | None = None) -> Image.Image:
    """A mask file as 8-bit gray ("L"), upright: its gray level (luminance for a colour file; 16-bit
    and float scaled as images are; its own transparency ignored). With `like` (the image it masks),
    a mask of another size is refused, naming both files, before it is decoded."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            if like is not None:
                w, h = im.size
                size = (h, w) if im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)
                if size != like.size:  # _Skip: passes the decoding errors' handler below
                    raise _Skip(f"mask {path} is {size[0]}x{size[1]} but its image {like.path} is "
                                f"{like.size[0]}x{like.size[1]}: a mask must have its image's size; resize it to match")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                return Image.fromarray(_to_8bit(np.asarray(im), im.mode), "L")
            return im.convert("L")
    except _Skip as e:
        raise ValueError(str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ValueError(f"cannot read mask {path} ({e}); save it again as a grayscale PNG (white = learn, "
                         "black = ignore)") from None


def load_alpha(path: str | os.PathLike) -> Image.Image | None:
    """The image's alpha channel (alpha modes and tRNS transparency) as "L", upright; None without one."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
                return None
            return ImageOps.exif_transpose(im).convert("RGBA").getchannel("A")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ValueError(f"cannot read image {path} ({e}); export it again or delete it") from None


def find_masks(items: list[Item], mask_dir: Path) -> tuple[list[Path | str], list[str]]:
    """Each item's mask source (its file in mask_dir, or ALPHA) and report lines: a count, and
    warnings for all-black masks (they teach nothing) and mask files that match no image. Every
    mask is decoded once here, so a bad one fails now, naming itself, not hours into a run."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    if mask_dir.is_dir():
        for rel in _image_files(mask_dir):
            by_stem[os.path.splitext(rel)[0]].append(mask_dir / rel)
    sources, missing, black, used = [], [], [], set()
    for it in items:
        stem = os.path.splitext(it.rel)[0]
        found = by_stem.get(stem, [])
        if len(found) > 1:
            raise ValueError(f"several masks for {it.path}: {', '.join(map(str, found))}; keep one")
        mask = load_mask(found[0], like=it) if found else load_alpha(it.path)
        if mask is None:
            missing.append(it.rel)
            continue
        used.add(stem)
        sources.append(found[0] if found else ALPHA)
        if mask.getextrema()[1] == 0:
            black.append(str(found[0]) if found else f"{it.path} (alpha channel)")
    if missing:
        example = mask_dir / (os.path.splitext(missing[0])[0] + ".png")
        has = "has" if len(missing) == 1 else "have"
        raise ValueError(f"masked loss is on, but {_plural(len(missing), 'image')} {has} no mask "
                         f"({_first(missing)}): add a grayscale mask (white = learn, black = ignore) of "
                         f"the same size at the same relative path in {mask_dir} (e.g. {example}"
                         f"{'' if mask_dir.is_dir() else ', a folder that does not exist yet'}), or save the image "
                         "with transparency; or turn masked_loss (--masked-loss) off")
    return sources, _mask_notes(sources, mask_dir, black, [str(p) for s in sorted(set(by_stem) - used)
                                                           for p in by_stem[s]])


def _mask_notes(sources: list[Path | str], mask_dir: Path, black: list[str], unused: list[str]) -> list[str]:
    files = sum(s != ALPHA for s in sources)
    lines = [f"masked loss: {_plural(files, 'mask file')} (in {mask_dir}), "
             f"{_plural(len(sources) - files, 'alpha channel')}"]
    if black:
        lines.append(f"warning: {_plural(len(black), 'mask')} {'is' if len(black) == 1 else 'are'} all black, so "
                     f"{'its image teaches' if len(black) == 1 else 'their images teach'} nothing ({_first(black)}); "
                     "paint what to learn white, or remove the image")
    if unused:
        lines.append(f"warning: {_plural(len(unused), 'mask')} in {mask_dir} match{'es' if len(unused) == 1 else ''} "
                     f"no image ({_first(unused)}); give each mask its image's relative path and stem")
    return lines


# ----------------------------------------------------------------------------- captions

def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped ("a, , b," -> ["a", "b"])."""
    return [t for t in (t.strip() for t in caption.split(",")) if t]


@dataclass(frozen=True)
class CaptionProcessor:
    """Per-sample caption: trigger first, optional tag shuffle, optional dropout to ""."""

    trigger: str | None = None  # may itself be several tags: "neon, outline"
    shuffle: bool = False
    keep_tokens: int = 0        # with shuffle: the first N tags of the caption as written stay put
    dropout: float = 0.0        # probability of training on the empty (unconditional) caption

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if not 0.0 <= self.dropout < 1.0:  # 1 would train on no caption at all
            raise ValueError(f"caption dropout must be in [0, 1), got {self.dropout}: try 0.05")

    @property
    def cacheable(self) -> bool:
        # Without shuffle a sample's caption is one of two strings (its own, or "" when dropped),
        # so text embeddings cached by caption string stay exact; shuffle makes too many strings.
        return not self.shuffle

    def __call__(self, caption: str, rng: random.Random) -> str:
        if self.dropout and rng.random() < self.dropout:
            return ""
        tags = split_tags(caption)
        # Trigger tags the caption lacks go in front and are always kept: keep_tokens counts
        # from the caption as written, so it means the same with or without a trigger.
        added = list(dict.fromkeys(t for t in split_tags(self.trigger or "") if t not in tags))  # each once
        keep = len(added) + self.keep_tokens
        tags = added + tags
        if self.shuffle:
            tail = tags[keep:]
            rng.shuffle(tail)
            tags = tags[:keep] + tail
        return ", ".join(tags)


# ----------------------------------------------------------------------------- buckets

def make_buckets(resolution: int, step: int = 8, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) buckets of area ~resolution**2 with sides multiples of `step`, sorted by aspect w/h."""
    if step <= 0 or resolution <= 0 or resolution % step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the bucket step {step}: "
                         f"try {max(step, round(resolution / max(step, 1)) * step)}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}: try 2.0")
    area = resolution * resolution
    found = set()
    for short in range(step, resolution + 1, step):
        long = max(step, round(area / short / step) * step)
        # The area check matters for coarse steps, where rounding can miss the target by far.
        if long / short <= max_ratio + 1e-9 and abs(short * long - area) <= 0.15 * area:
            found |= {(short, long), (long, short)}
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def assign_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest log-aspect ratio (so 1:2 and 2:1 are equally far from 1:1)."""
    if w <= 0 or h <= 0 or not buckets:
        raise ValueError(f"need a positive image size and at least one bucket, got {w}x{h} and {buckets}")
    target = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


# ----------------------------------------------------------------------------- dataset

class CaptionFolder(Dataset):
    """Samples {"pixel_values", "caption", "index", "bucket"} from a folder (see the module docstring),
    and with `masks` a "mask" per sample: its image's mask (see find_masks) under the same crop."""

    def __init__(self, root: str | os.PathLike, resolution: int = 64, caption_ext: str = ".txt",
                 captions: CaptionProcessor = CaptionProcessor(), bucket: bool = True, bucket_step: int = 8,
                 random_crop: bool = False, flip: bool = False, seed: int = 0, masks: bool = False,
                 mask_dir: str | os.PathLike | None = None):
        self.root = Path(root)
        if mask_dir is not None and not masks:
            raise ValueError(f"a mask folder ({mask_dir}) is given but masks are off: turn masked_loss on")
        self.mask_dir = (Path(mask_dir) if mask_dir is not None else self.root / MASK_DIR) if masks else None
        if mask_dir is not None and not Path(mask_dir).is_dir():
            raise FileNotFoundError(f"mask folder {mask_dir} does not exist: check the path (it should hold a "
                                    "grayscale mask per image, at the image's relative path and stem)")
        self.items, self.skipped = discover(self.root, caption_ext, self.mask_dir)
        # An image's mask: its file, or ALPHA (the image's alpha channel). Report lines for the masks.
        self.mask_sources, self.mask_notes = find_masks(self.items, self.mask_dir) if masks else ([], [])
        self.captions = captions  # frozen, so the shared default instance is safe
        self.buckets = make_buckets(resolution, bucket_step)  # validates resolution even without buckets
        if not bucket:
            self.buckets = [(resolution, resolution)]
        self._item_bucket = [assign_bucket(*it.size, self.buckets) for it in self.items]
        self._samples = [k for k, it in enumerate(self.items) for _ in range(it.repeats)]  # sample -> item
        self.random_crop, self.flip, self.seed = random_crop, flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> dict:
        return self.sample(i)

    def sample(self, i: int, pixels: bool = True) -> dict:
        """Sample i this epoch. pixels=False skips decoding the image (the trainer's latent cache
        already holds it); "item" names the image, shared by all repeats of it."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: the dataset has {len(self)} samples")
        k = self._samples[i]
        bucket = self._item_bucket[k]
        # Separate streams, so turning flips on does not change which captions get shuffled how.
        cap_rng = random.Random(f"{self.seed}/{self.epoch}/{i}/caption")
        out = {"caption": self.captions(self.items[k].caption, cap_rng), "index": i, "item": k, "bucket": bucket}
        pix_seed = f"{self.seed}/{self.epoch}/{i}/pixels"
        out["time_ids"] = micro_conditioning(self.items[k].size, bucket, random.Random(pix_seed), self.random_crop,
                                             self.flip)
        if pixels:
            img = load_image(self.items[k].path)
            geometry = crop_geometry(img.size, bucket, random.Random(pix_seed), self.random_crop, self.flip)
            img = apply_crop(img, bucket, geometry)
            out["pixel_values"] = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
            if self.mask_dir is not None:  # the same crop as the image: the mask stays on its pixels
                mask = apply_crop(self.load_mask(k), bucket, geometry, mask=True)
                out["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 255.0  # (1, H, W)
        return out

    def load_mask(self, k: int) -> Image.Image:
        """Image k's mask, "L", at the image's size (checked again: the files may have changed)."""
        source = self.mask_sources[k]
        return load_alpha(self.items[k].path) if source == ALPHA else load_mask(source, like=self.items[k])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_of(self, i: int) -> int:
        """The image behind sample i (repeats of one image share it)."""
        return self._samples[i]

    def bucket_of(self, i: int) -> tuple[int, int]:
        return self._item_bucket[self._samples[i]]

    @property
    def n_images(self) -> int:
        return len(self.items)

    @property
    def deterministic_pixels(self) -> bool:
        """Same pixels for a sample in every epoch: latents may be cached."""
        return not (self.random_crop or self.flip)

    @property
    def cacheable_captions(self) -> bool:
        """Each sample's caption is one of a few fixed strings: text embeddings may be cached by string."""
        return self.captions.cacheable

    @property
    def report(self) -> str:
        counts = Counter(self.bucket_of(i) for i in range(len(self)))
        return "\n".join([format_report(self.items, self.skipped), *self.mask_notes]) + "\nbuckets: " + ", ".join(
            f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items()))

    def summary(self) -> dict:
        """For adapter metadata: counts only, no local paths."""
        return {"n_images": len(self.items), "n_samples": len(self), "n_skipped": len(self.skipped),
                "folders": len({PurePosixPath(it.rel).parent for it in self.items})}

    def fingerprint(self, masks: bool = True) -> str:
        """Short id of the data as found: names, repeats, captions, sizes in pixels and bytes, and (masks)
        which masks it trains with."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.rel}\t{it.repeats}\t{it.caption}\t{it.size}\t{it.path.stat().st_size}\n".encode())
        for source in self.mask_sources if masks else ():  # masks on: which masks, by name and size in bytes
            mask = "alpha" if source == ALPHA else f"{source.relative_to(self.mask_dir)}\t{source.stat().st_size}"
            h.update(f"mask\t{mask}\n".encode())
        return h.hexdigest()[:16]

    def caption_for_sampling(self, k: int) -> str:
        """Image k's caption with the trigger, never shuffled or dropped: a prompt for samples."""
        return CaptionProcessor(self.captions.trigger)(self.items[k].caption, random.Random(0))

    def long_captions(self, tokenizer) -> list[str]:
        """Warning lines for captions that (trigger included) are longer than the text encoder reads:
        the tokenizer cuts them, so their last tags never train. Empty when all fit."""
        limit = tokenizer.model_max_length
        over = []
        for k, it in enumerate(self.items):
            if it.caption:  # verbose=False: no "longer than the maximum" log line per caption
                n = len(tokenizer(self.caption_for_sampling(k), truncation=False, verbose=False).input_ids)
                if n > limit:
                    over.append(f"{caption_file(it)}: {n} tokens")
        if not over:
            return []
        return [f"warning: {_plural(len(over), 'caption')} {'is' if len(over) == 1 else 'are'} longer than the "
                f"text encoder's {limit} tokens and will be truncated ({_first(over)}); shorten "
                f"{'it' if len(over) == 1 else 'them'} or move the important tags to the front"]

    def guess_triggers(self) -> list[str]:
        """Tags every captioned image shares at its start ("trigger, caption", kohya's habit) or at
        its end ("caption, trigger", the example datasets' convention), e.g. ["outline"]. When every
        caption is the same, nothing tells trigger from description: no guess (pass --trigger)."""
        tag_lists = [split_tags(it.caption) for it in self.items if it.caption]
        if not tag_lists or all(t == tag_lists[0] for t in tag_lists):
            return []
        found = []
        for lists in (tag_lists, [t[::-1] for t in tag_lists]):  # shared prefix, then shared suffix
            shared = os.path.commonprefix(lists)  # element-wise on lists
            if any(len(t) > len(shared) for t in lists):  # else one caption is all shared: no trigger
                found += shared if lists is tag_lists else shared[::-1]
        return list(dict.fromkeys(found))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of sample indices from one bucket each; the order is a pure function of (seed, epoch)."""

    def __init__(self, dataset: CaptionFolder, batch_size: int, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(len(dataset)):
            groups[dataset.bucket_of(i)].append(i)
        self._groups = [groups[b] for b in sorted(groups)]
        self._cached: tuple[int, list[list[int]]] | None = None
        if not self.batches(0):
            sizes = ", ".join(str(len(g)) for g in self._groups)
            raise ValueError(f"drop_last with batch_size {batch_size} leaves no batch (bucket sizes: {sizes}): "
                             "lower batch_size or use drop_last=False")

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, in order. The trainer calls this per step, so the last epoch is cached."""
        if self._cached is None or self._cached[0] != epoch:
            rng = random.Random(f"{self.seed}/{epoch}/batches")
            out = []
            for group in self._groups:
                idx = group[:]
                rng.shuffle(idx)
                out += [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)
                        if not self.drop_last or s + self.batch_size <= len(idx)]
            rng.shuffle(out)  # mix buckets, so a run does not see all wide images in a row
            self._cached = (epoch, out)
        return [b[:] for b in self._cached[1]]  # copies: callers may mutate, the cache stays right

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
