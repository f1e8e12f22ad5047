"""Stack LoRA adapters on one base pipeline: scale them per adapter / component / UNet block, fuse
them into the base weights, or compose them per denoising step; and merge several into one file.

Merge mode writes, for every targeted layer, W = W0 + sum_i s_i * (alpha_i / r_i) * B_i @ A_i into
the plain nn.Linear / Conv2d weight, so a blended pipeline costs exactly what the base costs (no
PEFT wrappers in the forward pass). LyCORIS (LoCon with a CP core, LoHa, LoKr, full) and DoRA layers
enter that sum as their exact dense update s_i * dW_i (lycoris.py); DoRA's dW is computed once, when
the adapter is added, against this stack's W0. W0 is copied for targeted layers only; a layer is
rewritten only when its list of (adapter, coefficient) terms changed, and adapters at scale 0 never enter
that list, so loaded-but-inactive adapters cost nothing.

merge is the default. balanced is that merge with every active adapter's scale times
N ** (-BALANCE_EXPONENT), N the number of active adapters: one adapter is plain merge bit for bit; two
sit at 0.93 each. It was the default while adapters trained for 1500 steps of batch 8: summed at full
strength those overshoot (styles seen, shapes and colours lost: docs/stacking.md). Adapters of the
current defaults (500 steps of 24 images) keep shapes summed at 1.0 / 1.0, and turning them down loses
more style than it saves shape, so merge became the default again. The exponent was 1/3 while every
adapter trained from one seed's LoRA init (their updates then shared a part a sum counts twice); 0.1
was chosen on prompts from the pretraining combinations, not the held-out ones.

switch / composite (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation") intercept
only the UNet call of the unchanged diffusers pipeline (its scheduler, guidance and decoding all
stay its own): with one adapter they are the merge result bit for bit, and no denoising loop is
copied here that could drift from diffusers.
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from .adapters import (Adapter, Layer, LoraFactors, check_fits, common_base_metadata, load_adapter, needs_base,
                       resolve_module, stylelora_metadata)
from .config import MODES
from .strength import read_map, to_raw

BLOCKS = ("down", "mid", "up")
_BLOCK_OF = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def block_of(key: str) -> str | None:
    """'down' / 'mid' / 'up' for UNet layers inside those blocks, else None (conv_in, text encoder)."""
    comp, _, module = key.partition(".")
    return _BLOCK_OF.get(module.split(".")[0]) if comp == "unet" else None


@dataclass
class Scale:
    """How strongly one adapter acts. A number s means Scale(unet=s, text_encoder=s); `blocks`
    multiplies the UNet scale per block, e.g. {"up": 0.5}. Missing entries are 1."""

    unet: float = 1.0
    text_encoder: float = 1.0
    blocks: dict[str, float] = field(default_factory=dict)
    raw: bool = False  # True: unet / text_encoder are raw LoRA scales, not strengths (see strength.py)

    def __post_init__(self):
        if unknown := set(self.blocks) - set(BLOCKS):
            raise ValueError(f"unknown UNet block(s) {sorted(unknown)} in scales: use {list(BLOCKS)}")
        self.unet, self.text_encoder = float(self.unet), float(self.text_encoder)
        self.blocks = {b: float(v) for b, v in self.blocks.items()}
        if not all(map(math.isfinite, (self.unet, self.text_encoder, *self.blocks.values()))):
            raise ValueError(f"adapter scales must be finite numbers, got unet={self.unet}, text_encoder="
                             f"{self.text_encoder}, blocks={self.blocks}: use values like 0.8")

    @classmethod
    def parse(cls, value: Any) -> Scale:
        if isinstance(value, Scale):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
            return cls(value, value)
        if isinstance(value, Mapping) and not set(value) - {"unet", "text_encoder", "blocks", "raw"}:
            return cls(value.get("unet", 1.0), value.get("text_encoder", 1.0), dict(value.get("blocks") or {}),
                       bool(value.get("raw", False)))
        raise ValueError(f"bad adapter scale {value!r}: give a number or a dict with keys unet, "
                         "text_encoder, blocks, raw (e.g. {'unet': 1.0, 'text_encoder': 0.5, 'blocks': {'up': 0.5}})")

    @property
    def active(self) -> bool:
        return self.unet != 0 or self.text_encoder != 0

    def of(self, key: str) -> float:
        """The scale of one layer (its component's scale times its block's multiplier)."""
        if not key.startswith("unet."):  # text_encoder., and SDXL's text_encoder_2.
            return self.text_encoder
        return self.unet * self.blocks.get(block_of(key), 1.0)

    def times(self, s: float) -> Scale:
        return Scale(self.unet * s, self.text_encoder * s, dict(self.blocks), self.raw)

    def to_raw(self, points: list[list[float]] | None) -> Scale:
        """These strengths as raw LoRA scales through an adapter's strength map (strength.py)."""
        if self.raw or not points:
            return self
        return Scale(to_raw(points, self.unet), to_raw(points, self.text_encoder), dict(self.blocks), True)

    def diffusers(self) -> dict[str, Any]:
        """The same scales as one entry of diffusers' `set_adapters(names, weights)`. Note that
        diffusers applies block scales to attention layers only; here they cover the whole block."""
        unet = {b: self.unet * self.blocks.get(b, 1.0) for b in BLOCKS} if self.blocks else self.unet
        return {"unet": unet, "text_encoder": self.text_encoder}


