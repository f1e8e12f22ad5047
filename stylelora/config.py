"""Settings without torch: TrainConfig (and its TOML file and --flags), LoRA target presets and
generation defaults. `stylelora --help` and `stylelora train --help` read only this module, so they
print before torch would have finished importing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

# Generation: the defaults of the CLI, the UI, evaluation and training's sample grids.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
# How stacked adapters combine (stylelora/blend.py); the first is the default.
MODES = ("merge", "balanced", "switch", "composite")
MODE_HELP = ("merge (default): fused weighted sum; balanced: the same sum with each of N active adapters at its scale "
             "x N^(-0.1), 0.93 for two (one adapter: merge); switch: one adapter per step; composite: per-step "
             "average of each adapter's guided prediction")
# What generation accepts (check_generation): sampling steps 1..MAX_STEPS (schedulers have 1000
# training timesteps), guidance 0..MAX_GUIDANCE (diffusers guides only above 1: 0 to 1 all give the
# unguided image; past ~30 images burn out, and inf is a black image), seeds 0..MAX_SEED.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1
# The names of the embedded base (base.EMBEDDED_NAMES; repeated here, as base.py imports torch).
EMBEDDED_BASE_NAMES = ("embedded", "default", "shapes")
EMBEDDED_XL_NAMES = ("embedded-xl", "shapes-xl")  # its SDXL-architecture twin (base.EMBEDDED_XL_NAMES)


def check_generation(*, steps=None, guidance=None, seed=None, prefix: str = "") -> None:
    """ValueError naming the first out-of-range generation setting (None = not given) and its range.
    `prefix` is put before the names: "--" for the CLI's flags. Used by the CLI, generate_images,
    evaluate and AdapterStack.generate, so every way in refuses the same values."""
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if steps is not None and not (whole(steps) and 1 <= steps <= MAX_STEPS):
        raise ValueError(f"{prefix}steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if guidance is not None and not (isinstance(guidance, (int, float)) and 0 <= guidance <= MAX_GUIDANCE):
        raise ValueError(f"{prefix}guidance must be a number from 0 to {MAX_GUIDANCE:g} (at most 1 = no "
                         f"guidance; {DEFAULT_GUIDANCE:g} is the default), got {guidance!r}")
    if seed is not None and not (whole(seed) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"{prefix}seed must be a whole number from 0 to 2**63-1 ({MAX_SEED}), got {seed!r}")

# Suffixes of nn.Linear modules per preset. Cross-attention (attn2) is where text meets image:
# the classic place for a style adapter, and the smallest set that learns one.
UNET_PRESETS = {
    "cross-attn": (r"attn2\.(to_q|to_k|to_v|to_out\.0)",),
    "attn": (r"attn[12]\.(to_q|to_k|to_v|to_out\.0)",),
    "attn-ff": (r"attn[12]\.(to_q|to_k|to_v|to_out\.0)", r"ff\.net\.(0\.proj|2)"),
}
TEXT_ENCODER_PATTERN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"

OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")


def _opt(default, help: str):
    """A TrainConfig field with its --help text (the CLI reads it from the field's metadata)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. CLI flags and TOML keys are generated from these fields."""

    dataset: str = _opt("", "folder of images with same-stem captions (or a metadata.jsonl)")
    out: str = _opt("adapter.safetensors", "the adapter file to write; the run folder sits beside it")
    base: str | None = _opt(None, "base model: unset = the embedded base; embedded-xl (its SDXL twin), a diffusers "
                                  "folder or a .safetensors file")
    base_config: str | None = _opt(None, "a diffusers folder with the configs of a single-file --base")
    # data
    caption_ext: str = _opt(".txt", "extension of the caption file next to each image")
    trigger: str | None = _opt(None, "word(s) put first in every caption that lacks them; the adapter's trigger")
    shuffle_captions: bool = _opt(False, "shuffle comma-separated caption tags every time (turns off the text cache)")
    keep_tokens: int = _opt(0, "with --shuffle-captions: keep the first N tags in place")
    # Train on the empty caption this often: the adapter then also styles the unconditional branch
    # of classifier-free guidance, which otherwise pulls the style back out. Measured on the example
    # styles (README, bench/styles.py, at lr 1e-3): hit at 1.0 pastel 85 -> 100%, dots 89 -> 94%, stripes 78 -> 86%.
    caption_dropout: float = _opt(0.1, "fraction of samples trained on the empty caption")
    resolution: int | None = _opt(None, "training size in pixels (multiple of 8); unset = the base's native size")
    bucket: bool = _opt(True, "aspect-ratio buckets for images of mixed shapes (off: square crops)")
    random_crop: bool = _opt(False, "random instead of center crops (turns off the latent cache)")
    flip: bool = _opt(False, "random horizontal flips (turns off the latent cache)")
    # Masked loss, as kohya's --masked_loss / alpha_mask: a gray mask per image weights the loss per
    # latent pixel, so a style can be learnt from part of an image. Sources and checks: data.find_masks.
    masked_loss: bool = _opt(False, "weight the loss per pixel by a mask (white = learn, black = ignore, gray "
                                    "weights): a same-stem grayscale image in the mask folder, else the image's "
                                    "alpha channel; an image with neither is an error")
    mask_dir: str | None = _opt(None, "with --masked-loss: the folder of masks, laid out like the dataset (same "
                                      "relative path and stem, any image type); unset = DATASET/masks")
    # LoRA
    # attn-ff (self- and cross-attention and feed-forward) rather than cross-attention alone: as good
    # alone and it stacks (docs/stacking.md: both styles seen on 63-83% of prompts instead of 19-56%).
    targets: str = _opt("attn-ff", "UNet layers that get LoRA: attn-ff (default: self- and cross-attention + "
                                   "feed-forward) | attn | cross-attn")
    rank: int = _opt(4, "LoRA rank")
    alpha: float | None = _opt(None, "LoRA alpha; the update is scaled by alpha / rank; unset = rank (scale 1)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA branch")
    train_text_encoder: bool = _opt(True, "also put LoRA on the text encoder's q/k/v/out projections")
    # optimisation
    # 500 steps of 24 images (8 x 3 accumulated) see as many images as the earlier 1500 x 8, in a third
    # of the optimizer steps with a third of the gradient noise, and stack far better: merged at 1.0 /
    # 1.0 they keep the shape on 83-89% of held-out prompts where 1500 x 8 kept 69-85% (docs/stacking.md).
    # Accumulated rather than batch 24, so a GPU needs no more memory than before.
    steps: int = _opt(500, "optimizer steps")
    batch_size: int = _opt(8, "images per micro-batch and process (a step sees batch_size x grad_accum x processes)")
    grad_accum: int = _opt(3, "gradient accumulation: batches per optimizer step")
    # measured on the example styles: stripes 86 -> 90% hit at 1.0 (README)
    lr: float = _opt(2e-3, "learning rate of the UNet LoRA")
    te_lr: float | None = _opt(None, "learning rate of the text-encoder LoRA; unset = lr / 2")
    optimizer: str = _opt("adamw", "adamw | adamw8bit (needs bitsandbytes)")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    lr_schedule: str = _opt("cosine", "constant | linear | cosine decay over the whole run (times the warm-up ramp)")
    warmup_steps: int = _opt(50, "linear learning-rate warm-up steps")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = no clipping)")
    min_snr_gamma: float | None = _opt(5.0, "min-SNR-gamma loss weighting; 0 = plain MSE")
    # Prior preservation without class images: each batch's captions with the trigger words
    # removed must give the frozen base's prediction, so the style stays behind its trigger and
    # classifier-free guidance amplifies it. Off by default: on the example technique styles it
    # over-amplifies at scale 1 (content breaks), and a step costs ~1.7x. See the README.
    preserve_weight: float = _opt(0.0, "weight of the prior-preservation term (kohya's prior_loss_weight); "
                                       "0 = off; needs trigger words")
    # Graded strength: on this fraction of micro-batches the LoRA runs at a random strength s in (0, 1)
    # and learns s x the data's target + (1 - s) x the frozen base's prediction, so that a scale of 0.5
    # means half the style instead of (measured without it) nothing until ~0.75. 0 = off.
    graded_strength: float = _opt(0.0, "fraction of micro-batches trained at a random strength s toward "
                                       "s x data target + (1 - s) x base prediction (0 = off)")
    calibrate_strength: bool = _opt(True, "when training ends, measure how much style each raw scale shows and "
                                          "store the map strength -> raw scale in the file (embedded base: a few s)")
    noise_offset: float = _opt(0.0, "noise offset (darker darks, brighter brights); 0.05-0.1 is typical")
    mixed_precision: str = _opt("no", "no | fp16 | bf16: frozen weights in half precision, LoRA in float32")
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in the backward pass: less memory, slower")
    cache: bool = _opt(True, "cache latents / text embeddings where that is exact")
    seed: int = _opt(0, "random seed (same seed, same data, same adapter)")
    device: str = _opt("auto", "auto | cpu | cuda | mps (pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)")
    # outputs
    run_dir: str | None = _opt(None, "folder for the loss log, samples and checkpoints; unset = OUT without "
                                     ".safetensors + .run")
    log_every: int = _opt(10, "steps between loss-log rows")
    sample_every: int = _opt(250, "steps between sample grids (0 = never)")
    checkpoint_every: int = _opt(100, "steps between checkpoints of the full training state (0 = never)")
    keep_checkpoints: int = _opt(2, "checkpoints kept (older ones are deleted)")
    resume: str | None = _opt(None, "continue from a checkpoint folder, or a run folder's latest checkpoint")
    progress: bool = _opt(True, "show a progress bar")
    sample_prompts: list[str] = field(default_factory=list, metadata={
        "help": "a prompt for the sample grids (repeatable); none = the dataset's first captions"})

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        _check_types(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value),
                 f"{f.name} must be a finite number, got {value}")
        need(self.rank > 0, f"rank must be a positive integer, got {self.rank}: try --rank 4")
        need(self.alpha is None or self.alpha > 0, f"alpha must be positive, got {self.alpha}")
        need(self.lr > 0, f"learning rate must be positive, got {self.lr}: try --lr 2e-3")
        need(self.te_lr is None or self.te_lr > 0, f"te_lr must be positive, got {self.te_lr}")
        need(self.steps > 0, f"steps must be positive, got {self.steps}")
        need(self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive")
        need(self.resolution is None or (self.resolution > 0 and self.resolution % 8 == 0),
             f"resolution must be a positive multiple of 8, got {self.resolution}: try "
             f"{max(8, round((self.resolution or 64) / 8) * 8)}")
        need(0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.keep_tokens >= 0, f"keep_tokens must be >= 0, got {self.keep_tokens}")
        need(self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} unknown: use one of {OPTIMIZERS}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule {self.lr_schedule!r} unknown: use one of {SCHEDULES}")
        need(self.mixed_precision in PRECISIONS,
             f"mixed_precision {self.mixed_precision!r} unknown: use one of {PRECISIONS}")
        need(self.min_snr_gamma is None or self.min_snr_gamma >= 0,
             f"min_snr_gamma must be >= 0 (0 = off, the flag's way to say None), got {self.min_snr_gamma}")
        need(0 <= self.graded_strength <= 1, f"graded_strength must be in [0, 1] (0 = off), got {self.graded_strength}")
        need(self.preserve_weight >= 0, f"preserve_weight must be >= 0 (0 = off), got {self.preserve_weight}")
        need(self.device in ("auto", "cpu", "cuda", "mps"), f"device {self.device!r} unknown: use auto, cpu, cuda "
             "or mps (to pick GPUs, set CUDA_VISIBLE_DEVICES or use accelerate launch --gpu_ids)")
        need(self.log_every > 0, f"log_every must be positive, got {self.log_every}: try 10")
        for name in ("sample_every", "checkpoint_every", "warmup_steps", "weight_decay", "max_grad_norm"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        # Added to unit-variance noise: past 1 the offset outweighs the noise the model learnt to remove.
        need(0 <= self.noise_offset <= 1, f"noise_offset must be from 0 to 1 (0.05-0.1 is typical), "
             f"got {self.noise_offset:g}")
        need(0 <= self.seed <= MAX_SEED, f"seed must be a whole number from 0 to 2**63-1, got {self.seed}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints} "
             "(0 would delete each checkpoint as it is written): use checkpoint_every = 0 for none")
        need(self.targets in UNET_PRESETS, f"targets {self.targets!r} unknown: use one of {sorted(UNET_PRESETS)}")
        need(str(self.out).endswith(".safetensors"), f"out must end in .safetensors, got {self.out!r}")
        need(self.mask_dir is None or self.masked_loss, f"mask_dir ({self.mask_dir}) is set but masked_loss is off: "
             "add --masked-loss (or drop --mask-dir)")

    @property
    def effective_alpha(self) -> float:
        """The LoRA alpha the run uses: `alpha`, or the rank when unset (scale alpha / rank = 1)."""
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(str(self.out)[: -len(".safetensors")] + ".run")

    def summary(self) -> dict:
        """What goes into the adapter's metadata and checkpoints: reproducible settings, no local
        paths (the dataset and base by name only: the folder's or file's name, or "embedded")."""
        # mask_dir: a local path; which masks trained is in the dataset fingerprint (checkpoints).
        skip = {"out", "run_dir", "resume", "progress", "device", "sample_prompts", "base_config", "mask_dir"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        out["dataset"] = _name_only(self.dataset)
        out["base"] = ("embedded" if self.base is None or self.base in EMBEDDED_BASE_NAMES else
                       "embedded-xl" if self.base in EMBEDDED_XL_NAMES else _name_only(self.base))
        return out


def _name_only(path: str) -> str:
    """A path's last component ("." and "../x" resolved first, so a name is always there)."""
    if not path:
        return ""
    p = Path(path)
    return p.name if p.name not in ("", ".", "..") else Path(os.path.abspath(p)).name


def _check_types(cfg: TrainConfig) -> None:
    """A TOML file can give any field any type: name the field and what it takes (instead of a
    bare TypeError from the first comparison). Paths are accepted for strings and made strings."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        base = list if typing.get_origin(kind) is list else next((a for a in args if a is not type(None)), kind)
        if value is None and optional:
            continue
        if base is str and isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(cfg, f.name, value)
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str),
              list: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}[base](value)
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                    list: "a list of strings"}[base]
            raise ValueError(f"{f.name} must be {what}{' (or unset)' if optional else ''}, got {value!r} "
                             f"({type(value).__name__})")


def load_toml(path: str | os.PathLike) -> dict:
    """Read a TOML config; unknown keys are an error naming them."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {e.start}): re-save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    if isinstance(data.get("train"), dict):  # a [train] table, or top-level keys, not both
        if outside := sorted(set(data) - {"train"}):
            raise ValueError(f"{path} has key(s) {outside} outside its [train] table, where they would be "
                             "ignored: move them into [train] (or drop the [train] header)")
        data = data["train"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {path}; known keys are the TrainConfig fields: "
                         f"{', '.join(sorted(known))}")
    return data


def add_config_flags(p: argparse.ArgumentParser, config_cls, skip=()) -> None:
    """One --flag per dataclass field (type from the annotation, help from the field's metadata),
    with default SUPPRESS so only flags the user typed override the TOML file and the defaults."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_text = f.metadata.get("help", "")
        if typing.get_origin(kind) is list or base is list:
            p.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text)
            continue
        if f.default is not None:  # an unset default is explained by the help text itself
            help_text = f"{help_text} (default: {f.default})".strip()
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, type=base, default=argparse.SUPPRESS, help=help_text)
