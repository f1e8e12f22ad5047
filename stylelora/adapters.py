"""LoRA adapter files: stylelora's .safetensors format, and import/export of the other layouts.

On disk an adapter is, by default, a kohya-layout LoRA -- the one file diffusers, ComfyUI, A1111
and sd-scripts all load unchanged: `lora_unet_<module path with _>.lora_down.weight` (rank, in) /
`.lora_up.weight` (out, rank) / `.alpha`, and `lora_te_text_model_<...>` for CLIP, with one alpha
for every layer (see _one_alpha) and sd-scripts' `ss_*` metadata (base version, network, training,
tags; sshs_* hashes). tests/test_interop.py checks each tool's loader or key rules.
The other layout, `save_adapter(..., layout="diffusers")` (and every file stylelora wrote before
kohya became the default), is a plain diffusers/PEFT LoRA file: `unet.<module>.lora_A.weight` /
`.lora_B.weight`, and CLIP under its classic `text_encoder.text_model.<module>` path, which every
loader accepts (diffusers 0.42 and transformers >= 5.6 strip `text_model.`, older ones need it).
alpha then travels as diffusers' own save_lora_weights writes it -- LoraConfig kwargs per
component ("unet.r", "unet.lora_alpha", "unet.alpha_pattern", ...) in the `lora_adapter_metadata`
header entry -- so a plain diffusers load gives every layer scaling == alpha / rank. ComfyUI maps
only the text encoder of such a file, A1111 none of it. Our own metadata sits beside either under
`stylelora.*` (format version 1 for both: it versions that metadata; readers tell the layouts by
their keys, and stylelora has read kohya files from the start).
In memory, keys are "<component>.<module>" without `text_model.`: the installed transformers' and
PEFT's module names, which (as suffixes) also match the older nested CLIP.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .fileio import PICKLE_SUFFIXES, atomic_path
from .lycoris import PARTS, UNSUPPORTED, DoraLayer, FullDiff, LohaFactors, LokrFactors, LoconCP, from_kohya_parts
from .strength import read_map

FORMAT_VERSION = "1"
PREFIX = "stylelora."
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL's second (bigG)
TEXT_COMPONENTS = COMPONENTS[1:]
# == diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY (a test pins it); spelled out so that
# reading our own files never pays for importing diffusers.
DIFFUSERS_META_KEY = "lora_adapter_metadata"
# The JSON-valued metadata entries and the JSON type each must hold.
JSON_TYPES = {DIFFUSERS_META_KEY: dict, PREFIX + "rank": (int, float), PREFIX + "alpha": (int, float),
              PREFIX + "targets": list, PREFIX + "trigger_words": list, PREFIX + "training": dict,
              PREFIX + "dataset": dict}
JSON_KEYS = tuple(JSON_TYPES)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LAYOUTS = ("kohya", "diffusers")  # what save_adapter writes; the first is the default
XL_LAYERS_KEY = PREFIX + "unet_layers_per_block"  # how an SDXL file's SAI block names were counted
# Metadata that describes the base model: kept through conversions and merges of one base.
BASE_KEYS = ("ss_v2", "ss_base_model_version", "ss_v_parameterization", "ss_zero_terminal_snr", "ss_sd_model_name",
             XL_LAYERS_KEY)
# kohya metadata that describes the file's own tensors: recomputed on every write.
_KOHYA_DERIVED = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name", "sshs_")
SD1_TEXT_WIDTH, SD2_TEXT_WIDTH = 768, 1024  # CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 (SD 2.x) widths
# `unet.save_lora_adapter` writes keys without a component prefix; their roots say whose they are.
_BARE_ROOTS = {"unet": ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding."),
               "text_encoder": ("text_model.", "encoder.")}
_F32_MAX = torch.finfo(torch.float32).max
# dtypes whose NaN/inf check torch implements; other floating types (float8) are read as float32,
# which holds each of their values exactly.
_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What a file that is not safetensors often is, by its first bytes: named in the refusal.
_REFETCH = "re-download it, or export the LoRA as .safetensors"
_MAGIC = ((b"\x89PNG", "a PNG image", _REFETCH), (b"\xff\xd8\xff", "a JPEG image", _REFETCH),
          (b"GIF8", "a GIF image", _REFETCH), (b"RIFF", "a RIFF file (WebP image or WAV audio)", _REFETCH),
          (b"GGUF", "a GGUF model file", _REFETCH), (b"\x1f\x8b", "a gzip archive", "unpack it first"),
          (b"PK\x03\x04", "a zip archive", "unzip it: the .safetensors file may be inside"),
          (b"version https://git-lfs", "a Git LFS pointer to the file", "run `git lfs pull` to fetch the file itself"))
_PART = {"A": "lora_A", "B": "lora_B", "alpha": "alpha", "M": "lora_magnitude_vector"}
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|(?P<alpha>alpha)"
                       r"|(?P<mag>lora_magnitude_vector))$")  # the last: DoRA's magnitudes
# kohya-named parts of a LoRA / LoCon layer (with `lora_mid.weight`, a CP LoCon: lycoris.PARTS)
_KOHYA_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


@dataclass
class LoraFactors:
    """The low-rank delta of one adapted layer: W' = W + up @ down * alpha / rank. Conv LoRA keeps
    its 4-D tensors. (Not PEFT's LoraFactors, the module wrapper that applies such factors.)"""

    down: torch.Tensor  # A: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # B: (out, rank) or (out, rank, 1, 1)
    alpha: float
    kind = "lora"  # the layer kinds of lycoris.py share this interface (shape, rank, alpha, delta, ...)
    flat = False  # a conv LoRA keeps its kernel: its shape is the base weight's

    def __post_init__(self):
        if not (self.down.is_floating_point() and self.up.is_floating_point()):
            raise ValueError(f"LoRA down/up are {self.down.dtype}/{self.up.dtype}: LoRA weights must be "
                             "floating point")
        if (self.down.ndim not in (2, 4) or self.up.ndim != self.down.ndim or self.up.shape[1] != self.down.shape[0]
                or self.up.shape[2:] not in ((), (1, 1))):
            raise ValueError(f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} do not pair: "
                             "need down (rank, in) and up (out, rank), or for a conv layer down (rank, in, kh, kw) "
                             "and up (out, rank, 1, 1)")
        if self.down.shape[0] < 1 or 0 in self.up.shape or 0 in self.down.shape:
            raise ValueError(f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} are empty: "
                             "rank and sizes must be at least 1")
        if not _finite(self.alpha):
            raise ValueError(f"LoRA alpha is {self.alpha!r}: it must be a finite number within float32's range "
                             "(the layer's scale is alpha / rank)")
        self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the base weight this layer adds to: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    @property
    def rank_bound(self) -> int:
        return self.rank

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.down, self.up

    def delta(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """The weight update, in float32 so merging and comparing do not lose low bits. (w0: the
        base weight, which other layer kinds may need; a LoRA update does not depend on it.)"""
        return (self.up.flatten(1).float() @ self.down.flatten(1).float() * self.scale).reshape(self.shape)


# One adapted layer. LoRA keeps its factors (blended by a fused low-rank product); the others are
# blended as their dense update (lycoris.py), DoRA's computed against the base it is added to.
Layer = LoraFactors | LoconCP | LohaFactors | LokrFactors | FullDiff | DoraLayer


def needs_base(layer: Layer) -> str | None:
    """Why this layer's exact update needs the base weights (None: it does not)."""
    if isinstance(layer, DoraLayer):
        return "it is a DoRA layer, whose update depends on the base weights"
    if layer.flat and len(layer.shape) == 2:
        return (f"its {layer.kind} factors are 2-D, so only the base tells a linear layer from a conv layer whose "
                "kernel they flatten")
    return None


@dataclass
class Adapter:
    layers: dict[str, Layer]  # "unet.<module>" / "text_encoder.<module>" / "text_encoder_2.<module>"
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    # what the file was: "stylelora" | "diffusers" | "kohya" | "lycoris-<kinds>" (e.g. lycoris-loha), and
    # "+dora" when some layer has DoRA magnitudes
    source_format: str = "stylelora"

    @property
    def rank(self) -> int:
        return max((l.rank for l in self.layers.values()), default=0)

    @property
    def alpha(self) -> float:
        """The most common alpha (what diffusers would put in LoraConfig.lora_alpha)."""
        return _most_common([l.alpha for l in self.layers.values()], 0.0)

    @property
    def targets(self) -> list[str]:
        return list(self.layers)

    @property
    def trigger_words(self) -> list[str]:
        return _json_meta(self.metadata, PREFIX + "trigger_words", self.path) or []

    @property
    def components(self) -> set[str]:
        return {k.split(".", 1)[0] for k in self.layers}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for l in self.layers.values() for t in l.tensors())

    @property
    def n_params(self) -> int:
        return sum(t.numel() for l in self.layers.values() for t in l.tensors())


