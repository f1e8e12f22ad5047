"""stylelora's web UI: Generate (per-adapter sliders, stacking, strength sweep), Train (dataset,
captions, live progress) and Adapters (inspect, convert, merge, delete, upload).

Thin on purpose: every action is a call into stylelora (load_base, AdapterStack, train, discover,
load_adapter/save_adapter); this file maps widgets to arguments and back.

Design notes
- One base pipe and one AdapterStack per app, loaded once: sliders and adapter changes never
  reload the base. Each request hands AdapterStack.generate its complete set of scales (adapters
  it does not name are off for that call); the stack applies them and generates under its own
  lock, so sessions generating at once never see each other's sliders.
- Adapter rows are MAX_SLOTS fixed slots, shown or hidden, rather than @gr.render: the generate
  endpoint keeps one signature (gradio_client and the tests call it), and a refresh keeps the
  sliders of adapters still present. Each slot carries its adapter's name in a hidden textbox, so
  a request names its adapters even if the folder changed since the page was drawn. Adapters
  past the slots are reachable with `<lora:name:weight>` (or A1111's `<lora:name:te:unet>`) in the prompt.
- Training runs in a background thread with its own pipe (train() loads it) and the page polls it
  with a gr.Timer. One training at a time per app: the machines this targets have few cores.
- No adapter or dataset name is in the built app: the page's load event fills the lists (gradio
  serves the app's API description, choices and defaults included, before --auth's login).
- Browser input never becomes a path by itself: names must match NAME_RE and resolve inside the
  configured folders; uploads are size-limited, zips unpacked confined, adapters validated.
"""

from __future__ import annotations

import errno
import functools
import html
import os
import random
import re
import secrets
import shutil
import stat
import struct
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, NamedTuple

import gradio as gr

from stylelora.config import MODES, TrainConfig
from stylelora.fileio import write_text
from stylelora.parsing import parse_number_list

MAX_SLOTS = 8
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536))


class Slot(NamedTuple):
    """One adapter row of the Generate tab, declared once. Its fields, in this order, are the row's
    inputs to /generate and /sweep: a record of components in the layout, of values in a request
    (the defaults are a fresh row's values). A new per-adapter control is one field here, its
    widget in _slot_row and its use in StyleloraUI._request."""

    name: Any = ""  # hidden textbox: the adapter's name
    on: Any = False  # checkbox labelled with the name
    strength: Any = 1.0
    unet: Any = 1.0  # × UNet
    te: Any = 1.0  # × text encoder

    SLIDERS = ("strength", "unet", "te")  # what a refresh keeps for an adapter still in its row

    @classmethod
    def split(cls, values) -> list[Slot]:
        """The flat per-slot inputs of an endpoint, one Slot each."""
        n = len(cls._fields)
        return [cls(*values[i : i + n]) for i in range(0, len(values), n)]


@dataclass
class SlotRow:
    """A slot's widgets: its Slot of input components, the group shown or hidden and the trigger
    words button. `outputs` is what StyleloraUI.refresh returns per slot, in this order."""

    group: gr.Group
    inputs: Slot
    add: gr.Button

    @property
    def outputs(self) -> list:
        return [self.group, *self.inputs, self.add]


SLOT_OUTPUTS = len(Slot._fields) + 2  # per slot in StyleloraUI.refresh: group, the fields, trigger button
N_LISTS = MAX_SLOTS * SLOT_OUTPUTS + 3  # outputs of StyleloraUI.refresh: the slots, the note, two pickers
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MB = 2**20
DATASET_EXTS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".txt", ".jsonl")
try:
    from stylelora.data import MAX_CAPTION_BYTES
except ImportError:  # stylelora/data.py gains the same cap (issue 14); until then the UI's own
    MAX_CAPTION_BYTES = 64 * 1024
CAPTION_SHOWN = 500  # characters of one caption the table shows; the rest is cut and marked
MAX_PROMPT_CHARS = 2000  # prompt, negative prompt, sweep strengths, trigger words


def safe_child(folder: Path, name: str, suffix: str = "") -> Path:
    """folder/<name><suffix>; anything but a plain name (no '/', '..', leading dot) is refused."""
    name = str(name or "").strip().removesuffix(suffix)
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable name: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    path = (folder / f"{name}{suffix}").resolve()
    if path.parent != folder.resolve():  # e.g. a symlinked name pointing elsewhere
        raise ValueError(f"{name!r} resolves outside {folder}; refusing it")
    return path


def _shown(path: Path) -> str:
    """A folder as the user named it: relative to the working directory when inside it."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def _short(name: str, keep: int = 80) -> str:
    """A name for a message: whole when short, else its start and end around '…'."""
    return name if len(name) <= keep else f"{name[:keep - 20]}…{name[-19:]}"


def _check_length(**texts: str) -> None:
    """Refuse any text over MAX_PROMPT_CHARS; the keyword names the field ('_' for a space)."""
    for field, text in texts.items():
        if len(text or "") > MAX_PROMPT_CHARS:
            raise ValueError(f"{field.replace('_', ' ')} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")


def _number(value, field: str, kind=float):
    """A number field's value; an emptied field or a non-number is one message naming the field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{field} is empty: type a number in it")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{field} must be a {'whole ' if kind is int else ''}number, "
                         f"not {_short(str(value), 40)!r}") from None


def size_choices(native: int) -> list[str]:
    """SDXL's trained resolutions (1024x1024, 1152x896, ... 640x1536, as SAI's and kohya's bucket lists
    have them), scaled to this base's native side and rounded to multiples of 8, as "WxH" strings."""
    out = []
    for w, h in SDXL_SIZES:
        wh = tuple(max(8, round(v * native / 1024 / 8) * 8) for v in (w, h))
        out.append(f"{wh[0]}x{wh[1]}")
    return list(dict.fromkeys(out))


