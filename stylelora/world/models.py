"""Architectures of the embedded base (diffusers/transformers classes, tiny configs) and the judge.

The base is an ordinary StableDiffusionPipeline, only small: 64x64 images, an 8x VAE to
8x8x4 latents, a 2-level cross-attention UNet and a 2-layer CLIP text encoder. Nothing in
stylelora special-cases it, so code that works on it works on SD 1.x/2.x.

The XL base is an ordinary StableDiffusionXLPipeline of the same size: the same VAE, two text
encoders (CLIP-L-like, and a bigG-like one with a projection whose pooled output conditions the
UNet), SDXL's penultimate-layer embeddings concatenated, and `text_time` micro-conditioning.
"""

from __future__ import annotations

import torch
from torch import nn

from .render import COLORS, PALETTES, SHAPES, TECHNIQUES

RESOLUTION = 64
TEXT_DIM = 64
# Hidden sizes of the XL base's two text encoders: concatenated they are TEXT_DIM; unequal, as in SDXL
# (768, 1280), since diffusers' single-file loader tells the two apart by width.
XL_TEXT_DIMS = (24, 40)
XL_POOLED_DIM = 32  # text_encoder_2's projection: the pooled embedding
XL_TIME_DIM = 16  # Fourier features per micro-conditioning number (SDXL: 256)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: 64 px -> 8x8 latents
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def make_text_encoder(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def make_text_encoders_xl(vocab_size: int, bos_id: int, eos_id: int):
    """(text_encoder, text_encoder_2) as in SDXL: CLIP-L's role and OpenCLIP bigG's (with projection).
    SDXL reads the penultimate layer of both, so each has 3 layers where the SD1 encoder has 2."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                              projection_dim=XL_POOLED_DIM, bos_token_id=bos_id, eos_token_id=eos_id,
                              pad_token_id=eos_id)

    return CLIPTextModel(config(XL_TEXT_DIMS[0])), CLIPTextModelWithProjection(config(XL_TEXT_DIMS[1]))


def make_unet_xl():
    """The SD1 UNet's blocks with SDXL's conditioning: cross-attention over both encoders'
    concatenated embeddings, linear attention projections, and the `text_time` embedding of the
    pooled text plus (original size, crop offset, target size)."""
    return make_unet(cross_attention_dim=sum(XL_TEXT_DIMS), use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=XL_TIME_DIM,
                     projection_class_embeddings_input_dim=XL_POOLED_DIM + 6 * XL_TIME_DIM)


def make_unet(**xl):
    """The SD base's UNet; `xl` adds SDXL's conditioning (make_unet_xl)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**dict(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    ), **xl})


def make_schedulers():
    """Training noise schedule (DDPM) and the pipeline's sampler (DPM++ 2M), same betas as SD."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)
    return DDPMScheduler(clip_sample=False, **common), DPMSolverMultistepScheduler(**common)


class Judge(nn.Module):
    """Multi-head CNN over 64x64 renders: shape, colour, palette style, technique style."""

    HEADS = {"shape": SHAPES, "color": tuple(COLORS), "palette": PALETTES, "technique": TECHNIQUES}

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        w = width
        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        # (B, 4w, 4, 4) -> keep coarse layout: shape needs where things are, not just what
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 4, len(v)) for k, v in self.HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1] -> logits per head."""
        h = self.pool(self.features(x)).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}