def require_lora(adapter: Adapter, target: str | os.PathLike) -> None:
    """Writers keep LoRA factors only: refuse, by name, a layer of another kind instead of a wrong file."""
    key, layer = next(((k, l) for k, l in adapter.layers.items() if not isinstance(l, LoraFactors)), (None, None))
    if key is not None:
        kind = layer.kind + (" DoRA" if isinstance(layer, DoraLayer) else "")
        raise ValueError(f"cannot write {target}: layer {key} of {adapter.path or 'the adapter'} is a {kind} layer "
                         f"(a {adapter.source_format} file), and stylelora writes LoRA factors only. Convert it to "
                         f"LoRA with `stylelora merge {adapter.path or 'ADAPTER.safetensors'}:1 --raw-scale -o "
                         "NEW.safetensors` (an SVD of each layer's exact update; --rank N makes it smaller, --base "
                         "names the base when it needs one)")


def stylelora_metadata(*, base_name: str | None = None, base_fingerprint: str | None = None,
                       trigger_words: list[str] | None = None, training: Mapping[str, Any] | None = None,
                       dataset: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Descriptive metadata as file-ready strings; save_adapter adds rank, alpha and targets."""
    encoded = {"base_name": base_name, "base_fingerprint": base_fingerprint,
               "trigger_words": None if trigger_words is None else json.dumps(list(trigger_words)),
               "training": None if training is None else json.dumps(dict(training), sort_keys=True),
               "dataset": None if dataset is None else json.dumps(dict(dataset), sort_keys=True)}
    return {PREFIX + k: str(v) for k, v in encoded.items() if v is not None}


# --- writing ----------------------------------------------------------------------------------

def _finite(v: Any) -> bool:
    """A real number (not bool) that float32 holds finitely: what an alpha may be."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v) and abs(float(v)) <= _F32_MAX
    except OverflowError:  # an int past float's range
        return False


def _most_common(values: list, default):
    return collections.Counter(values).most_common(1)[0][0] if values else default


def _split(key: str) -> tuple[str, str]:
    comp, _, module = key.partition(".")
    if comp not in COMPONENTS or not module:
        raise ValueError(f"adapter layer key {key!r} must look like 'unet.<module>', 'text_encoder.<module>' or "
                         "'text_encoder_2.<module>'")
    return comp, module


def _file_key(key: str) -> str:
    comp, module = _split(key)
    return f"{comp}.text_model.{module}" if comp in TEXT_COMPONENTS else key


def _lora_config(layers: dict[str, LoraFactors]) -> dict[str, Any]:
    """Minimal LoraConfig kwargs for one component, shaped like diffusers' get_peft_kwargs. Minimal
    on purpose: a field newer PEFTs add would be an unknown kwarg (TypeError) for older ones."""
    r = _most_common([l.rank for l in layers.values()], 0)
    alpha = _most_common([l.alpha for l in layers.values()], 0.0)
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {m: l.rank for m, l in layers.items() if l.rank != r},
            "alpha_pattern": {m: l.alpha for m, l in layers.items() if l.alpha != alpha}}


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """Temp file in the same folder, fsync, os.replace: readers see the old file or the new one."""
    from safetensors.torch import save_file

    if (path := Path(path)).suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are written as .safetensors; name the file <name>.safetensors")
    if not tensors:
        raise ValueError(f"refusing to write {path}: the adapter has no layers")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _tensor(t: torch.Tensor, key: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ValueError(f"layer {key} has NaN/inf values (diverged training?); refusing to save it")
    return t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage


def _metadata(adapter: Adapter, keep=lambda key: True) -> dict[str, str]:
    """The adapter's metadata (filtered by `keep`) with rank/alpha/targets recomputed from its layers."""
    bad = [k for k, v in adapter.metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"adapter metadata values must be strings; JSON-encode {bad} (see stylelora_metadata)")
    return {**{k: v for k, v in adapter.metadata.items() if keep(k)}, "format": "pt",
            PREFIX + "format_version": FORMAT_VERSION, PREFIX + "rank": json.dumps(adapter.rank),
            PREFIX + "alpha": json.dumps(adapter.alpha), PREFIX + "targets": json.dumps(adapter.targets)}


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, layout: str | None = None,
                 output_name: str | None = None) -> Path:
    """Write `adapter` atomically in `layout` and return the path. "kohya" (the default): the keys
    diffusers, ComfyUI, A1111 and sd-scripts all load, with sd-scripts' `ss_*` metadata (SDXL: as
    sd-scripts' SDXL trainer names them, see _kohya_name); "diffusers": diffusers/PEFT keys (format
    version 1's layout). `output_name` is the name kohya tools list the adapter under
    (`ss_output_name`); unset = the file's stem (pass it when `path` is a temporary)."""
    require_lora(adapter, path)
    layout = layout or LAYOUTS[0]
    if layout == "diffusers":
        return _save_diffusers(adapter, path)
    if layout != "kohya":
        raise ValueError(f"unknown adapter layout {layout!r}: use one of {list(LAYOUTS)}")
    xl_layers = _xl_layers_per_block(adapter.metadata) if _is_sdxl(adapter) else None
    alpha, factors = _one_alpha(adapter)
    tensors = {}
    for key, (down, up) in factors.items():
        name = _kohya_name(key, xl_layers)
        tensors[name + ".lora_down.weight"] = _tensor(down, key)
        tensors[name + ".lora_up.weight"] = _tensor(up, key)
        tensors[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    metadata = _metadata(adapter, keep=lambda k: k != DIFFUSERS_META_KEY and not k.startswith(_KOHYA_DERIVED))
    metadata.update({**_base_version(adapter, metadata), "ss_network_module": "networks.lora",
                     "ss_network_dim": str(adapter.rank), "ss_network_alpha": str(alpha),
                     "ss_output_name": output_name or Path(path).stem})
    metadata.update(_sshs_hashes(tensors, metadata))
    return _atomic_save(tensors, metadata, path)


def export_kohya(adapter: Adapter, path: str | os.PathLike, *, output_name: str | None = None) -> Path:
    """save_adapter in the kohya layout (kept for callers of the name; it is the default now)."""
    return save_adapter(adapter, path, layout="kohya", output_name=output_name)


def _save_diffusers(adapter: Adapter, path: str | os.PathLike) -> Path:
    """diffusers/PEFT keys with diffusers' own LoraConfig metadata (see the module docstring). Keeps
    the base's ss_* facts; drops the entries that describe kohya tensors, which would be false here."""
    metadata = _metadata(adapter, keep=lambda k: not k.startswith(_KOHYA_DERIVED))
    tensors, per_comp = {}, collections.defaultdict(dict)
    for key, layer in adapter.layers.items():
        comp, module = _split(key)
        per_comp[comp][module] = layer
        tensors[_file_key(key) + ".lora_A.weight"] = _tensor(layer.down, key)
        tensors[_file_key(key) + ".lora_B.weight"] = _tensor(layer.up, key)
    lora_meta = {f"{comp}.{k}": v for comp, ls in per_comp.items() for k, v in _lora_config(ls).items()}
    metadata[DIFFUSERS_META_KEY] = json.dumps(lora_meta, indent=2, sort_keys=True)
    return _atomic_save(tensors, metadata, path)


def _is_sdxl(adapter: Adapter) -> bool:
    """An SDXL adapter: it adapts SDXL's second text encoder, or its metadata says so (UNet-only)."""
    return ("text_encoder_2" in adapter.components
            or adapter.metadata.get("ss_base_model_version", "").startswith("sdxl_"))


def _kohya_name(key: str, xl_layers: int | None = None) -> str:
    """kohya's module name for a layer key, the rule ComfyUI, A1111 and sd-scripts' LoRANetwork share:
    `lora_unet_` / `lora_te_` + the module path with `_` for `.`. CLIP paths keep the `text_model.`
    level of transformers 4 (what those tools' CLIP modules are called). SDXL (xl_layers = the UNet's
    layers_per_block): sd-scripts' SDXL names -- UNet paths as the original SAI checkpoint names its
    blocks (input_blocks / middle_block / output_blocks), `lora_te1_` for CLIP-L, `lora_te2_` for bigG."""
    comp, module = _split(key)
    if xl_layers is None:
        return ("lora_te_text_model_" if comp == "text_encoder" else "lora_unet_") + module.replace(".", "_")
    if comp == "unet":
        from .base import ldm_unet_module

        return "lora_unet_" + ldm_unet_module(module, xl_layers).replace(".", "_")
    prefix = {"text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}[comp]
    return prefix + module.replace(".", "_")


def _xl_layers_per_block(metadata: Mapping[str, str]) -> int:
    """The UNet's layers_per_block an SDXL adapter was made for: its metadata's, else SDXL's own (2)."""
    value = metadata.get(XL_LAYERS_KEY, "2")
    if not value.isdigit() or not 1 <= int(value) <= 16:
        raise ValueError(f"metadata {XL_LAYERS_KEY!r} is {value[:20]!r}, not a small whole number (the SDXL UNet's "
                         "layers_per_block): fix or delete that entry")
    return int(value)


def _one_alpha(adapter: Adapter) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One alpha for every layer, each layer's own alpha / that alpha folded into its up weight: the
    same updates. Why: diffusers (0.42) reads a kohya file's per-layer alphas only for modules whose
    converted name keeps `.lora.` (ff, proj_in/out); attention and CLIP layers all get the most
    common alpha, since their alpha keys name no module. With one alpha every reader is right.
    Alpha 0 is never written: sd-scripts reads it as alpha = rank, A1111 and ComfyUI as 0."""
    alpha = _most_common([l.alpha for l in adapter.layers.values() if l.alpha != 0], float(adapter.rank))
    factors = {}
    for key, layer in adapter.layers.items():
        up = layer.up if layer.alpha == alpha else (layer.up.float() * (layer.alpha / alpha)).to(layer.up.dtype)
        factors[key] = (layer.down, up)
    return alpha, factors


def version_metadata(v2: bool, v_prediction: bool | None = None, zero_snr: bool | None = None) -> dict[str, str]:
    """The base as sd-scripts' train_network.py records it: ss_v2 ("True"/"False"; A1111 lists a LoRA
    as SD2 only with "True", as SD1 when any other metadata is there) and ss_base_model_version
    ("sd_v1", "sd_v2", "_v" appended for v-prediction). ss_v_parameterization is not sd-scripts' but
    other readers look for it; ss_zero_terminal_snr is."""
    version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else "")
    meta = {"ss_v2": str(bool(v2)), "ss_base_model_version": version}
    if v_prediction is not None:
        meta["ss_v_parameterization"] = str(bool(v_prediction))
    if zero_snr is not None:
        meta["ss_zero_terminal_snr"] = str(bool(zero_snr))
    return meta


def base_metadata(pipe) -> dict[str, str]:
    """version_metadata read off a pipeline: SD 2.x is the one whose text encoder (OpenCLIP ViT-H, how
    A1111 and ComfyUI tell SD2) is 1024 wide; the scheduler says v-prediction and zero-terminal SNR."""
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL, as sd-scripts' SDXL trainer names it
        return {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
                XL_LAYERS_KEY: str(pipe.unet.config.layers_per_block)}
    sched = dict(pipe.scheduler.config)
    width = getattr(getattr(pipe.text_encoder, "config", None), "hidden_size", None)
    return version_metadata(width == SD2_TEXT_WIDTH, sched.get("prediction_type") == "v_prediction",
                            bool(sched.get("rescale_betas_zero_snr")))


def common_base_metadata(metadatas: list[Mapping[str, str]]) -> dict[str, str]:
    """The base facts (ss_v2, ...) every one of `metadatas` states alike: what a merge of them keeps."""
    return {k: metadatas[0][k] for k in BASE_KEYS
            if metadatas and k in metadatas[0] and all(m.get(k) == metadatas[0][k] for m in metadatas)}


def _base_version(adapter: Adapter, metadata: Mapping[str, str]) -> dict[str, str]:
    """ss_v2 / ss_base_model_version for a file whose metadata lacks them (made by hand, or written by
    an older stylelora): from the width the cross-attention k/v and CLIP projections take in, 1024 on
    SD 2.x, 768 on SD 1.x. Other widths (a small custom base, SDXL's 2048): nothing is claimed."""
    if "ss_v2" in metadata:
        return {}
    widths = {layer.down.shape[1] for key, layer in adapter.layers.items()
              if key.endswith(("attn2.to_k", "attn2.to_v", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))}
    return version_metadata(widths == {SD2_TEXT_WIDTH}) if widths in ({SD1_TEXT_WIDTH}, {SD2_TEXT_WIDTH}) else {}


def _sshs_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' precomputed hashes, which A1111 and the additional-networks extension use instead
    of hashing the file: sha256 of the tensor bytes after the header, and the legacy one (sha256 of
    the 64 kB at 1 MB into the file, 8 hex digits), with the ss_* metadata only in the header."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    return {"sshs_model_hash": hashlib.sha256(blob[start:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}


# --- reading ----------------------------------------------------------------------------------

def _read_checked(path: Path, max_header_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata. Pickles and bad headers are refused before safetensors runs."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist" + (
            " (it is a folder without pytorch_lora_weights.safetensors; pass the file)" if path.is_dir() else ""))
    pickle_msg = (f"{path} is a pickle-based file; stylelora only loads .safetensors. Convert it with a "
                  "tool you trust in a sandbox (torch.load(..., weights_only=True) then "
                  "safetensors.torch.save_file), since loading a pickle can run arbitrary code")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(pickle_msg)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)  # the length, the header's first byte, and enough to tell other formats
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 9 else -1
    # A header length may well start with byte 0x80, so only call it a pickle (0x80 + protocol
    # 2..5) or a torch zip when it is not plausibly safetensors (length fits, JSON follows).
    plausible = 0 <= n <= size - 8 and head[8:9] == b"{"
    if not plausible and (re.match(rb"\x80[\x02-\x05]", head) or _torch_zip(head)):
        raise ValueError(pickle_msg)
    if n < 0:
        raise ValueError(f"{path} is truncated ({size} bytes, less than a safetensors header); re-export it")
    if head[8:9] != b"{":  # the format requires the JSON header to start right there
        kind, fix = next(((k, f) for magic, k, f in _MAGIC if head.startswith(magic)), (None, _REFETCH))
        if kind is None and head.lstrip()[:1] == b"<":
            kind = "an HTML or XML page (a failed download?)"
        kind = kind or f"something else (it starts with {head[:8]!r})"
        raise ValueError(f"{path} is not a safetensors file: it is {kind}; stylelora loads LoRA adapters saved as "
                         f".safetensors: {fix}")
    if n > max_header_bytes:
        raise ValueError(f"{path} declares a {n}-byte header, over max_header_bytes={max_header_bytes}: "
                         "the file is corrupt, or pass a larger max_header_bytes if you trust it")
    if n > size - 8:
        raise ValueError(f"{path} is truncated: its header claims {n} bytes but only {size - 8} follow; "
                         "re-download or re-export it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}); it may be truncated or corrupt: "
                         "re-download or re-export it") from e
    for key, t in tensors.items():
        if t.is_floating_point() and t.dtype not in _CHECKED_FLOATS:
            try:  # float8: every value is exact in float32, and only float32 has checks and matmuls
                t = tensors[key] = t.float()
            except (RuntimeError, NotImplementedError, TypeError):
                raise ValueError(f"{path}: tensor {key} is {str(t.dtype).removeprefix('torch.')}, which stylelora "
                                 "cannot read; re-export the adapter in float16, bfloat16 or float32") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {key} contains NaN/inf values; the adapter is broken "
                             "(diverged training?): re-export it from a good checkpoint")
        if t.dtype == torch.float64 and t.numel() and t.abs().max() > _F32_MAX:
            raise ValueError(f"{path}: tensor {key} holds values beyond float32's range, which become inf "
                             "when the adapter is used; the adapter is broken: re-export it from a good checkpoint")
    return tensors, metadata