def _size(size) -> tuple[int, int]:
    """(width, height) from the size control: a number (square, SD 1.x/2.x's slider) or "WxH" (SDXL)."""
    if isinstance(size, str) and "x" in size:
        w, _, h = size.partition("x")
        return _number(w, "size width", int), _number(h, "size height", int)
    side = _number(size, "size", int)
    return side, side


def shown_caption(caption: str) -> str:
    """A caption as the table shows it: at most CAPTION_SHOWN characters, a longer one cut and marked
    (save_captions leaves a cut caption's file alone)."""
    if len(caption) <= CAPTION_SHOWN:
        return caption
    return f"{caption[:CAPTION_SHOWN]}… [cut: {len(caption)} characters in all; edit its file to change it]"


def oversized_captions(folder: Path) -> list[str]:
    """Captions over MAX_CAPTION_BYTES under `folder`, as 'sub/a.txt (N kB)', found without reading
    them: .txt files by size, metadata.jsonl line by line. Hidden folders and files are ignored,
    as stylelora.data.discover ignores them."""
    big = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(f for f in filenames if f.lower().endswith(".txt") and not f.startswith(".")):
            path = Path(dirpath, f)
            try:
                size = path.stat().st_size
            except OSError:  # a dangling link, say: discover reports what it cannot read
                continue
            if size > MAX_CAPTION_BYTES:
                big.append(f"{path.relative_to(folder).as_posix()} ({size // 1024} kB)")
    meta = folder / "metadata.jsonl"
    try:
        if meta.is_file() and meta.stat().st_size > MAX_CAPTION_BYTES:
            with open(meta, "rb") as f:
                big += [f"metadata.jsonl line {n} ({len(line) // 1024} kB)" for n, line in enumerate(f, 1)
                        if len(line) > MAX_CAPTION_BYTES]
    except OSError:  # unreadable: discover says so
        pass
    return big


def _caption_limit(big: list[str]) -> str:
    n = len(big)
    return (f"{n} caption{'s are' if n > 1 else ' is'} over the {MAX_CAPTION_BYTES // 1024} kB caption limit: "
            f"{', '.join(_short(b) for b in big[:3])}{' …' if n > 3 else ''}; shorten "
            f"{'them' if n > 1 else 'it'} (a caption is a line of text)")


def _unpack_error(where: str, member: str, e: OSError) -> ValueError:
    """A clear message for a file an upload could not write: the member's name, never a server path."""
    if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        why = "clashes with another file or folder of the same name in the upload; rename one"
    elif e.errno == errno.ENAMETOOLONG:
        why = f"has a name too long for this server ({len(member.encode())} bytes); shorten it"
    else:
        why = f"could not be written ({e.strerror or type(e).__name__})"
    return ValueError(f"{where}{_short(member)!r} {why}")


