"""Load a base text-to-image pipeline: the embedded shapes-world models, a diffusers folder, or a
single-file (.safetensors) SD 1.x/2.x or SDXL checkpoint. Everything downstream sees one
StableDiffusionPipeline or StableDiffusionXLPipeline, whatever it came from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .fileio import PICKLE_SUFFIXES, atomic_path

EMBEDDED_DIR = Path(__file__).parent / "world" / "assets" / "base"
EMBEDDED_NAMES = ("embedded", "default", "shapes")
EMBEDDED_XL_DIR = EMBEDDED_DIR.with_name("base-xl")
EMBEDDED_XL_NAMES = ("embedded-xl", "shapes-xl")
# model_index.json's _class_name -> the pipeline class that loads it (img2img/inpaint folders hold the
# same components; they are loaded as text-to-image).
_PIPELINES = {"StableDiffusionPipeline": "StableDiffusionPipeline",
              "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
              "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
              "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline"}


def pick_device(device: str | None = None) -> torch.device:
    """'auto'/None -> cuda if present, else mps, else cpu. Anything else must exist here."""
    if device not in (None, "auto"):
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
        ok = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
        if not ok.get(dev.type, True):
            raise ValueError(f"device {device!r} is not available on this machine: use auto or cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Half precision only where it is fast and supported: CPU stays float32 unless asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)} or 'auto'")
    return names[dtype]


def base_name(spec: str | os.PathLike | None) -> str:
    """Human-readable name recorded in adapter metadata."""
    if spec is None or str(spec) in EMBEDDED_NAMES:
        return "stylelora-shapes-64"
    if str(spec) in EMBEDDED_XL_NAMES:
        return "stylelora-shapes-xl-64"
    return Path(spec).name


def is_xl(pipe) -> bool:
    """SDXL layout: a second text encoder whose pooled output conditions the UNet."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoders(pipe) -> dict[str, object]:
    """The pipeline's text encoders by component name: text_encoder, and text_encoder_2 on SDXL."""
    names = ("text_encoder", "text_encoder_2")
    return {n: m for n in names if (m := getattr(pipe, n, None)) is not None}


def pipeline_class(folder: str | os.PathLike):
    """The diffusers pipeline class for a folder's model_index.json, or one clear error."""
    import diffusers

    index = Path(folder) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{index} is not a readable diffusers model index ({e}); re-save the pipeline") from None
    if name not in _PIPELINES:
        raise ValueError(f"{folder} holds a {name} pipeline; stylelora loads Stable Diffusion 1.x/2.x "
                         "(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) bases")
    return getattr(diffusers, _PIPELINES[name])