def _torch_zip(head: bytes) -> bool:
    """torch.save's zip container: its first member is <archive>/data.pkl (a pickle)."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return False
    name_len = struct.unpack("<H", head[26:28])[0]
    return head[30:30 + name_len].endswith(b".pkl")


class _NotFinite(Exception):
    """A JSON number that is NaN/Infinity (Python's json extension) or overflows to inf."""


def _no_constant(name: str):
    raise _NotFinite(name)


def _float(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise _NotFinite(text[:40])
    return value


def _json_meta(metadata: Mapping[str, str], key: str, path: Path | None) -> Any:
    raw = metadata.get(key)
    try:
        value = None if raw is None else json.loads(raw, parse_constant=_no_constant, parse_float=_float)
    except _NotFinite as e:
        raise ValueError(f"{path or 'adapter'}: metadata {key!r} holds {e}, which is not a finite number; "
                         "fix or delete that entry and save the file again") from None
    except (TypeError, ValueError, RecursionError) as e:  # ValueError: JSON, or an int of > 4300 digits
        raise ValueError(f"{path or 'adapter'}: metadata {key!r} is not valid JSON ({e}); "
                         "fix or delete that entry and save the file again") from None
    want = JSON_TYPES.get(key, object)
    if value is not None and (not isinstance(value, want) or isinstance(value, bool)
                              or (key == PREFIX + "trigger_words" and not all(isinstance(w, str) for w in value))):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(want, "a JSON number")
        raise ValueError(f"{path or 'adapter'}: metadata {key!r} must be {kind}"
                         f"{' of strings' if key == PREFIX + 'trigger_words' else ''}, got {raw[:80]!r}; "
                         "fix or delete that entry and save the file again")
    return value


def _scalar(path: Path, key: str, t: torch.Tensor) -> float:
    """An .alpha tensor as a number: it must hold exactly one value (NaN/inf were refused on reading)."""
    if t.numel() != 1:
        raise ValueError(f"{path}: {key} should hold one number (the layer's alpha) but has shape "
                         f"{tuple(t.shape)}; the file is corrupt, re-export it")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{path}: {key} is {str(t.dtype).removeprefix('torch.')}, not a real number (the "
                         "layer's alpha); the file is corrupt, re-export it")
    return float(t.item())


def _twice(path: Path, first: str, second: str, weight: str) -> ValueError:
    return ValueError(f"{path}: {first} and {second} are two spellings of the same LoRA weight, {weight}, and a "
                      "loader would silently keep only one; keep one spelling (re-export the file)")


def _unknown(path: Path, keys: list[str]) -> ValueError:
    return ValueError(f"{path}: {len(keys)} key(s) are not LoRA weights stylelora understands (diffusers/PEFT "
                      "lora_A/lora_B/alpha/lora_magnitude_vector, or kohya/LyCORIS lora_down/lora_up/lora_mid, hada_*, "
                      f"lokr_*, diff, alpha, dora_scale), e.g. {', '.join(keys[:3])}. Full checkpoints are not "
                      "adapters: export a plain SD 1.x/2.x LoRA (or an SDXL or LyCORIS one)")


def _unsupported(path: Path, key: str) -> ValueError:
    what = UNSUPPORTED[key.partition(".")[2]]
    return ValueError(f"{path}: {key} is part of {what}, which stylelora cannot blend (it reads LoRA/LoCon, LoHa, "
                      "LoKr, LyCORIS full diffs and DoRA, on weights only): use this file in ComfyUI or A1111, or "
                      "train the style as one of those")


def _to_peft(comp: str, key: str) -> str:
    """Older diffusers spellings (.processor., to_q_lora, lora_linear_layer) -> PEFT lora_A/lora_B.
    One key at a time (diffusers' converters only rename, key by key), so that two spellings of
    one weight are seen as such instead of one overwriting the other in a dict."""
    if _PEFT_KEY.match(key):
        return key  # PEFT form already: our own files take this path and never import diffusers
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    sd = {key: None}
    if comp == "unet":
        sd = convert_state_dict_to_peft(convert_unet_state_dict_to_peft(sd), original_type=StateDictType.DIFFUSERS)
    else:
        sd = convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS_OLD)  # covers both old forms
    return next(iter(sd))


def _split_components(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """component -> {key within it: (the key in the file, tensor)}."""
    out: dict[str, dict[str, tuple[str, torch.Tensor]]] = {c: {} for c in COMPONENTS}
    unknown = []
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS:
            bare = [c for c, roots in _BARE_ROOTS.items() if key.startswith(roots)]
            if not bare:
                unknown.append(key)
                continue
            comp, rest = bare[0], key
        if rest in out[comp]:  # "unet.X" beside a bare "X"
            raise _twice(path, out[comp][rest][0], key, f"{comp}.{rest}".removesuffix(".weight"))
        out[comp][rest] = (key, t)
    if unknown:
        raise _unknown(path, unknown)
    return out


def _layers(path: Path, comp: str, sd: dict[str, tuple[str, torch.Tensor]],
            alpha_of: Callable[[str, int, float | None], float],
            origins: dict[str, str] | None = None) -> dict[str, Layer]:
    """Layers of one component from its (any-vintage diffusers) keys, each mapped to (the key in
    the file, tensor); alpha_of(module, rank, .alpha). `origins` gets layer -> its file key."""
    pairs: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    alphas, magnitudes, unknown, seen = {}, {}, [], {}
    for rest, (file_key, t) in sd.items():
        key = _to_peft(comp, rest)
        if not (m := _PEFT_KEY.match(key)):
            unknown.append(f"{comp}.{key}")
            continue
        module = m["module"].removeprefix("text_model.") if comp in TEXT_COMPONENTS else m["module"]
        part = "alpha" if m["alpha"] else "M" if m["mag"] else m["ab"]
        if (module, part) in seen:  # e.g. CLIP with and without text_model., old and new diffusers keys
            raise _twice(path, seen[module, part], file_key, f"{comp}.{module}.{_PART[part]}")
        seen[module, part] = file_key
        if m["alpha"]:
            alphas[module] = _scalar(path, file_key, t)
        elif m["mag"]:
            magnitudes[module] = t
        else:
            pairs[module][m["ab"]] = t
    if unknown:
        raise _unknown(path, unknown)
    if lone := next((mod for mod in magnitudes if mod not in pairs), None):
        raise ValueError(f"{path}: {seen[lone, 'M']} has no lora_A/lora_B beside it; the file is incomplete, "
                         "re-export it")
    layers: dict[str, Layer] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {comp}.{module} has lora_{''.join(ab)} without its partner; "
                             "the file is incomplete, re-export it")
        try:
            rank = ab["A"].shape[0] if ab["A"].ndim else 0  # a 0-d "matrix" fails in LoraFactors below
            layer = layers[f"{comp}.{module}"] = LoraFactors(ab["A"], ab["B"], alpha_of(module, rank, alphas.get(module)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: layer {comp}.{module}: {e}") from e
        # Every entry of up @ down (and of the update, scaled after the product) is a sum of `rank`
        # products: bounded by this. Only when the bound is past float32 is the update computed as
        # delta() computes it, to see whether it really overflows.
        bound = layer.rank * float(layer.up.abs().max()) * float(layer.down.abs().max()) * max(1.0, abs(layer.scale))
        if not bound < _F32_MAX and not torch.isfinite(layer.delta()).all():
            raise ValueError(f"{path}: layer {comp}.{module}: its weight update (up @ down * alpha / rank, alpha = "
                             f"{layer.alpha:g}) overflows float32 to inf; the adapter is broken: re-export it")
        if module in magnitudes:  # PEFT DoRA: one magnitude per output row
            layers[f"{comp}.{module}"] = _with(path, f"{comp}.{module}", DoraLayer.from_magnitude_vector, layer,
                                               magnitudes[module])
        if origins is not None:
            origins[f"{comp}.{module}"] = seen[module, "A"]
    return layers


def _config_alpha(config: Mapping[str, Any], module: str, rank: int) -> float:
    """alpha of one module as PEFT resolves it from LoraConfig kwargs (pattern keys match suffixes)."""
    alpha, patterns = float(config.get("lora_alpha", rank)), config.get("alpha_pattern") or {}
    if patterns:  # PEFT's own matcher; imported only when needed (peft pulls in transformers)
        from peft.utils.other import get_pattern_key

        alpha = float(patterns.get(get_pattern_key(list(patterns), module), alpha))
    # rsLoRA scales by alpha / sqrt(r): store the alpha that gives that scale as alpha / r.
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _from_diffusers(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    origins: dict[str, str] | None = None) -> dict[str, LoraFactors]:
    lora_meta = _json_meta(metadata, DIFFUSERS_META_KEY, path) or {}
    layers = {}
    for comp, sd in _split_components(path, tensors).items():
        config = {k.removeprefix(comp + "."): v for k, v in lora_meta.items() if k.startswith(comp + ".")}
        if comp in TEXT_COMPONENTS and isinstance(config.get("alpha_pattern"), dict):
            # Module names lose CLIP's `text_model.` level below (files differ in having it); PEFT's
            # patterns match name suffixes, so patterns must lose it too or they never match.
            config["alpha_pattern"] = {k.removeprefix("text_model."): v for k, v in config["alpha_pattern"].items()}
        for name, ok in (("lora_alpha", _finite),
                         ("alpha_pattern", lambda v: isinstance(v, dict) and all(map(_finite, v.values())))):
            if config.get(name) is not None and not ok(config[name]):
                raise ValueError(f"{path}: metadata {DIFFUSERS_META_KEY!r} has {comp}.{name} = "
                                 f"{repr(config[name])[:80]}, which must be "
                                 f"{'a number' if name == 'lora_alpha' else 'an object of numbers'} (finite, within "
                                 "float32's range); fix or delete that entry")
        for pattern in config.get("alpha_pattern") or {}:  # PEFT matches them as regular expressions
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"{path}: metadata {DIFFUSERS_META_KEY!r} has {comp}.alpha_pattern key "
                                 f"{pattern[:80]!r}, which is not a valid regular expression ({e}); fix or delete "
                                 "that entry") from None
        # diffusers' precedence: the LoraConfig metadata, else `.alpha` keys, else alpha = rank.
        layers |= _layers(path, comp, sd, lambda m, r, a, c=config: _config_alpha(c, m, r) if c else a or r, origins)
    return layers


def _kohya_groups(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {part: tensor}. Parts of layer types stylelora does not blend are refused by name."""
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unknown = []
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        if name.startswith(KOHYA_PREFIXES) and (part in _KOHYA_LORA_PARTS or part in PARTS):
            groups[name][part] = t
        elif name.startswith(KOHYA_PREFIXES) and part in UNSUPPORTED:
            raise _unsupported(path, key)
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(path, unknown)
    return groups


def _kohya_kind(path: Path, name: str, parts: Mapping[str, torch.Tensor]) -> str:
    """"lora", or the LyCORIS kind ("locon", "loha", "lokr", "full") the module's parts belong to."""
    kinds = {PARTS.get(p, "lora") for p in parts if p not in ("alpha", "dora_scale")}
    if kinds == {"lora", "locon"}:  # lora_down / lora_up around a CP core (lora_mid)
        kinds = {"locon"}
    if len(kinds) > 1:
        raise ValueError(f"{path}: {name} mixes the parts of different layer kinds ({', '.join(sorted(parts))}); "
                         "a layer has one kind: the file is damaged, re-export it")
    return kinds.pop() if kinds else "lora"


_SAI_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def _kohya_module(path: Path, name: str, file_key: str, sai_layers: int = 2) -> tuple[str, str]:
    """(component, module) of a kohya module name, by diffusers' converter. It is fed stand-in LoRA
    weights: only the name matters, and LyCORIS layers have no lora_down/lora_up to feed it. SDXL's
    SAI block names (input_blocks_4_1_...) are counted with `sai_layers` UNet layers per block."""
    from types import SimpleNamespace

    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    stand_in = torch.zeros(1, 1)
    sd = {f"{name}.lora_down.weight": stand_in, f"{name}.lora_up.weight": stand_in}
    try:  # diffusers' converter on names it may not know: whatever it trips on, the key is unknown
        if name.startswith(_SAI_BLOCKS):  # only the SDXL loader maps SAI blocks, given the block size
            converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
                sd, unet_config=SimpleNamespace(layers_per_block=sai_layers))
        else:
            converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(sd)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError, RuntimeError):
        raise _unknown(path, [file_key]) from None
    comps = {k.split(".", 1)[0] for k in converted}
    if len(comps) != 1 or (comp := comps.pop()) not in COMPONENTS:  # a name no component of ours has
        raise _unknown(path, [file_key])
    if not (m := _PEFT_KEY.match(_to_peft(comp, next(iter(converted)).split(".", 1)[1]))):
        raise _unknown(path, [file_key])
    return comp, m["module"].removeprefix("text_model.") if comp in TEXT_COMPONENTS else m["module"]


def _with(path: Path, key: str, make: Callable, *args):
    """make(*args), with its ValueError naming the file and the layer."""
    try:
        return make(*args)
    except ValueError as e:
        raise ValueError(f"{path}: layer {key}: {e}") from e


def _kohya_layer(path: Path, name: str, key: str, kind: str, parts: Mapping[str, torch.Tensor]) -> Layer:
    """One module's layer from its kohya-named parts. A missing or zero alpha means alpha = rank."""
    alpha = _scalar(path, f"{name}.alpha", parts["alpha"]) if "alpha" in parts else 0.0
    if kind == "lora":
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: {name} lacks lora_down or lora_up; the file is incomplete, re-export it")
        comp, module = key.split(".", 1)
        sd = {f"{module}.lora_{ab}.weight": (f"{name}.{part}", parts[part])
              for ab, part in (("A", "lora_down.weight"), ("B", "lora_up.weight"))}
        layer = _layers(path, comp, sd, lambda m, r, a: alpha or float(r))[key]
    else:
        layer = _with(path, key, from_kohya_parts, kind,
                      {p: t for p, t in parts.items() if p not in ("alpha", "dora_scale")}, alpha)
        # As for LoRA: the exact update is computed only when its cheap bound passes float32.
        if not layer.bound() < _F32_MAX and not torch.isfinite(layer.delta()).all():
            raise ValueError(f"{path}: layer {key}: its {kind} weight update (alpha = {layer.alpha:g}) overflows "
                             "float32 to inf; the adapter is broken: re-export it")
    if "dora_scale" in parts:
        layer = _with(path, key, DoraLayer.from_dora_scale, layer, parts["dora_scale"])
    return layer


def _from_kohya(path: Path, tensors: dict[str, torch.Tensor], origins: dict[str, str],
                metadata: Mapping[str, str]) -> dict[str, Layer]:
    """kohya / LyCORIS names -> ours through diffusers' converter, one module at a time so that each
    .alpha stays with its module. (0.42's own import keys .alpha under names matching no module, so
    mixed alphas collapse there.) SDXL's SAI block names are counted as the file's metadata says
    (stylelora's own files record it), else as SDXL's UNet has them."""
    sai_layers = _xl_layers_per_block(metadata)
    layers: dict[str, Layer] = {}
    for name, parts in _kohya_groups(path, tensors).items():
        kind = _kohya_kind(path, name, parts)
        weights = sorted(p for p in parts if p not in ("alpha", "dora_scale"))
        file_key = f"{name}.{weights[0] if weights else next(iter(parts))}"  # names the layer in messages
        comp, module = _kohya_module(path, name, file_key, sai_layers)
        key = f"{comp}.{module}"
        layer = _kohya_layer(path, name, key, kind, parts)
        if key in layers:  # e.g. lora_te_ and lora_te1_ spellings of one CLIP layer
            raise _twice(path, origins[key], file_key, f"{key}.lora_A" if kind == "lora" else key)
        layers[key], origins[key] = layer, file_key
    return layers


def _source_format(layers: Mapping[str, Layer], kohya: bool, version: str | None,
                   metadata: Mapping[str, str]) -> str:
    """What the file was, for inspect: stylelora / diffusers / kohya, or lycoris-<kinds>; +dora if any."""
    kinds = {layer.kind for layer in layers.values()}
    if not kohya:
        name = "stylelora" if version else "diffusers"
    elif kinds == {"lora"} and not metadata.get("ss_network_module", "").startswith("lycoris"):
        name = "kohya"
    else:  # LyCORIS calls LoRA on linear and conv layers alike LoCon
        name = "lycoris-" + "+".join(sorted({"locon" if k == "lora" else k for k in kinds}))
    return name + "+dora" if any(isinstance(layer, DoraLayer) for layer in layers.values()) else name


def load_adapter(path: str | os.PathLike, *, max_header_bytes: int = 100_000_000) -> Adapter:
    """Read a LoRA .safetensors: ours, diffusers/PEFT (any key vintage, or a save_lora_weights
    folder; DoRA too), kohya/A1111/Civitai, or LyCORIS (LoCon, LoHa, LoKr, full diffs, DoRA).
    Refuses pickles, corrupt headers, NaN/inf and unknown keys."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "pytorch_lora_weights.safetensors").is_file():
        path = path / "pytorch_lora_weights.safetensors"
    tensors, metadata = _read_checked(path, max_header_bytes)
    for key in JSON_KEYS:
        _json_meta(metadata, key, path)  # fail here, naming the key, not later in `inspect`
    version = metadata.get(PREFIX + "format_version")
    if version not in (None, FORMAT_VERSION):
        raise ValueError(f"{path} is stylelora adapter format {version!r}, this stylelora reads "
                         f"{FORMAT_VERSION!r}: upgrade stylelora")
    if not tensors:
        raise ValueError(f"{path} holds no tensors; it is not a LoRA adapter")
    if all(k.endswith(".alpha") for k in tensors):
        raise ValueError(f"no LoRA weights in {path}: it holds only alpha values ({', '.join(sorted(tensors)[:3])}"
                         f"{', ...' if len(tensors) > 3 else ''}), no lora_A/lora_B (or lora_down/lora_up) "
                         "weights; the file is incomplete: re-export it")
    kohya = {k: t for k, t in tensors.items() if k.startswith(KOHYA_PREFIXES)}
    other = {k: t for k, t in tensors.items() if k not in kohya}
    k_origins: dict[str, str] = {}
    d_origins: dict[str, str] = {}
    layers = _from_kohya(path, kohya, k_origins, metadata) if kohya else {}
    if other:
        d_layers = _from_diffusers(path, other, metadata, d_origins)
        if kohya:  # two conventions in one file (diffusers itself refuses it): never guess
            if same := sorted(set(layers) & set(d_layers)):
                raise _twice(path, k_origins[same[0]], d_origins[same[0]], f"{same[0]}.lora_A")
            raise ValueError(f"{path} mixes kohya keys ({next(iter(kohya))}) and diffusers/PEFT keys "
                             f"({next(iter(other))}); loaders read one convention per file: re-export it in one")
        layers = d_layers
    if not layers:
        raise ValueError(f"no LoRA weights in {path}; the file is incomplete: re-export it")
    order = _json_meta(metadata, PREFIX + "targets", path)
    if isinstance(order, list) and sorted(order) == sorted(layers):  # safetensors sorts keys; undo that
        layers = {k: layers[k] for k in order}
    return Adapter(layers=layers, metadata=metadata, path=path,
                   source_format=_source_format(layers, bool(kohya), version, metadata))


# --- pipelines --------------------------------------------------------------------------------

def adapter_from_pipeline(pipe, adapter_name: str = "default", *,
                          metadata: Mapping[str, str] | None = None) -> Adapter:
    """Snapshot the PEFT LoRA `adapter_name` of pipe.unet / pipe.text_encoder (copied to CPU). alpha is
    PEFT's per-layer lora_alpha (LoraConfig patterns resolved). Adds the base fingerprint and the
    base's kohya version entries (base_metadata) unless given."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.utils import get_peft_model_state_dict

    layers, seen = {}, set()
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        configs = getattr(model, "peft_config", None) or {}
        seen |= set(configs)
        if adapter_name not in configs:
            continue
        sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        for name, mod in model.named_modules():
            if not isinstance(mod, PeftLoraLayer) or adapter_name not in mod.lora_A:
                continue
            if mod.use_dora.get(adapter_name) or mod.lora_bias.get(adapter_name):
                raise ValueError(f"{comp}.{name}: DoRA / LoRA-bias adapters have no stylelora format; "
                                 "train a plain LoRA (use_dora=False, lora_bias=False)")
            r, alpha = mod.r[adapter_name], mod.lora_alpha[adapter_name]
            alpha = alpha * math.sqrt(r) if mod.use_rslora.get(adapter_name) else alpha
            down, up = (sd[f"{name}.lora_{ab}.weight"].detach().cpu().clone() for ab in "AB")
            layers[f"{comp}.{name.removeprefix('text_model.')}"] = LoraFactors(down, up, alpha)
    if not layers:
        raise ValueError(f"the pipeline has no LoRA adapter named {adapter_name!r} "
                         f"(adapters present: {sorted(seen) or 'none'})")
    meta = dict(metadata or {})
    if PREFIX + "base_fingerprint" not in meta:  # not setdefault: the fingerprint reads every layer
        meta[PREFIX + "base_fingerprint"] = fingerprint(pipe)
    meta = {**base_metadata(pipe), **meta}  # SD version, prediction type: kohya tools read them
    return Adapter(layers=layers, metadata=meta)


def resolve_module(pipe, key: str) -> torch.nn.Module | None:
    """The base module an adapter key adapts (PEFT wrapper unwrapped), or None if the base lacks it."""
    comp, module = _split(key)
    model = getattr(pipe, comp, None)
    for candidate in (module, "text_model." + module) if comp in TEXT_COMPONENTS else (module,):
        with contextlib.suppress(AttributeError):
            mod = model.get_submodule(candidate)  # AttributeError also when the pipe lacks `comp`
            return getattr(mod, "base_layer", mod)
    return None


def check_fits(adapter: Adapter, pipe) -> None:
    """ValueError at the first layer whose module the base lacks or whose weight shape differs; an SDXL
    adapter on an SD 1.x/2.x base (or the reverse) is said so first, in one message."""
    base = adapter.metadata.get(PREFIX + "base_name", "unknown")
    pipe_xl, adapter_xl = getattr(pipe, "text_encoder_2", None) is not None, _is_sdxl(adapter)
    version = adapter.metadata.get("ss_base_model_version", "")
    if adapter_xl and not pipe_xl:
        raise ValueError(f"{adapter.path or 'the adapter'} is an SDXL LoRA (its base: {base}) and this base is SD 1.x/"
                         "2.x: load it on an SDXL base (e.g. --base embedded-xl, or an SDXL folder or file)")
    if pipe_xl and (version.startswith("sd_v") or (not adapter_xl and not _fits_all(adapter, pipe))):
        raise ValueError(f"{adapter.path or 'the adapter'} is an SD 1.x/2.x LoRA (its base: {base}) and this base is "
                         "SDXL: load it on an SD 1.x/2.x base (e.g. --base embedded), or use an SDXL LoRA")
    for key, layer in adapter.layers.items():
        mod = resolve_module(pipe, key)
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise ValueError(f"adapter layer {key} has no matching module in this base model: the adapter "
                             f"was made for another architecture (its base: {base}); use a matching base")
        shape = tuple(mod.weight.shape)
        if not _fits(layer, shape):
            raise ValueError(f"adapter layer {key} does not fit this base model: the adapter's delta is "
                             f"{layer.shape} (out, in{'*kh*kw' if layer.flat else ''}) but the base weight is "
                             f"{shape}; the adapter was trained for a different base (its base: {base})")
        if isinstance(layer, DoraLayer) and (why := layer.mismatch(shape)):
            raise ValueError(f"adapter layer {key} does not fit this base model: {why}; the adapter was trained "
                             f"for a different base (its base: {base})")


def _fits_all(adapter: Adapter, pipe) -> bool:
    """Every layer has its module in `pipe`, of the right shape."""
    mods = {key: resolve_module(pipe, key) for key in adapter.layers}
    return all(isinstance(getattr(m, "weight", None), torch.Tensor) and _fits(adapter.layers[k], tuple(m.weight.shape))
               for k, m in mods.items())


def _fits(layer: Layer, shape: tuple[int, ...]) -> bool:
    """The layer's update has the base weight's shape; a flat one, its (out, in*kh*kw) flattening."""
    return layer.shape == shape or (layer.flat and len(layer.shape) == 2 and len(shape) > 2
                                    and layer.shape == (shape[0], math.prod(shape[1:])))


def fingerprint(pipe, samples: int = 16) -> str:
    """Short stable id of a base: names, shapes and a few evenly spaced values of every weight LoRA
    can target (Linear/Conv2d in unet and text encoder). Values are hashed at float16 precision, so
    a base and its fp16 release (the fp32 weights rounded) agree; a bf16 copy rounds differently and
    does not. PEFT wrappers and CLIP's `text_model.` level are ignored."""
    h = hashlib.sha256()
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        for name, mod in model.named_modules() if model is not None else ():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in name:
                continue  # PEFT's own lora_A/lora_B Linears are not the base
            w = mod.weight.detach().reshape(-1)
            # float64: float32 rounds n - 1 up past the last index once n > 2**24 (SD's big layers).
            idx = torch.linspace(0, w.numel() - 1, min(samples, w.numel()), dtype=torch.float64).long().to(w.device)
            vals = w[idx].to("cpu", torch.float16).view(torch.int16).tolist()
            name = name.removesuffix(".base_layer").removeprefix("text_model.")
            h.update(f"{comp}.{name}:{tuple(mod.weight.shape)}:{vals};".encode())
    return h.hexdigest()[:16]


def describe(adapter: Adapter) -> dict[str, Any]:
    """What `stylelora inspect` prints, as JSON-able values."""
    meta, path = adapter.metadata, adapter.path
    return {"path": str(path) if path else None, "format": adapter.source_format,
            "format_version": meta.get(PREFIX + "format_version"), "rank": adapter.rank, "alpha": adapter.alpha,
            "n_targets": len(adapter.layers), "targets": adapter.targets,
            "components": sorted(adapter.components), "base_name": meta.get(PREFIX + "base_name"),
            "base_fingerprint": meta.get(PREFIX + "base_fingerprint"), "trigger_words": adapter.trigger_words,
            "training": _json_meta(meta, PREFIX + "training", path) or {},
            "dataset": _json_meta(meta, PREFIX + "dataset", path) or {},
            "strength_map": read_map(meta, str(path)),  # strength -> raw scale; None: strength = raw scale
            "layer_kinds": dict(collections.Counter(l.kind + ("+dora" if isinstance(l, DoraLayer) else "")
                                                    for l in adapter.layers.values())),
            "nbytes": adapter.nbytes, "n_params": adapter.n_params}