def _friendly(fn):
    """User mistakes (ValueError & co, whose messages say what to do) become a gr.Error toast."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            raise gr.Error(str(e)) from None
    return wrapper


def extract_zip(src: Path, dest: Path, budget: list[int], max_files: int = 10_000) -> None:
    """Unpack images/captions of `src` below `dest`. Members with absolute or '..' paths and
    symlinks refuse the whole zip; hidden files and other types are skipped. Sizes are counted as
    bytes are actually written (headers can lie), against budget[0]."""
    try:
        with zipfile.ZipFile(src) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            if len(infos) > max_files:
                raise ValueError(f"{src.name} holds {len(infos)} files, over the limit of {max_files}")
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts or ":" in parts[0]:
                    raise ValueError(f"{src.name}: member {info.filename!r} points outside the archive; "
                                     "refusing this zip")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ValueError(f"{src.name}: member {info.filename!r} is a symlink; refusing this zip")
                if any(p.startswith(".") or p == "__MACOSX" for p in parts) or \
                        not parts[-1].lower().endswith(DATASET_EXTS):
                    continue
                target = dest.joinpath(*parts)
                assert target.resolve().is_relative_to(dest.resolve()), target
                try:
                    _unpack_member(z, info, target, budget, src.name)
                except OSError as e:
                    raise _unpack_error(f"{src.name}: member ", info.filename, e) from None
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as e:  # corrupt, encrypted, odd codec
        raise ValueError(f"{src.name} is not a zip file stylelora can read ({e})") from None


def _unpack_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: list[int],
                   zip_name: str) -> None:
    """One member to `target` (never over an existing file), counting the bytes written against
    budget[0]; a caption stops at MAX_CAPTION_BYTES."""
    caption = target.suffix.lower() == ".txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with z.open(info) as fin, open(target, "xb") as fout:
        written = 0
        while chunk := fin.read(MB):
            budget[0] -= len(chunk)
            written += len(chunk)
            if budget[0] < 0:
                raise ValueError(f"{zip_name} unpacks to more than the upload limit; upload fewer or smaller images")
            if caption and written > MAX_CAPTION_BYTES:
                raise ValueError(f"{zip_name}: caption {_short(info.filename)!r} is over the "
                                 f"{MAX_CAPTION_BYTES // 1024} kB caption limit; shorten it (a caption is a "
                                 "line of text)")
            fout.write(chunk)


class TrainJob:
    """One background training run: the progress the page polls and the flag train() polls."""

    def __init__(self, cfg):
        self.cfg, self.stop = cfg, threading.Event()
        self.rows: list[tuple[int, float]] = []
        self.step, self.sps, self.sample = 0, 0.0, None
        self.state, self.error = "loading the base and data", None
        self.saved: Path | None = None  # the adapter train() wrote: cfg.out, or a free NAME-2 beside it
        self.thread = threading.Thread(target=self._run, name=f"train-{Path(cfg.out).stem}", daemon=True)
        self.thread.start()

    def _log(self, event: dict) -> None:
        self.step = event["step"]
        if "sample" in event:
            self.sample = event["sample"]
        else:
            self.rows.append((event["step"], event["loss"]))
            self.sps, self.state = event["steps_per_s"], "training"

    def _run(self) -> None:
        from stylelora.train import train

        try:
            self.saved = Path(train(self.cfg, on_log=self._log, should_stop=self.stop.is_set))
            self.state = "done" if self.step >= self.cfg.steps else "stopped early (adapter saved)"
            if self.saved != Path(self.cfg.out):  # another write took the name while this run trained
                self.state += (f"; saved as {_shown(self.saved)}: {Path(self.cfg.out).name} was taken "
                               "while it trained")
        except Exception as e:  # noqa: BLE001 -- shown on the page; a thread must not fail silently
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def progress_html(self) -> str:
        c = self.cfg
        loss = f" · loss {self.rows[-1][1]:.4f} · {self.sps:.1f} steps/s" if self.rows else ""
        err = f"<br><b>{html.escape(self.error)}</b>" if self.error else ""  # shown to every session
        return (f"<progress value='{self.step}' max='{c.steps}' style='width:100%'></progress>"
                f"<div id='train-status'>{Path(c.out).stem}: step {self.step}/{c.steps}{loss} — "
                f"{self.state}{err}</div>")


class StyleloraUI:
    """The app's state: folders, the one pipe and AdapterStack, the current training job."""

    def __init__(self, adapters_dir, base=None, *, datasets_dir="datasets", base_config=None,
                 device="cpu", max_adapter_mb=512, max_dataset_mb=512, any_folder=True, enabled=()):
        from stylelora.base import is_xl, load_base, native_size
        from stylelora.blend import AdapterStack

        self.adapters_dir = Path(adapters_dir).expanduser().resolve()
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.datasets_dir = Path(datasets_dir).expanduser().resolve()
        self.base, self.base_config = base, base_config
        self.max_adapter_bytes, self.max_dataset_bytes = int(max_adapter_mb * MB), int(max_dataset_mb * MB)
        # Typing any folder's absolute path to train on: the local user's own files. serve() turns it
        # off when the UI listens beyond this machine, so remote users stay inside datasets_dir.
        self.any_folder = any_folder
        self.enabled = set(enabled)  # adapters whose checkbox starts ticked (make demo: the one it trained)
        self.pipe = load_base(base, config=base_config, device=device)
        # Training runs where the app's model runs (TrainConfig takes a device type, not cuda:N).
        self.device = self.pipe.device.type
        self.stack = AdapterStack(self.pipe)
        self.native = native_size(self.pipe)
        self.xl = is_xl(self.pipe)  # SDXL: the size control lists SDXL's resolutions
        self._lock = threading.Lock()  # adding/removing adapters and files; generation locks the stack
        self._stamps: dict[str, tuple[int, int]] = {}  # name -> (mtime, size) of the loaded file
        self.job: TrainJob | None = None

    # --- adapters folder
    def adapter_names(self) -> list[str]:
        return sorted(p.stem for p in self.adapters_dir.glob("*.safetensors") if NAME_RE.fullmatch(p.stem))

    def adapter_path(self, name: str) -> Path:
        path = safe_child(self.adapters_dir, name, ".safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"no adapter named {name!r} in {self.adapters_dir}; refresh the list")
        return path

    def triggers(self, name: str) -> list[str]:
        """Trigger words from the file's header only (no tensors read)."""
        from safetensors import safe_open

        from stylelora.adapters import Adapter

        try:
            with safe_open(str(self.adapter_path(name)), framework="pt") as f:
                return Adapter(layers={}, metadata=dict(f.metadata() or {})).trigger_words
        except Exception:  # noqa: BLE001 -- an unreadable file shows no triggers; loading it will say why
            return []

    def _load(self, name: str) -> None:
        """(Re)load `name` into the stack at scale 0 if its file is new or changed. Under self._lock."""
        path = self.adapter_path(name)
        st = path.stat()
        if self._stamps.get(name) != (st.st_mtime_ns, st.st_size):
            if name in self.stack.names:
                self.stack.remove(name)
            self.stack.add(name, str(path), scale=0.0)
            self._stamps[name] = (st.st_mtime_ns, st.st_size)

    # --- generate
    def _request(self, prompt: str, slots: tuple) -> tuple[str, dict]:
        """The prompt without `<lora:...>` tags, and {name: (strength, x UNet, x text encoder)} of
        the enabled slots plus the tags (a tag wins over its slider)."""
        from stylelora.blend import parse_prompt_loras

        text, tags = parse_prompt_loras(prompt or "", self.adapters_dir)
        wanted = {}
        for slot in Slot.split(slots):
            if slot.name and slot.on:
                wanted[slot.name] = (float(slot.strength), float(slot.unet), float(slot.te))
        for path, w in tags:  # one weight shows as a strength, as a slider's does
            u, t = w["unet"], w["text_encoder"]
            wanted[path.stem] = (u, 1.0, 1.0) if u == t else (1.0, u, t)
        return text, wanted

    @staticmethod
    def _scale(s: float, u: float, t: float):
        return s if u == t == 1 else {"unet": s * u, "text_encoder": s * t}

    def _render(self, text, negative, seed, steps, guidance, size, mode, wanted: dict):
        """One image; `wanted` is the complete set of adapters for it (AdapterStack.generate
        treats the scales it gets as complete and applies them under its lock)."""
        with self._lock:
            for name in wanted:
                self._load(name)
        scales = {n: self._scale(*v) for n, v in wanted.items()}
        return self.stack.generate(text, negative=negative or None, seed=int(seed), steps=int(steps),
                                   guidance=float(guidance), size=_size(size), mode=mode,
                                   scales=scales)

    def generate(self, prompt, negative, seed, steps, guidance, size, mode, *slots):
        t0 = time.perf_counter()
        _check_length(prompt=prompt, negative_prompt=negative)
        seed = _number(seed, "seed", int)
        text, wanted = self._request(prompt, slots)
        image = self._render(text, negative, seed, steps, guidance, size, mode, wanted)
        settings = {"prompt": prompt, "prompt_used": text, "negative": negative, "seed": int(seed),
                    "steps": int(steps), "guidance": float(guidance), "size": list(_size(size)),
                    "mode": mode, "adapters": {n: self._scale(*v) for n, v in wanted.items()},
                    "seconds": round(time.perf_counter() - t0, 3)}
        return image, settings

    def sweep(self, prompt, negative, seed, steps, guidance, size, mode, strengths, *slots):
        """Rows: each requested adapter at each strength, the other requested ones as set."""
        from stylelora.grid import image_grid

        _check_length(prompt=prompt, negative_prompt=negative, sweep_strengths=strengths)
        seed = _number(seed, "seed", int)
        try:
            values = parse_number_list(strengths)
        except ValueError:
            raise ValueError(f"strengths {strengths!r}: write numbers separated by commas, e.g. 0, 0.5, 1") from None
        text, wanted = self._request(prompt, slots)
        if not wanted or not values or len(values) > 12:
            raise ValueError("enable at least one adapter (or write <lora:name:w>) and give 1-12 strengths")
        rows = [[self._render(text, negative, seed, steps, guidance, size, mode,
                              {**wanted, name: (v, *wanted[name][1:])}) for v in values] for name in wanted]
        return image_grid(rows, row_labels=list(wanted), col_labels=[f"{v:g}" for v in values])

    def add_triggers(self, prompt: str, name: str) -> str:
        """Append the adapter's trigger words as last tags, as the example datasets caption them
        (a leading tag shifts every content word of the embedded base; see the README)."""
        tags = [t.strip() for t in (prompt or "").split(",")]
        words = [w for w in self.triggers(name) if w not in tags]
        return ", ".join(([prompt.rstrip(", ")] if (prompt or "").strip() else []) + words)

    def refresh(self, *current):
        """Slots, note and the Adapters tab's pickers after the folder changed. `current` holds the
        slots' names then the two pickers' values, so unchanged slots keep their sliders."""
        names, (pick, chosen) = self.adapter_names(), current[MAX_SLOTS:]
        out = []
        for i in range(MAX_SLOTS):
            name = names[i] if i < len(names) else ""
            same = name == current[i]
            trig = self.triggers(name) if name else []
            if same:  # the adapter keeps its row: keep its checkbox and sliders
                row = Slot(name, gr.update(label=name or "-"), **dict.fromkeys(Slot.SLIDERS, gr.skip()))
            else:  # a new adapter in this row starts off (unless named by --on), at the defaults
                row = Slot(name, gr.update(label=name or "-", value=name in self.enabled))
            out += [gr.update(visible=bool(name)), *row, gr.update(value="+ " + ", ".join(trig), visible=bool(trig))]
        more = f"; the first {MAX_SLOTS} have sliders, use `<lora:name:w>` for the rest" if len(names) > MAX_SLOTS else ""
        out.append(f"{len(names)} adapter(s) in `{_shown(self.adapters_dir)}`{more}")
        out.append(gr.update(choices=names, value=pick if pick in names else None))
        out.append(gr.update(choices=names, value=[c for c in chosen or [] if c in names]))
        return out

    # --- datasets
    def datasets(self) -> list[str]:
        d = self.datasets_dir
        return sorted(p.name for p in d.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)) if d.is_dir() else []

    def dataset_path(self, value: str) -> Path:
        """An absolute path the user typed (a folder of their own), else a name in datasets/: a
        relative value never leaves datasets/ ("../x" is refused, not resolved)."""
        value = (value or "").strip()
        path = Path(value).expanduser()
        if path.is_absolute() and not self.any_folder:
            raise ValueError(f"{value!r}: this UI is served beyond this machine, so it only reads datasets "
                             f"inside {self.datasets_dir}: type a folder name there, or upload a zip")
        path = path.resolve() if path.is_absolute() else safe_child(self.datasets_dir, value)
        if not path.is_dir():
            raise FileNotFoundError(f"dataset folder {value!r} not found: pick one of {self.datasets_dir} "
                                    "or type the absolute path of a folder of images with .txt captions")
        return path

    def load_captions(self, value):
        from stylelora.data import discover, format_report

        folder = self.dataset_path(value)
        big = oversized_captions(folder)
        items, skipped = discover(folder)
        report = format_report(items, skipped) + (f"\nwarning: {_caption_limit(big)}" if big else "")
        return [[it.rel, shown_caption(it.caption)] for it in items], report

    def save_captions(self, value, table):
        from stylelora.data import discover

        folder = self.dataset_path(value)
        items = {it.rel: it for it in discover(folder)[0]}
        rows = table.values.tolist() if hasattr(table, "values") else table or []
        writes, in_jsonl, cut = [], [], []
        for rel, caption in rows:  # all checked before anything is written
            item = items.get(rel)
            if item is None:  # only captions of images discover() found are ever written
                raise ValueError(f"{_short(str(rel))!r} is not an image of {folder}; reload the table")
            caption = "" if caption is None else str(caption).strip()
            if caption in (item.caption, shown_caption(item.caption)):
                continue
            if len(caption.encode()) > MAX_CAPTION_BYTES:
                raise ValueError(f"the caption of {rel!r} is {len(caption.encode())} bytes; the limit is "
                                 f"{MAX_CAPTION_BYTES}: shorten it. Nothing was saved")
            if item.caption_source == "metadata.jsonl":
                in_jsonl.append(rel)
            elif shown_caption(item.caption) != item.caption:  # the table held only its start
                cut.append(rel)
            else:
                writes.append((item, caption))
        for item, caption in writes:
            # the caption file it was read from (.txt, or the dataset's own extension), replaced atomically
            write_text(item.path.with_name(item.caption_source or item.path.stem + ".txt"), caption + "\n")
        note = f"; not changed (captioned in metadata.jsonl, edit it there): {', '.join(in_jsonl)}" if in_jsonl else ""
        if cut:
            note += f"; not changed (too long to edit here, edit the file itself): {', '.join(cut)}"
        return f"saved {len(writes)} caption(s) in {folder}{note}"

    def import_dataset(self, files, name):
        dest = safe_child(self.datasets_dir, name)
        if dest.exists():
            raise FileExistsError(f"dataset {name!r} exists in {self.datasets_dir}: pick another name")
        files = [Path(f) for f in files or []]
        if not files:
            raise ValueError("choose images with .txt captions, or a .zip of them, to upload")
        if sum(f.stat().st_size for f in files) > self.max_dataset_bytes:
            raise ValueError(f"the upload is over {self.max_dataset_bytes // MB} MB; upload fewer or smaller images")
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        # mkdir, not mkdtemp (0700): the dataset gets the permissions any new folder gets (umask)
        tmp = self.datasets_dir / f".{dest.name}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir()
        try:
            self._unpack_upload(files, tmp)
            try:
                os.rename(tmp, dest)
            except OSError:  # another request imported this name meanwhile
                raise FileExistsError(f"dataset {name!r} exists in {self.datasets_dir}: pick another name") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        table, report = self.load_captions(dest.name)
        return gr.update(choices=self.datasets(), value=dest.name), table, report

    def _unpack_upload(self, files: list[Path], tmp: Path) -> None:
        """The uploaded images, captions and zips into `tmp`, checked like a dataset: at least one
        usable image, no caption over MAX_CAPTION_BYTES. Messages name files as uploaded, never
        the server's temporary paths."""
        budget = [self.max_dataset_bytes]
        for f in files:
            if f.suffix.lower() == ".zip":
                extract_zip(f, tmp, budget)
            elif f.name.lower().endswith(DATASET_EXTS) and not f.name.startswith("."):
                if f.suffix.lower() == ".txt" and f.stat().st_size > MAX_CAPTION_BYTES:
                    raise ValueError(_caption_limit([f"{f.name} ({f.stat().st_size // 1024} kB)"]))
                try:  # .name: a basename, whatever the browser sent; "xb": two of one name clash
                    with open(f, "rb") as fin, open(tmp / f.name, "xb") as fout:
                        shutil.copyfileobj(fin, fout)
                except OSError as e:
                    raise _unpack_error("uploaded file ", f.name, e) from None
        big = oversized_captions(tmp)  # metadata.jsonl lines (zipped .txt captions stopped at the cap)
        if big:
            raise ValueError(_caption_limit(big))
        from stylelora.data import discover

        try:  # discover itself, not load_captions: tmp is an absolute path, refused beyond loopback
            discover(tmp)  # refuses a folder without one usable image
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(str(e).replace(str(tmp), "the upload")) from None

    # --- training
    def start_training(self, dataset, name, trigger, steps, rank, lr, targets=TrainConfig.targets):

        out = safe_child(self.adapters_dir, name, ".safetensors")
        _check_length(trigger_words=trigger)
        steps, rank, lr = _number(steps, "steps", int), _number(rank, "rank", int), _number(lr, "learning rate")
        folder = self.dataset_path(dataset)
        big = oversized_captions(folder)
        if big:
            raise ValueError(f"{_caption_limit(big)}, then start again")
        with self._lock:
            if self.job is not None and self.job.running:
                raise ValueError("a training is running; wait for it or press Stop")
            if out.exists():
                raise FileExistsError(f"an adapter named {out.stem!r} exists: pick another name or delete it")
            cfg = TrainConfig(dataset=str(folder), out=str(out), base=self.base,
                              base_config=self.base_config, trigger=(trigger or "").strip() or None,
                              steps=steps, rank=rank, lr=lr, targets=targets, progress=False, device=self.device,
                              run_dir=str(self.adapters_dir / ".runs" / out.stem),
                              log_every=max(1, min(10, steps // 100)), sample_every=max(1, steps // 4))
            self.job = TrainJob(cfg)
        return self.job.progress_html(), gr.Timer(active=True)

    def stop_training(self):
        if self.job is not None and self.job.running:
            self.job.stop.set()
            return "stopping after this step…"
        return "no training is running"

    def poll(self, *current):
        """Timer tick: progress, loss curve, latest samples; on the tick that sees the run end,
        stop the timer and refresh the adapter lists so the new adapter shows up."""
        import pandas as pd
        from PIL import Image

        job = self.job
        if job is None:
            return ["no training yet", gr.skip(), gr.skip(), gr.Timer(active=False)] + [gr.skip()] * N_LISTS
        done = not job.running
        if done and job.saved is not None and job.saved != Path(job.cfg.out):
            # Saved under a free name: the Adapters tab's picker shows that adapter.
            current = (*current[:MAX_SLOTS], job.saved.stem, *current[MAX_SLOTS + 1:])
        sample = Image.open(job.sample) if job.sample else gr.skip()
        lists = self.refresh(*current) if done else [gr.skip()] * N_LISTS
        curve = pd.DataFrame(job.rows, columns=["step", "loss"]).astype({"step": int, "loss": float})
        return [job.progress_html(), curve, sample,
                gr.Timer(active=not done)] + lists

    # --- adapters tab
    def inspect(self, name):
        from stylelora.adapters import describe, load_adapter

        return None if not name else describe(load_adapter(self.adapter_path(name)))

    def _new_path(self, name: str) -> Path:
        out = safe_child(self.adapters_dir, name, ".safetensors")
        if out.exists():
            raise FileExistsError(f"an adapter named {out.stem!r} exists: pick another name")
        return out

    def _publish(self, name: str, write) -> Path:
        """A new adapter under `name`, never replacing one that exists, even when two requests race
        for the name (two uploads, an upload and a merge): `write` fills a hidden temporary beside it,
        which is then hard-linked into place, and a link fails when the name is taken."""
        out = self._new_path(name)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp.safetensors")
        try:
            write(tmp)
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise FileExistsError(f"an adapter named {out.stem!r} exists: pick another name") from None
            except OSError:  # a filesystem without hard links: check and rename under the UI's lock
                with self._lock:
                    self._new_path(name)
                    os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def convert(self, name, fmt, new_name):
        from stylelora.adapters import load_adapter, save_adapter

        adapter = load_adapter(self.adapter_path(name))
        new_name = new_name or f"{name}-{fmt}"
        out = self._publish(new_name, lambda tmp: save_adapter(adapter, tmp, layout=fmt, output_name=new_name))
        return f"wrote {out.name} ({fmt} keys)"

    def merge(self, names, weights, new_name, rank):
        from stylelora.adapters import load_adapter, save_adapter
        from stylelora.blend import merge_adapters

        names = list(names or [])
        try:
            ws = parse_number_list(weights or "") or [1.0] * len(names)
        except ValueError:
            raise ValueError(f"weights {weights!r}: write one number per adapter, e.g. 0.5, 0.5") from None
        if len(names) < 2 or len(ws) != len(names):
            raise ValueError(f"pick 2 or more adapters and one weight each (got {len(names)} and {len(ws)})")
        self._new_path(new_name)  # a taken name fails before the work
        merged, err = merge_adapters([(load_adapter(self.adapter_path(n)), w) for n, w in zip(names, ws)],
                                     rank=int(rank) if rank else None)
        out = self._publish(new_name, lambda tmp: save_adapter(merged, tmp, output_name=new_name))  # kohya layout
        return (f"wrote {out.name} = " + " + ".join(f"{w:g}·{n}" for n, w in zip(names, ws)) +
                f" (relative error {err:.2g})")

    def delete(self, name, confirm):
        path = self.adapter_path(name)
        if not confirm:
            raise ValueError(f"tick the confirmation box to delete {path.name}")
        with self._lock:
            if name in self.stack.names:
                self.stack.remove(name)
            self._stamps.pop(name, None)
            path.unlink()
        return f"deleted {path.name}"

    def upload(self, file):
        from stylelora.adapters import check_fits, load_adapter

        src = Path(file)  # a temporary path; its .name is the name the file was uploaded as
        size = src.stat().st_size
        if size > self.max_adapter_bytes:
            raise ValueError(f"{src.name} is over the {self.max_adapter_bytes // MB} MB adapter limit")
        with open(src, "rb") as f:
            head = f.read(9)
        if len(head) < 9 or struct.unpack("<Q", head[:8])[0] > size - 8 or head[8:9] != b"{":
            raise ValueError(f"{src.name} is not a .safetensors file (a pickle .ckpt/.pt/.bin, or another kind of "
                             "file): upload a LoRA adapter saved as .safetensors. Convert a pickle first, with a "
                             "tool you trust, in a sandbox: loading a pickle can run arbitrary code")
        try:
            check_fits(load_adapter(src), self.pipe)  # refuses corrupt files, unknown keys, wrong bases
        except ValueError as e:
            raise ValueError(str(e).replace(str(src), src.name)) from None
        name = re.sub(r"[^A-Za-z0-9._-]", "_", src.stem).lstrip("._-")[:64] or "uploaded"
        out = self._publish(name, lambda tmp: shutil.copyfile(src, tmp))
        return f"added {out.name}"


def build_app(adapters_dir="adapters", base=None, **options) -> gr.Blocks:
    """The Blocks app. options: datasets_dir, base_config, device, max_adapter_mb, max_dataset_mb.
    The StyleloraUI behind it is `app.stylelora`."""
    ui = StyleloraUI(adapters_dir, base, **options)
    with gr.Blocks(title="stylelora") as app:
        app.stylelora = ui
        gen = _generate_tab(ui)
        train = _train_tab()
        adapters = _adapters_tab()
        _wire(app, ui, gen, train, adapters)
    return app


def _slot_row(ui: StyleloraUI, i: int, prompt: gr.Textbox) -> SlotRow:
    """Slot i's widgets, empty and hidden until a refresh (the page's load event) fills them."""
    fresh = Slot()
    with gr.Group(visible=False, elem_id=f"slot{i}") as group:
        name = gr.Textbox(fresh.name, visible=False)
        with gr.Row():
            on = gr.Checkbox(fresh.on, label="-", elem_id=f"slot{i}-on")
            strength = gr.Slider(-1, 2, fresh.strength, step=0.05, label="strength", scale=3,
                                 elem_id=f"slot{i}-strength")
            add = gr.Button("+ ", visible=False, size="sm")
        with gr.Accordion("UNet / text encoder", open=False):
            with gr.Row():
                unet = gr.Slider(-1, 2, fresh.unet, step=0.05, label="× UNet")
                te = gr.Slider(-1, 2, fresh.te, step=0.05, label="× text encoder")
    add.click(ui.add_triggers, [prompt, name], prompt, api_visibility="private")
    return SlotRow(group, Slot(name=name, on=on, strength=strength, unet=unet, te=te), add)


def _generate_tab(ui: StyleloraUI) -> SimpleNamespace:
    """Prompt and settings, one SlotRow per adapter slot, the image and the strength sweep."""
    from stylelora.config import DEFAULT_GUIDANCE, DEFAULT_STEPS

    with gr.Tab("Generate") as tab:
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="prompt (<lora:name:weight> adds an adapter)", elem_id="prompt",
                                    value="a red star on a white background")
                negative = gr.Textbox(label="negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, minimum=0)
                    dice = gr.Button("random seed", size="sm")
                    steps = gr.Slider(1, 100, DEFAULT_STEPS, step=1, label="steps")
                    guidance = gr.Slider(0, 15, DEFAULT_GUIDANCE, step=0.5, label="guidance")
                    if ui.xl:
                        choices = size_choices(ui.native)
                        size = gr.Dropdown(choices, value=choices[0], label="size (W x H)")
                    else:
                        size = gr.Slider(32, 4 * ui.native, ui.native, step=16, label="size (px)")
                mode = gr.Radio(list(MODES), value=MODES[0], label="composition")
                note = gr.Markdown()
                rows = [_slot_row(ui, i, prompt) for i in range(MAX_SLOTS)]
                refresh_btn = gr.Button("↻ refresh adapters", size="sm")
            with gr.Column(scale=2):
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                image = gr.Image(label="image", type="pil", format="png", elem_id="output-image",
                                 interactive=False, height=320)
                settings = gr.JSON(label="settings", elem_id="settings")
                strengths = gr.Textbox("0, 0.5, 1, 1.5", label="sweep strengths")
                sweep_btn = gr.Button("Strength sweep")
                grid = gr.Image(label="adapters × strengths", type="pil", format="png", interactive=False,
                                elem_id="sweep-grid")
    return SimpleNamespace(tab=tab, prompt=prompt, negative=negative, seed=seed, dice=dice, steps=steps,
                           guidance=guidance, size=size, mode=mode, note=note, rows=rows, refresh_btn=refresh_btn,
                           go=go, image=image, settings=settings, strengths=strengths, sweep_btn=sweep_btn,
                           grid=grid)


def _train_tab() -> SimpleNamespace:
    """Dataset (pick, upload, edit captions) on the left; the run's settings and progress on the right."""
    from stylelora.lora import UNET_PRESETS
    from stylelora.train import TrainConfig

    with gr.Tab("Train"):
        with gr.Row():
            with gr.Column():
                dataset = gr.Dropdown([], label="dataset: a datasets/ folder, or type an absolute path",
                                      allow_custom_value=True, elem_id="dataset")
                load_btn = gr.Button("Load captions", size="sm")
                files = gr.File(label="…or upload images + .txt captions, or a .zip", file_count="multiple")
                with gr.Row():
                    new_ds = gr.Textbox(label="name for the uploaded dataset")
                    import_btn = gr.Button("Import upload", size="sm")
                table = gr.Dataframe(headers=["image", "caption"], type="array", interactive=True,
                                     label="captions (editable)")
                save_btn = gr.Button("Save captions", size="sm")
                data_note = gr.Markdown()
            with gr.Column():
                d = TrainConfig()
                adapter_name = gr.Textbox(label="adapter name", elem_id="train-name")
                trigger = gr.Textbox(label="trigger word(s)", placeholder="e.g. pastel")
                with gr.Row():
                    steps = gr.Number(d.steps, label="steps", precision=0, minimum=1, elem_id="train-steps")
                    rank = gr.Number(d.rank, label="rank", precision=0, minimum=1)
                    lr = gr.Number(d.lr, label="learning rate", minimum=0)
                targets = gr.Radio(list(UNET_PRESETS), value=d.targets, label="LoRA on the UNet's",
                                   info="attn-ff: the default (stacks with other styles, see the README); "
                                        "cross-attn: the smallest file", elem_id="train-targets")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop", variant="stop")
                progress = gr.HTML(elem_id="train-progress")
                loss_plot = gr.LinePlot(x="step", y="loss", label="loss", height=220)
                sample = gr.Image(label="latest samples", type="pil", format="png", interactive=False,
                                  elem_id="train-samples")
                timer = gr.Timer(1.0, active=False)
    return SimpleNamespace(dataset=dataset, load_btn=load_btn, files=files, new_ds=new_ds, import_btn=import_btn,
                           table=table, save_btn=save_btn, data_note=data_note, adapter_name=adapter_name,
                           trigger=trigger, steps=steps, rank=rank, lr=lr, targets=targets, start=start, stop=stop,
                           progress=progress, loss_plot=loss_plot, sample=sample, timer=timer)


def _adapters_tab() -> SimpleNamespace:
    """Inspect, convert, merge, delete and upload adapters."""
    with gr.Tab("Adapters"):
        with gr.Row():
            # custom values: the choices arrive with the page's load event, not for API callers;
            # the handlers check any name (safe_child) before it reaches a file
            pick = gr.Dropdown([], value=None, label="adapter", elem_id="adapter-pick", allow_custom_value=True)
            refresh_btn = gr.Button("↻", size="sm", scale=0)
        info = gr.JSON(label="metadata")
        with gr.Row():
            fmt = gr.Radio(["kohya", "diffusers"], value="kohya", label="convert to")
            conv_name = gr.Textbox(label="new name (default: <name>-<format>)")
            conv_btn = gr.Button("Convert", size="sm")
        with gr.Row():
            chosen = gr.Dropdown([], multiselect=True, label="merge these", allow_custom_value=True)
            weights = gr.Textbox(label="weights (one per adapter)", placeholder="0.5, 0.5")
            merge_rank = gr.Number(0, label="rank (0 = exact)", precision=0, minimum=0)
            merge_name = gr.Textbox(label="merged name")
            merge_btn = gr.Button("Merge", size="sm")
        with gr.Row():
            confirm = gr.Checkbox(label="yes, delete the adapter picked above")
            del_btn = gr.Button("Delete", variant="stop", size="sm")
        upload = gr.File(label="upload a .safetensors adapter", file_types=[".safetensors"])
        status = gr.Markdown()
    return SimpleNamespace(pick=pick, refresh_btn=refresh_btn, info=info, fmt=fmt, conv_name=conv_name,
                           conv_btn=conv_btn, chosen=chosen, weights=weights, merge_rank=merge_rank,
                           merge_name=merge_name, merge_btn=merge_btn, confirm=confirm, del_btn=del_btn,
                           upload=upload, status=status)


def _wire(app: gr.Blocks, ui: StyleloraUI, gen: SimpleNamespace, train: SimpleNamespace,
          adapters: SimpleNamespace) -> None:
    """Events. `current` (the slots' names, the pickers) goes into every refresh, `lists` out of it.
    The page's load event fills the adapter and dataset lists: the built app holds no names, since
    gradio serves its API description (with choices and defaults) to visitors not logged in."""
    lists = [c for row in gen.rows for c in row.outputs] + [gen.note, adapters.pick, adapters.chosen]
    current = [row.inputs.name for row in gen.rows] + [adapters.pick, adapters.chosen]
    for event in (app.load, gen.refresh_btn.click, adapters.refresh_btn.click, gen.tab.select):
        event(ui.refresh, current, lists, show_progress="hidden", api_visibility="private")
    _wire_generate(ui, gen)
    _wire_train(app, ui, train, current, lists)
    _wire_adapters(ui, adapters, current, lists)


def _wire_generate(ui: StyleloraUI, gen: SimpleNamespace) -> None:
    slots = [c for row in gen.rows for c in row.inputs]
    common = [gen.prompt, gen.negative, gen.seed, gen.steps, gen.guidance, gen.size, gen.mode]
    for event in (gen.go.click, gen.prompt.submit):
        event(_friendly(ui.generate), common + slots, [gen.image, gen.settings], api_name="generate",
              concurrency_limit=4, concurrency_id="render")
    gen.sweep_btn.click(_friendly(ui.sweep), common + [gen.strengths] + slots, gen.grid, api_name="sweep",
                        concurrency_id="render")
    gen.dice.click(lambda: random.randrange(2**31), None, gen.seed, api_visibility="private")


def _wire_train(app: gr.Blocks, ui: StyleloraUI, t: SimpleNamespace, current: list, lists: list) -> None:
    t.load_btn.click(_friendly(ui.load_captions), t.dataset, [t.table, t.data_note])
    t.save_btn.click(_friendly(ui.save_captions), [t.dataset, t.table], t.data_note)
    t.import_btn.click(_friendly(ui.import_dataset), [t.files, t.new_ds], [t.dataset, t.table, t.data_note])
    t.start.click(_friendly(ui.start_training), [t.dataset, t.adapter_name, t.trigger, t.steps, t.rank, t.lr,
                                                 t.targets], [t.progress, t.timer], api_name="train")
    t.stop.click(ui.stop_training, None, t.progress)
    app.load(lambda: gr.update(choices=ui.datasets()), None, t.dataset, api_visibility="private")
    app.load(lambda: gr.Timer(active=ui.job is not None and ui.job.running), None, t.timer,  # reopened page
             api_visibility="private")
    t.timer.tick(ui.poll, current, [t.progress, t.loss_plot, t.sample, t.timer] + lists, show_progress="hidden",
                 concurrency_limit=None, api_visibility="private")


def _wire_adapters(ui: StyleloraUI, a: SimpleNamespace, current: list, lists: list) -> None:
    a.pick.change(_friendly(ui.inspect), a.pick, a.info, api_visibility="private")
    for btn, fn, inputs in ((a.conv_btn, ui.convert, [a.pick, a.fmt, a.conv_name]),
                            (a.merge_btn, ui.merge, [a.chosen, a.weights, a.merge_name, a.merge_rank]),
                            (a.del_btn, ui.delete, [a.pick, a.confirm]), (a.upload, ui.upload, [a.upload])):
        event = btn.upload if btn is a.upload else btn.click
        event(_friendly(fn), inputs, a.status).success(ui.refresh, current, lists, show_progress="hidden",
                                                       api_visibility="private")
    a.del_btn.click(lambda: False, None, a.confirm, api_visibility="private")  # confirm each delete anew


# Tiny base images (64 px) shown large and sharp instead of as blurry thumbnails.
CSS = """#output-image img, #sweep-grid img, #train-samples img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"""


def launch_options(host="127.0.0.1", port=7860, auth: str | None = None, max_file_mb=512) -> dict:
    """Keyword arguments for Blocks.launch: local-only unless told, optional USER:PASS login."""
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not (user and sep and password):
            raise ValueError("--auth wants USER:PASS, e.g. --auth alice:s3cret")
        auth = (user, password)
    return {"server_name": host, "server_port": port, "auth": auth, "max_file_size": max_file_mb * MB, "css": CSS}


def serve(adapters_dir="adapters", base=None, *, host="127.0.0.1", port=7860, auth=None, **options) -> None:
    """`stylelora ui`: build the app and serve it until interrupted."""
    limit = max(options.get("max_adapter_mb", 512), options.get("max_dataset_mb", 512))
    launch = launch_options(host, port, auth, limit)  # a bad --auth fails before the base loads
    options.setdefault("any_folder", is_loopback(host))
    build_app(adapters_dir, base, **options).queue().launch(**launch)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