class _Factors(NamedTuple):
    """One adapter's layer, ready to fuse: float32 on the weight's device. LoRA keeps its factors;
    other kinds (LyCORIS, DoRA) are their dense update, already scaled by their alpha / rank."""

    up: torch.Tensor | None  # B: (out, r)
    down: torch.Tensor | None  # A: (r, in * kh * kw)
    alpha_over_r: float  # 1 for a dense update
    bound: float  # >= max |update| (LoRA: sum_k max|B[:, k]| * max|A[k, :]|): a scale change needs no scan
    dense: torch.Tensor | None = None  # (out, in * kh * kw)


@dataclass
class _Loaded:
    adapter: Adapter
    factors: dict[str, _Factors]  # layer key -> its factors
    strength_map: list[list[float]] | None = None  # strength -> raw scale (strength.py); None: the same


@dataclass
class _Composition:
    """What one switch / composite generation needs besides the pipeline."""

    mode: str
    active: list[str]  # adapters with a non-zero scale, in load order
    scales: dict[str, Scale]
    prompt: str
    negative: str | None
    guidance: float
    switch_every: int
    pipe_kwargs: dict[str, Any]  # steps, size, generator, output type: passed to the pipeline as they are


Plan = dict[str, tuple[tuple[str, float], ...]]  # layer key -> ((adapter, scale * alpha / r), ...)


BALANCE_EXPONENT = 0.1  # module docstring: why, and what it was
_HALF_BLOCK = 1 << 18  # elements per float32 block of a half-precision rewrite (1 MB: stays in L2)


def balanced(scales: Mapping[str, Scale], active: list[str]) -> dict[str, Scale]:
    """The scales balanced mode fuses: each active adapter's (raw) scale times len(active) ** (-BALANCE_EXPONENT)."""
    k = len(active) ** (-BALANCE_EXPONENT) if active else 1.0
    return {n: s.times(k) if n in active else s for n, s in scales.items()}


