"""Where LoRA goes and how it is injected (PEFT does the injecting).

Targets are resolved to exact module paths of the model at hand, so the same preset works on
the embedded base and on SD 1.x/2.x, and an adapter file lists exactly what it changed.
"""

from __future__ import annotations

import re

from torch import nn

from .config import TEXT_ENCODER_PATTERN, UNET_PRESETS  # noqa: F401 - the presets live torch-free


def find_targets(model: nn.Module, patterns: tuple[str, ...] | str) -> list[str]:
    """Full paths of the nn.Linear modules whose names end with one of `patterns`."""
    patterns = (patterns,) if isinstance(patterns, str) else patterns
    rx = re.compile(r"(^|\.)(" + "|".join(patterns) + r")$")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(n)]


def unet_targets(unet: nn.Module, preset: str) -> list[str]:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown target preset {preset!r}: use one of {sorted(UNET_PRESETS)}")
    return find_targets(unet, UNET_PRESETS[preset])


def text_encoder_targets(text_encoder: nn.Module) -> list[str]:
    return find_targets(text_encoder, TEXT_ENCODER_PATTERN)


def check_rank(model: nn.Module, targets: list[str], rank: int) -> None:
    """A rank above a layer's smaller side cannot add capacity, only waste: refuse it early."""
    modules = dict(model.named_modules())
    for name in targets:
        layer = modules[name]
        limit = min(layer.in_features, layer.out_features)
        if rank > limit:
            raise ValueError(f"rank {rank} is larger than layer {name} allows ({layer.out_features}x"
                             f"{layer.in_features}, at most {limit}): choose --rank {limit} or less")


def inject(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
           adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a trainable LoRA to `targets` of `model` (diffusers or transformers model) with PEFT.
    B starts at zero, so the model is unchanged until training moves it. Returns the LoRA params."""
    from peft import LoraConfig

    check_rank(model, targets, rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights="gaussian")
    model.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in model.named_parameters() if "lora_" in n and adapter_name in n]
    for p in params:
        p.requires_grad_(True)
    return params