def native_size(pipe) -> int:
    """The side in pixels the base was trained at (and generates by default): 64 for the embedded
    base, 512 for SD 1.5."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def load_base(spec: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
              device: str | None = "cpu", dtype: str | torch.dtype | None = None):
    """The base pipeline named by `spec`, offline.

    spec: None / "embedded" -> the packaged shapes-world base, "embedded-xl" its SDXL-architecture
    twin; a folder with model_index.json (diffusers layout, SD 1.x/2.x or SDXL); or a single
    .safetensors checkpoint, whose component configs come from `config` (a local diffusers folder
    of the same architecture, which also decides SD or SDXL) -- nothing is downloaded.
    """
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()  # tiny-model config notes are noise to a user
    dlogging.disable_progress_bar()  # "Loading pipeline components" bars on every load
    tlogging.disable_progress_bar()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if spec is None or str(spec) in EMBEDDED_NAMES + EMBEDDED_XL_NAMES:
        xl = spec is not None and str(spec) in EMBEDDED_XL_NAMES
        path = EMBEDDED_XL_DIR if xl else EMBEDDED_DIR
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"the embedded base is missing from {path}; rebuild it with "
                                    f"`stylelora world pretrain --stages {'unet-xl' if xl else 'judge,vae,unet'}`")
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"base model {path} does not exist: pass a diffusers folder, a "
                                ".safetensors checkpoint, or 'embedded'")
    if path.is_dir():
        pipe = _load_folder(path, dt)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle-based checkpoint, which can run code when loaded; "
                         "stylelora only loads .safetensors. Convert it to .safetensors first.")
    elif path.suffix.lower() == ".safetensors":
        if config is None:
            raise ValueError(f"single-file checkpoint {path} needs a local diffusers config folder of "
                             "the same architecture: pass config=DIR (CLI: --base-config DIR)")
        if not (Path(config) / "model_index.json").is_file():
            raise ValueError(f"config folder {config} is not a diffusers pipeline folder (no model_index.json): "
                             "pass the folder of a pipeline with the same architecture")
        cls = pipeline_class(config)
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dt, **_no_checker(cls))
    else:
        raise ValueError(f"don't know how to load base {path}: expected a diffusers folder or a .safetensors file")
    pipe.set_progress_bar_config(disable=True)
    if is_xl(pipe) and dt == torch.float16 and pipe.vae.config.get("force_upcast", True):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (NaN images, NaN latents)
    return pipe.to(dev)


def _no_checker(cls) -> dict:
    """SD 1.x pipelines take a safety checker (none here: offline, and not ours to impose); SDXL has none."""
    return {} if cls.__name__.endswith("XLPipeline") else {"safety_checker": None, "requires_safety_checker": False}


def _load_folder(path: Path, dt: torch.dtype):
    """A diffusers pipeline folder, safetensors weights only, in dtype `dt`."""
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    cls = pipeline_class(path)
    try:
        # use_safetensors=True: a folder holding only .bin weights would be unpickled otherwise.
        # A half-precision load goes through float32 first: diffusers' own cast reads every
        # float32 page of the memory-mapped files into RAM (SD1.5: +4 GB peak); float32 tensors
        # stay mapped but unread, and _cast_from_files reads them one at a time instead.
        load_dt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        pipe = cls.from_pretrained(path, local_files_only=True, dtype=load_dt, use_safetensors=True, **_no_checker(cls))
        if load_dt != dt:
            _cast_from_files(pipe, path, dt)
    except OSError as e:
        if any(path.rglob("*.bin")):
            raise ValueError(f"{path} holds pickle (.bin) weights, which can run code when loaded; "
                             "stylelora only loads .safetensors. Re-save the pipeline with "
                             "save_pretrained(..., safe_serialization=True).") from e
        raise ValueError(f"could not load the diffusers folder {path}: {e}") from e
    return pipe


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors$")


def _tensor_index(folder: Path) -> dict[str, tuple[Path, int, int, torch.dtype, list[int]]]:
    """name -> (file, start, end, dtype, shape) for the float tensors of a component folder's
    (non-variant) .safetensors files, read from their JSON headers."""
    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        if not _WEIGHT_FILE.match(file.name):
            continue  # a variant (model.fp16.safetensors) that diffusers did not load
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in _SAFETENSORS_DTYPES:
                start, end = info["data_offsets"]
                index[name] = (file, 8 + n + start, 8 + n + end, _SAFETENSORS_DTYPES[info["dtype"]], info["shape"])
    return index


def _cast_from_files(pipe, path: Path, dtype: torch.dtype) -> None:
    """Cast a float32-loaded (memory-mapped, unread) pipeline to `dtype`, reading each tensor from
    its file with plain reads: the page cache holds the bytes, not this process, so peak memory is
    the half-precision model plus one float32 tensor. Tensors not found by name (a library renamed
    them on load) fall back to an ordinary cast. Equal bit for bit to diffusers' dtype= load (tested)."""
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        index = _tensor_index(path / comp)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            entry = index.get(name)
            if entry is None or list(t.shape) != entry[4]:
                t.data = t.data.to(dtype)
                continue
            file, start, end, file_dtype, shape = entry
            raw = bytearray(end - start)
            with open(file, "rb") as f:
                f.seek(start)
                f.readinto(raw)
            t.data = (torch.frombuffer(raw, dtype=file_dtype) if raw else torch.empty(0, dtype=file_dtype)
                      ).reshape(shape).to(dtype)
        model.to(dtype)  # anything left (and the model's own dtype bookkeeping)


# --- single-file export: diffusers names -> the original (LDM) checkpoint names ----------------
# diffusers ships only the other direction (used by from_single_file), which makes it the oracle
# for this table: tests export, load back through from_single_file and compare every tensor.

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def _unet_key(k: str, layers: int) -> str:
    p = k.split(".")
    per = layers + 1  # LDM counts a level's resnets plus its down/upsampler
    if p[0] == "time_embedding":
        return "time_embed." + {"linear_1": "0", "linear_2": "2"}[p[1]] + "." + ".".join(p[2:])
    if p[0] == "add_embedding":  # SDXL's text_time embedding (kohya: label_emb)
        return "label_emb.0." + {"linear_1": "0", "linear_2": "2"}[p[1]] + "." + ".".join(p[2:])
    if p[0] == "conv_in":
        return "input_blocks.0.0." + ".".join(p[1:])
    if p[0] == "conv_norm_out":
        return "out.0." + ".".join(p[1:])
    if p[0] == "conv_out":
        return "out.2." + ".".join(p[1:])
    rest = ".".join(p[4:])
    if p[0] == "down_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{per * (i + 1)}.0.op." + ".".join(p[5:])
        j = int(p[3])
        slot = 0 if kind == "resnets" else 1
        rest = _sub(rest, _RESNET) if kind == "resnets" else rest
        return f"input_blocks.{per * i + j + 1}.{slot}.{rest}"
    if p[0] == "mid_block":  # mid_block.{resnets|attentions}.j.rest
        kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
        slot = 1 if kind == "attentions" else 2 * j
        rest = _sub(rest, _RESNET) if kind == "resnets" else rest
        return f"middle_block.{slot}.{rest}"
    if p[0] == "up_blocks":
        raise AssertionError("up blocks are mapped in _unet_to_ldm")
    raise ValueError(f"unexpected UNet key {k}")