class AdapterStack:
    """Adapters on one pipeline, fused into its weights. All public methods hold `self.lock`, so a
    generate(..., scales=...) applies its scales and generates with nothing interleaved: one stack
    can serve many UI sessions. Outside a call the weights show the stored `scales`."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.lock = threading.Lock()
        self.scales: dict[str, Scale] = {}
        self._loaded: dict[str, _Loaded] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._w0: dict[str, torch.Tensor] = {}  # copies of the base weights of targeted layers only
        self._w0_absmax: dict[str, float] = {}  # max |W0| per layer, for the overflow bound in _write
        self._applied: Plan = {}  # what each layer holds now; layers at W0 are absent

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def add(self, name: str, adapter: str | Path | Adapter, scale: Any = 1.0) -> Adapter:
        """Load (or replace) adapter `name` at `scale`. Checks it fits the base first. (A LyCORIS or
        DoRA layer costs one dense float32 copy of its update, made here.)"""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
        check_fits(adapter, self.pipe)
        scale = Scale.parse(scale)
        with self.lock:
            # before any change, so that a layer which fails (a DoRA update past float32) changes nothing
            factors = {key: self._factors(key, layer) for key, layer in adapter.layers.items()}
            order = list(self._loaded)
            previous = (self._loaded[name], self.scales[name]) if name in self._loaded else None
            if previous is not None:  # a replacement: the old one comes back if the new one fails
                self._remove(name)
            for key in factors:
                self._track(key)
            self._loaded[name] = _Loaded(adapter, factors, read_map(adapter.metadata, str(adapter.path or name)))
            self.scales[name] = scale
            try:
                self._apply(self._plan(self.scales))
            except BaseException:
                self._remove(name)  # the weights are as before; forget the adapter and its W0 copies
                if previous is not None:  # in its old place in the load order: the same sums, bit for bit
                    for key in previous[0].factors:
                        self._track(key)  # its layers are at W0 again, so this copies W0 exactly
                    self._loaded[name], self.scales[name] = previous
                    self._loaded = {n: self._loaded[n] for n in order}
                    self.scales = {n: self.scales[n] for n in order}
                    self._apply(self._plan(self.scales))
                raise
        return adapter

    def _factors(self, key: str, layer: Layer) -> _Factors:
        """A layer ready to fuse. A DoRA layer's update is computed here, against this stack's W0."""
        # W0: the kept copy, or the module's weight itself, which holds W0 while no adapter targets it
        w0 = self._w0[key] if key in self._w0 else resolve_module(self.pipe, key).weight.detach()
        if isinstance(layer, LoraFactors):
            up = layer.up.flatten(1).to(w0.device, torch.float32)
            down = layer.down.flatten(1).to(w0.device, torch.float32)
            return _Factors(up, down, layer.scale, float((up.abs().amax(0) * down.abs().amax(1)).sum()))
        try:
            dense = layer.delta(w0).to(w0.device, torch.float32).reshape(w0.shape[0], -1)
        except ValueError as e:
            raise ValueError(f"adapter layer {key}: {e}") from e
        return _Factors(None, None, 1.0, float(dense.abs().max()), dense)

    def _track(self, key: str) -> None:
        """Keep a W0 copy of a layer some adapter targets (once)."""
        if key not in self._modules:
            self._modules[key] = mod = resolve_module(self.pipe, key)
            self._w0[key] = mod.weight.detach().clone()
            self._w0_absmax[key] = float(self._w0[key].abs().max())

    def remove(self, name: str) -> None:
        with self.lock:
            self._check_names([name])
            self._remove(name)

    def set_scales(self, scales: Mapping[str, Any]) -> None:
        """Change the named adapters' scales (others keep theirs) and rewrite the affected layers."""
        with self.lock:
            new = {**self.scales, **self._parse(scales)}
            self._apply(self._plan(new))
            self.scales = new

    def reset(self) -> None:
        """Unload every adapter; the base weights are copied back bit for bit."""
        with self.lock:
            self._apply({})
            self.scales, self._loaded, self._modules, self._w0, self._w0_absmax = {}, {}, {}, {}, {}

    @torch.no_grad()
    def generate(self, prompt: str, negative: str | None = None, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, size: tuple[int, int] | None = None, mode: str = MODES[0],
                 scales: Mapping[str, Any] | None = None, switch_every: int = 1, output_type: str = "pil"):
        """One image. `scales`, if given, is complete for this call (adapters it does not name are
        off) and is not stored. Seed s is torch.Generator('cpu').manual_seed(s), as in diffusers."""
        from .base import native_size
        from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS, check_generation

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {list(MODES)}")
        if switch_every < 1:
            raise ValueError(f"switch_every must be >= 1, got {switch_every}")
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        check_generation(steps=DEFAULT_STEPS if steps is None else steps, guidance=guidance, seed=seed)
        width, height = size or (native_size(self.pipe),) * 2
        kwargs = dict(num_inference_steps=steps or DEFAULT_STEPS, guidance_scale=guidance, width=width,
                      height=height, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type)
        with self.lock:
            call = self.scales if scales is None else self._parse(scales)
            active = [n for n in self._loaded if n in call and call[n].active]
            try:
                if mode in ("merge", "balanced") or not active:
                    self._apply(self._fused_plan(call, mode, active))
                    return self.pipe(prompt=prompt, negative_prompt=negative, **kwargs).images[0]
                return self._compose(_Composition(mode, active, call, prompt, negative, guidance, switch_every, kwargs))
            finally:
                self._apply(self._plan(self.scales))

    @contextmanager
    def fused(self, mode: str = MODES[0]):
        """Inside the block the weights hold the stored scales as `mode` fuses them (merge or
        balanced), for batched calls of the plain pipeline; the lock is held throughout."""
        if mode not in ("merge", "balanced"):
            raise ValueError(f"mode {mode!r} is not fused into the weights: use generate(..., mode={mode!r})")
        with self.lock:
            active = [n for n in self._loaded if self.scales[n].active]
            try:
                self._apply(self._fused_plan(self.scales, mode, active))
                yield self.pipe
            finally:
                self._apply(self._plan(self.scales))

    def sweep(self, prompt: str, strengths: list[float], names: list[str] | None = None,
              **gen) -> list[list]:
        """Rows of images, one row per adapter, one column per strength: that adapter's scale times
        the strength while the others keep theirs (A1111's X/Y plot of a LoRA weight)."""
        with self.lock:
            base = dict(self.scales)
            self._check_names(names or [])
        return [[self.generate(prompt, scales={**base, n: base[n].times(s)}, **gen) for s in strengths]
                for n in names or list(base)]

    # --- internals (caller holds the lock) -------------------------------------------------

    def _check_names(self, names) -> None:
        if unknown := [n for n in names if n not in self._loaded]:
            raise ValueError(f"no adapter named {unknown[0]!r} in the stack (loaded: {self.names or 'none'})")

    def _parse(self, scales: Mapping[str, Any]) -> dict[str, Scale]:
        self._check_names(list(scales))
        return {n: Scale.parse(v) for n, v in scales.items()}

    def _remove(self, name: str) -> None:
        gone = self._loaded.pop(name)
        del self.scales[name]
        self._apply(self._plan(self.scales))
        for key in gone.factors:  # layers no other adapter targets are back at W0: drop their copies
            if not any(key in other.factors for other in self._loaded.values()):
                del self._modules[key], self._w0[key], self._w0_absmax[key]

    def _fused_plan(self, scales: Mapping[str, Scale], mode: str, active: list[str]) -> Plan:
        """The plan of a fused mode: merge as given; balanced on the raw scales (after the strength maps)."""
        return self._plan(balanced(self._raw(scales), active) if mode == "balanced" else scales)

    def _raw(self, scales: Mapping[str, Scale]) -> dict[str, Scale]:
        """Strengths as raw scales, through each adapter's strength map."""
        return {n: s.to_raw(self._loaded[n].strength_map) if n in self._loaded else s for n, s in scales.items()}

    def _plan(self, scales: Mapping[str, Scale]) -> Plan:
        """The terms of every layer for these scales. Only active adapters' layers are visited."""
        plan: dict[str, list] = {}
        scales = self._raw(scales)
        for name in self._loaded:  # load order, so equal scales always give equal plans
            if name in scales and scales[name].active:
                for key, f in self._loaded[name].factors.items():
                    if s := scales[name].of(key):
                        plan.setdefault(key, []).append((name, s * f.alpha_over_r))
        return {k: tuple(v) for k, v in plan.items()}

    def _apply(self, plan: Plan, prefix: str = "") -> None:
        """Bring the layers (those whose key starts with `prefix`) to `plan`, rewriting only changes.
        All or nothing: if a layer fails (overflow), the layers already rewritten are put back."""
        before = dict(self._applied)
        try:
            for key in dict.fromkeys([*plan, *self._applied]):
                terms = plan.get(key, ())
                if key.startswith(prefix) and self._applied.get(key, ()) != terms:
                    self._write(key, terms)
        except BaseException:
            for key in dict.fromkeys([*before, *self._applied]):
                if self._applied.get(key, ()) != before.get(key, ()):
                    self._write(key, before.get(key, ()))
            raise

    @torch.no_grad()
    def _write(self, key: str, terms: tuple[tuple[str, float], ...]) -> None:
        weight, w0 = self._modules[key].weight, self._w0[key]
        if not terms:
            weight.copy_(w0)
            self._applied.pop(key, None)
            return
        factors = [(self._loaded[n].factors[key], c) for n, c in terms]
        low = [(f, c) for f, c in factors if f.dense is None]
        dense = [(f, c) for f, c in factors if f.dense is not None]
        rows = weight.shape[0]
        if low:
            up = torch.cat([f.up * c for f, c in low], 1)  # (out, sum r_i), float32 as add() stored them
            down = torch.cat([f.down for f, _ in low], 0)  # (sum r_i, in)

        def overflow() -> ValueError:
            return ValueError(f"blending {[n for n, _ in terms]} into {key} gives NaN/inf in {weight.dtype}: "
                              "lower the scales")

        if weight.dtype == torch.float32 and weight.is_contiguous():
            # W = W0 + up @ down in one fused pass straight into the weight: on big layers the extra
            # passes of a temporary (add, copy, full finiteness scan) cost as much as the product.
            out = weight.view(rows, -1)
            if low:
                torch.addmm(w0.view(rows, -1), up, down, out=out)
            else:
                out.copy_(w0.view(rows, -1))
            for f, c in dense:
                out.add_(f.dense, alpha=c)
            # |delta| <= sum over terms of |c| * (that adapter's bound, computed once in add()): when
            # that cannot overflow, skip scanning the whole layer for inf.
            if not self._bound(key, factors) < 1e38 and not torch.isfinite(weight).all():
                self._write(key, self._applied.get(key, ()))  # put the layer back as it was
                raise overflow()
        else:  # fp16/bf16 (or strided) weights: see _write_half
            self._write_half(key, weight, w0, up if low else None, down if low else None, dense, factors, overflow)
        self._applied[key] = terms

    def _write_half(self, key, weight, w0, up, down, dense, factors, overflow) -> None:
        """The half-precision rewrite. bf16 LoRA terms: one bf16 addmm from W0. Otherwise (fp16, dense
        LyCORIS terms) W0 + up @ down in float32, in blocks of rows that stay in cache, rounded once
        (bench/blend.py --sdxl: whole-layer float32 temporaries cost several times the addmm)."""
        rows = weight.shape[0]
        if weight.dtype == torch.bfloat16 and up is not None and not dense and weight.is_contiguous():
            # bf16: the GEMM itself in bf16 (float32 accumulation; several times float32's speed on CPUs
            # with bf16 units), W0 added, rounded once: within one bf16 step of the float32 sum (test)
            torch.addmm(w0.view(rows, -1), up.to(weight.dtype), down.to(weight.dtype), out=weight.view(rows, -1))
            self._check_half(key, weight, factors, overflow)
            return
        src, dst = w0.view(rows, -1), weight.view(rows, -1) if weight.is_contiguous() else torch.empty_like(w0)
        step = max(1, _HALF_BLOCK // max(1, src.shape[1]))
        for r in range(0, rows, step):
            block = src[r : r + step].to(torch.float32, copy=True)  # never W0 itself (a float32 W0 is strided here)
            if up is not None:
                block = torch.addmm(block, up[r : r + step], down)
            for f, c in dense:
                block.add_(f.dense[r : r + step], alpha=c)
            dst.view(rows, -1)[r : r + step].copy_(block)
        if dst.data_ptr() != weight.data_ptr():
            weight.copy_(dst.view(weight.shape))
        self._check_half(key, weight, factors, overflow)

    def _bound(self, key: str, factors) -> float:
        """>= max |W0 + sum of the terms| of one layer, from bounds computed once in add()."""
        return sum(abs(c) * f.bound for f, c in factors) + self._w0_absmax[key]

    def _check_half(self, key, weight, factors, overflow) -> None:
        # the float32 path's bound, against the half type's range (0.99: rounding up at its edge)
        if not self._bound(key, factors) < 0.99 * torch.finfo(weight.dtype).max and not torch.isfinite(weight).all():
            self._write(key, self._applied.get(key, ()))  # put the layer back as it was
            raise overflow()

    def _compose(self, c: _Composition):
        """switch: one adapter per UNet call, rotating every `switch_every` steps. composite: every
        adapter's prediction each step, averaged with equal weights (as in Zhong et al.): each adapter's
        scale already sets its strength inside its own branch, so weighting by the scales again would
        count them twice (and break on negative scales). The pipeline's CFG is linear, so this equals
        averaging the guided predictions. The text encoder is run once per
        adapter with that adapter alone fused, and each UNet call gets its adapter's embeddings."""
        pipe, unet = self.pipe, self.pipe.unet
        plans = {n: self._plan({n: c.scales[n]}) for n in c.active}
        cfg = c.guidance > 1 and unet.config.time_cond_proj_dim is None  # as the pipeline decides
        embeds = {}
        for n in c.active:
            self._apply(plans[n], prefix=("text_encoder.", "text_encoder_2."))
            embeds[n] = _prompt_embeds(pipe, c.prompt, c.negative, cfg)
        forward, calls = unet.forward, itertools.count()

        def hooked(sample, timestep, encoder_hidden_states=None, *args, **kw):
            kw["return_dict"] = False
            if c.mode == "switch":
                chosen = [c.active[next(calls) // c.switch_every % len(c.active)]]
            else:
                chosen = c.active
            out = None
            for n in chosen:
                self._apply(plans[n], prefix="unet.")
                e = embeds[n]
                if "pooled_prompt_embeds" in e:  # SDXL: this adapter's pooled text, the pipeline's time ids
                    pooled = [e["negative_pooled_prompt_embeds"]] if cfg else []
                    kw["added_cond_kwargs"] = {**kw["added_cond_kwargs"],
                                               "text_embeds": torch.cat(pooled + [e["pooled_prompt_embeds"]])}
                hidden = torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]) if cfg else e["prompt_embeds"]
                eps = forward(sample, timestep, hidden, *args, **kw)[0]
                if c.mode == "composite" and len(chosen) > 1:  # a lone adapter: merge, bit for bit
                    eps = eps / len(chosen)
                out = eps if out is None else out + eps
            return (out,)

        unet.forward = hooked  # an instance attribute shadows the method for this call only
        try:
            return pipe(**embeds[c.active[0]], **c.pipe_kwargs).images[0]
        finally:
            del unet.forward


def _prompt_embeds(pipe, prompt: str, negative: str | None, cfg: bool) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt, as keyword arguments its __call__ takes back (SDXL adds the
    pooled embeddings). Without guidance the negative embeddings are None and are not passed."""
    device = pipe._execution_device
    if getattr(pipe, "text_encoder_2", None) is not None:
        out = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                 negative_prompt=negative)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    else:
        out = pipe.encode_prompt(prompt, device, 1, cfg, negative)
        names = ("prompt_embeds", "negative_prompt_embeds")
    return {k: v for k, v in zip(names, out) if v is not None}


# --- merging many adapters into one -------------------------------------------------------

def _factored(layer: Layer, s: float, w0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in float64 with B @ A = s * the layer's update, as an (out, in * kh * kw) matrix. LoRA
    gives its own factors; a dense update D is I @ D or D @ I, whichever identity is the smaller."""
    if isinstance(layer, LoraFactors):
        return layer.up.flatten(1).double() * (s * layer.scale), layer.down.flatten(1).double()
    dense = layer.delta(w0).double().flatten(1) * s
    eye = torch.eye(min(dense.shape), dtype=torch.float64)
    return (eye, dense) if dense.shape[0] <= dense.shape[1] else (dense, eye)


def _check_mergeable(items: list[tuple[Adapter, Any]], scales: list[Scale], base) -> None:
    """With a base, every adapter must fit it; without one, no layer may need it (DoRA, flat LoHa/LoKr)."""
    for (ad, _), s in zip(items, scales):
        if base is not None:
            check_fits(ad, base)
            continue
        for key, layer in ad.layers.items():
            if s.of(key) and (why := needs_base(layer)):
                raise ValueError(f"cannot merge layer {key} of {ad.path or 'an unsaved adapter'} without the base "
                                 f"model: {why}. Pass the base: merge_adapters(..., base=pipe), or `stylelora merge "
                                 "--base MODEL ...`")


def merge_adapters(items: list[tuple[Adapter, Any]], rank: int | None = None, base=None) -> tuple[Adapter, float]:
    """One adapter whose layers approximate sum_i scale_i * delta_i at `rank` (default: the most rank
    that sum can have -- the sum of the ranks for LoRA -- which is exact). Returns it (alpha = rank, so
    scale 1 is the sum) and the relative Frobenius error over all layers. The truncated SVD is taken
    of a small core, not of the full delta: with B = Qb Rb and A^T = Qa Ra, B A = Qb (Rb Ra^T) Qa^T,
    and only Rb Ra^T is decomposed. LyCORIS layers enter as their exact dense update; DoRA layers,
    and LoHa/LoKr layers whose 2-D factors may flatten a conv kernel, need `base` (a base pipeline
    without adapters fused in) for W0 and the layer's shape."""
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if not items:
        raise ValueError("nothing to merge: give at least one adapter")
    # strengths through each adapter's map: the merged file (which has no map) acts at the raw scales
    scales = [Scale.parse(s).to_raw(read_map(ad.metadata, str(ad.path))) for ad, s in items]
    _check_mergeable(items, scales, base)
    layers, err2, norm2 = {}, 0.0, 0.0
    for key in dict.fromkeys(k for ad, _ in items for k in ad.layers):
        pairs = [(ad.layers[key], s.of(key)) for (ad, _), s in zip(items, scales) if key in ad.layers and s.of(key)]
        if not pairs:
            continue
        having = [ad for ad, _ in items if key in ad.layers]
        # (with a base, check_fits has compared each layer with it; a flat LyCORIS layer's 2-D shape
        # then differs from the same layer's 4-D one in another adapter, rightly)
        odd = None if base is not None else \
            next((ad for ad in having if ad.layers[key].shape != having[0].layers[key].shape), None)
        if odd is not None:
            raise ValueError(f"cannot merge {key}: it is {having[0].layers[key].shape} in {having[0].path} but "
                             f"{odd.layers[key].shape} in {odd.path}: the adapters were trained on bases of "
                             "different architectures (merge adapters of one base only)")
        w0 = resolve_module(base, key).weight.detach().cpu() if base is not None else None
        shape = tuple(w0.shape) if w0 is not None else pairs[0][0].shape
        factored = [_factored(lay, s, w0) for lay, s in pairs]
        b = torch.cat([f[0] for f in factored], 1)  # (out, R)
        a = torch.cat([f[1] for f in factored], 0)  # (R, in * kh * kw)
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, sv, vh = torch.linalg.svd(rb @ ra.T)
        r = min(rank or sum(lay.rank_bound for lay, _ in pairs), len(sv))
        root = sv[:r].sqrt()
        up, down = ((qb @ u[:, :r]) * root).float(), (root[:, None] * (vh[:r] @ qa.T)).float()
        exact = b @ a
        # Scales so large the merged factors (or their product, the update a loader computes) pass
        # float32: the file would be refused, so name the inputs and their scales here.
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()
                and float(exact.abs().max()) <= torch.finfo(torch.float32).max):
            used = ", ".join(f"{ad.path or 'an unsaved adapter'} at scale {s.of(key):g}"
                             for (ad, _), s in zip(items, scales) if key in ad.layers and s.of(key))
            raise ValueError(f"cannot merge {key}: {used} add up to a weight update past float32 (NaN/inf): "
                             "lower the scales")
        err2 += float((up.double() @ down.double() - exact).pow(2).sum())
        norm2 += float(exact.pow(2).sum())
        layers[key] = LoraFactors(down.reshape(r, *shape[1:]).contiguous(),
                                  up.reshape(up.shape[0], r, *[1] * (len(shape) - 2)).contiguous(), alpha=r)
    if not layers:
        raise ValueError("every scale is 0: the merged adapter would be empty")
    rel = math.sqrt(err2 / norm2) if norm2 else 0.0
    return Adapter(layers=layers, metadata=_merged_metadata(items, scales, rank, rel)), rel


def _merged_metadata(items: list[tuple[Adapter, Any]], scales: list[Scale], rank: int | None, rel: float) -> dict:
    """A merge's metadata: the base its inputs share, their trigger words, and where it came from."""
    metas = [ad.metadata for ad, _ in items]
    common = lambda k: metas[0].get(k) if len({m.get(k) for m in metas}) == 1 else None  # noqa: E731
    triggers = list(dict.fromkeys(w for ad, _ in items for w in ad.trigger_words))
    sources = [{"file": ad.path.name if ad.path else None, "unet": s.unet, "text_encoder": s.text_encoder,
                **({"blocks": s.blocks} if s.blocks else {})} for (ad, _), s in zip(items, scales)]
    meta = stylelora_metadata(base_name=common("stylelora.base_name"),
                              base_fingerprint=common("stylelora.base_fingerprint"), trigger_words=triggers,
                              training={"merged_from": sources, "rank": rank or "sum", "relative_error": rel})
    # ss_v2 & co. (A1111 lists SD2 files by it), and an SDXL UNet's layers per block, when all agree
    return meta | common_base_metadata(metas)


# --- A1111 prompt syntax --------------------------------------------------------------------

_TAG = re.compile(r"<lora:([^<>]*)>")
_TAG_KEYS = {"te": "text_encoder", "unet": "unet"}