def ldm_unet_module(module: str, layers: int) -> str:
    """A diffusers UNet module path as the original (LDM/SAI) checkpoint names it, e.g. SDXL's
    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in: the names kohya's SDXL LoRA keys
    are built from. `layers` is the UNet's layers_per_block (SDXL: 2)."""
    p = module.split(".")
    if p[0] != "up_blocks" or p[2] not in ("attentions", "resnets"):
        return _unet_key(module, layers)
    i, j, rest = int(p[1]), int(p[3]), ".".join(p[4:])
    rest = _sub(rest, _RESNET) if p[2] == "resnets" else rest
    return f"output_blocks.{(layers + 1) * i + j}.{0 if p[2] == 'resnets' else 1}.{rest}"


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    layers = unet.config.layers_per_block
    out = {}
    sd = unet.state_dict()
    has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "upsamplers":  # the upsampler follows the level's last resnet (and attention)
                slot = 2 if i in has_attn else 1
                name = f"output_blocks.{(layers + 1) * i + layers}.{slot}." + ".".join(p[4:])
            else:
                j = int(p[3])
                rest = ".".join(p[4:])
                rest = _sub(rest, _RESNET) if kind == "resnets" else rest
                name = f"output_blocks.{(layers + 1) * i + j}.{0 if kind == 'resnets' else 1}.{rest}"
        else:
            name = _unet_key(k, layers)
        out["model.diffusion_model." + name] = v
    return out


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    out = {}
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        p = k.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            name = k
        else:
            coder, rest = p[0], p[1:]
            if rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1]) if rest[0] == "down_blocks" else n - 1 - int(rest[1])
                level = "down" if rest[0] == "down_blocks" else "up"
                if rest[2] == "resnets":
                    tail = f"block.{rest[3]}." + _sub(".".join(rest[4:]), {"conv_shortcut": "nin_shortcut"})
                else:  # downsamplers.0.conv / upsamplers.0.conv
                    tail = ("downsample." if level == "down" else "upsample.") + ".".join(rest[4:])
                name = f"{coder}.{level}.{i}.{tail}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    name = f"{coder}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:])
                else:
                    name = f"{coder}.mid.attn_1." + _sub(".".join(rest[3:]), _VAE_ATTN)
                    if v.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                        v = v[:, :, None, None]
            else:
                name = f"{coder}." + _sub(".".join(rest), {"conv_norm_out": "norm_out"})
        out["first_stage_model." + name] = v
    return out


def _clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under `prefix` with its `text_model.` level (SD 1.x's
    cond_stage_model.transformer., SDXL's conditioner.embedders.0.transformer.)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
        out[prefix + k] = v
    return out


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _open_clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder in the OpenCLIP layout its original checkpoint uses: fused q/k/v
    (attn.in_proj_*), resblocks, ln_final, and text_projection as a (width, proj) matrix."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "text_projection": sd.pop("text_projection.weight").T}
    sd.pop("embeddings.position_ids", None)
    for k in [k for k in sd if ".self_attn.q_proj." in k]:
        i, kind = k.split(".")[2], k.rsplit(".", 1)[1]  # encoder.layers.{i}.self_attn.q_proj.{weight|bias}
        qkv = [sd.pop(k.replace("q_proj", x)) for x in ("q_proj", "k_proj", "v_proj")]
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
    for k, v in sd.items():
        if k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = v
        else:  # encoder.layers.{i}.<module>.<param>
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            out[f"transformer.resblocks.{i}." + _sub(rest, _OPEN_CLIP)] = v
    return {prefix + k: v for k, v in out.items()}


def save_single_file(pipe, path: str | os.PathLike) -> Path:
    """Write the pipeline as one original-layout .safetensors checkpoint (atomic): SD 1.x/2.x's
    cond_stage_model, or SDXL's two conditioner.embedders."""
    from safetensors.torch import save_file

    sd = {**_unet_to_ldm(pipe.unet), **_vae_to_ldm(pipe.vae)}
    if is_xl(pipe):
        sd |= _clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        sd |= _open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    else:
        sd |= _clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer.")
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    return Path(path)