def _tag_usage(adapters_dir) -> str:
    return ("use <lora:NAME> or <lora:NAME:SCALE> (both text encoder and UNet), <lora:NAME:TE:UNET> "
            "(A1111's order: text encoder first) or named <lora:NAME:te=TE:unet=UNET>, "
            f"with NAME a file stem in {adapters_dir} (e.g. <lora:pastel:0.8>)")


def _tag_weights(body: str, adapters_dir) -> tuple[str, dict[str, float]]:
    """NAME and {"unet", "text_encoder"} of one tag body, as A1111's Lora network reads it: items
    split on ':', the first is NAME; `key=value` items are named, the rest positional. TE is the
    first positional number (default 1), then te= overrides it; UNET is the second positional
    number (default: TE as it stands), then unet= overrides it."""
    name, *items = body.split(":")
    bad = f"malformed prompt tag <lora:{body}>"
    positional, named = [], {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq:
            if key.strip() not in _TAG_KEYS:
                raise ValueError(f"{bad}: {_tag_usage(adapters_dir)}; unknown key {key.strip()!r} "
                                 "(named weights are te= and unet=)")
            named[key.strip()] = value  # A1111: a repeated key, the last one wins
        else:
            positional.append(item)
    if not name or "/" in name or "\\" in name or len(positional) > 2:
        raise ValueError(f"{bad}: {_tag_usage(adapters_dir)}")

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{bad}: {_tag_usage(adapters_dir)}; {text!r} is not a finite number")
        return value

    te = number(positional[0]) if positional else 1.0
    te = number(named["te"]) if "te" in named else te
    unet = number(positional[1]) if len(positional) > 1 else te
    unet = number(named["unet"]) if "unet" in named else unet
    return name, {"unet": unet, "text_encoder": te}


def parse_prompt_loras(prompt: str, adapters_dir: str | Path = "adapters") -> tuple[str, list[tuple[Path, dict]]]:
    """Strip A1111 `<lora:...>` tags from a prompt; NAME is ADAPTERS_DIR/NAME.safetensors. Forms:
    `<lora:NAME>` (1), `<lora:NAME:W>` (W on both), `<lora:NAME:TE:UNET>` (A1111's order, text
    encoder first) and named `<lora:NAME:te=TE:unet=UNET>` (either order; mixed with positional
    numbers, named ones win). Returns the clean prompt and, per tag, (path, {"unet": u,
    "text_encoder": t}) -- a dict Scale.parse takes."""
    found = []
    for body in _TAG.findall(prompt):
        name, weights = _tag_weights(body, adapters_dir)
        path = Path(adapters_dir) / f"{name}.safetensors"
        if not path.is_file():
            have = sorted(p.stem for p in Path(adapters_dir).glob("*.safetensors") if not p.name.startswith("."))
            raise FileNotFoundError(f"<lora:{body}>: no {path} (adapters in {adapters_dir}: "
                                    f"{', '.join(have) or 'none'}); pass --adapters-dir DIR")
        found.append((path, weights))
    clean = _TAG.sub("", prompt)
    if "<lora:" in clean:
        raise ValueError(f"unclosed <lora:...> tag in prompt {prompt!r}: write <lora:NAME:SCALE>")
    return " ".join(clean.replace(" ,", ",").split()).strip(" ,"), found
