"""LyCORIS layers (LoCon with a CP core, LoHa, LoKr, full diffs) and DoRA magnitudes, each read as the
exact dense weight update dW it stands for, so that the blender adds them like LoRA.

The formulas, as LyCORIS trains them (lycoris/modules/{locon,loha,lokr,full}.py, lycoris/functional/)
and ComfyUI (comfy/weight_adapter/) and A1111 (extensions-builtin/Lora/network_*.py) apply them.
scale = alpha / rank, where a missing or zero alpha means alpha = rank (scale 1):

  LoCon, CP core   down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1):
                   dW[o, i, y, x] = scale * sum_mn mid[m, n, y, x] * up[o, m] * down[n, i]
  LoHa             dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b)  (elementwise), rank = rows of w1_b;
                   w*_a (out, r), w*_b (r, in*kh*kw). With CP cores t1/t2 (r, r, kh, kw), w*_a is
                   (r, out) and w*_b (r, in), and each factor is sum_ij t[i, j] * w_a[i, o] * w_b[j, n]
  LoKr             dW = scale * kron(w1, w2); w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2,
                   lokr_w2_a @ lokr_w2_b, or with the CP core lokr_t2 as above. rank is the decomposed
                   side's (w2's when both are, as ComfyUI and A1111 read it); neither decomposed: scale 1
  full             dW = diff
  DoRA             kohya/LyCORIS `dora_scale` m, shaped (out, 1, ...) (one norm per output row,
                   LyCORIS's wd_on_out, its default) or (1, in, ...) (one per input column); PEFT's
                   `lora_magnitude_vector` (per output row). With V = W0 + dW:
                   fused = V * m / |V|, and the layer's update is fused - W0: it needs W0.
                   LyCORIS adds float32's eps to |V|; PEFT adds nothing.

LoHa / LoKr factors that are 2-D may stand for a conv layer whose kernel they flatten: such a layer
is `flat`, its dW is (out, in * kh * kw), and only the base tells its kernel (ComfyUI and A1111 reshape
it to the base weight's shape, as stylelora does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_F32_MAX = torch.finfo(torch.float32).max
_F32_EPS = torch.finfo(torch.float32).eps  # what LyCORIS adds to DoRA's norms (its dora_scale is float32)

# kohya-named parts each LyCORIS algorithm writes beside `alpha` and `dora_scale`; LoRA's lora_down /
# lora_up are read by the LoRA path (adapters.py), and with `lora_mid.weight` they are a CP LoCon.
PARTS = {"lora_mid.weight": "locon", "diff": "full",
         **{p: "loha" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
         **{p: "lokr" for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
# Parts of layer types stylelora does not blend: what they are, for the refusal.
UNSUPPORTED = {**{p: "a LyCORIS GLoRA layer" for p in ("a1.weight", "a2.weight", "b1.weight", "b2.weight",
                                                          "bm.weight")},
               **{p: "a LyCORIS OFT/BOFT layer" for p in ("oft_blocks", "rescale", "oft_diag")},
               **{p: "a LyCORIS IA3 layer" for p in ("on_input", "weight")},
               **{p: "a LyCORIS norm-layer update" for p in ("w_norm", "b_norm")},
               **{p: "a bias update" for p in ("diff_b", "bias", "bias_indices", "bias_values", "bias_size")}}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check(name: str, t: torch.Tensor, ndims: tuple[int, ...]) -> None:
    _need(t.is_floating_point(), f"{name} is {str(t.dtype).removeprefix('torch.')}: weights must be floating point")
    _need(t.ndim in ndims, f"{name} has shape {tuple(t.shape)}: it must have {' or '.join(map(str, ndims))} dimensions")
    _need(t.numel() > 0, f"{name} has shape {tuple(t.shape)}, which is empty: sizes must be at least 1")


def _resolved_alpha(alpha: float, rank: int) -> float:
    """kohya's and LyCORIS's rule: alpha 0 (or missing, passed as 0) means alpha = rank, i.e. scale 1."""
    _need(math.isfinite(alpha) and abs(alpha) <= _F32_MAX, f"alpha is {alpha!r}: it must be a finite number")
    return float(alpha) or float(rank)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP (Tucker) factor: core t (r1, r2, kh, kw), wa (r1, out), wb (r2, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijyx,io,jn->onyx", t.float(), wa.float(), wb.float())


def _absmax(*ts: torch.Tensor) -> float:
    return math.prod(float(t.abs().max()) for t in ts)


class _Dense:
    """What every layer kind offers (LoraFactors too): shape, rank, alpha, scale, delta()."""

    kind = ""
    flat = False  # True: 2-D factors that may flatten a conv kernel; the base weight gives dW's shape

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def delta(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """dW in float32, shaped like w0 when given (a flat layer's kernel comes from the base)."""
        return (self._rebuild() * self.scale).reshape(self.shape if w0 is None else w0.shape)


def _require(parts, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in parts]
    _need(not missing, f"lacks {', '.join(missing)}; the file is incomplete: re-export it")


@dataclass
class LoconCP(_Dense):
    """LoCon with a CP core (`lora_mid`) on a conv layer."""

    down: torch.Tensor  # (r, in, 1, 1)
    mid: torch.Tensor  # (r, r, kh, kw)
    up: torch.Tensor  # (out, r, 1, 1)
    alpha: float
    kind = "locon"

    def __post_init__(self):
        _check("lora_down", self.down, (2, 4))
        _check("lora_mid", self.mid, (4,))
        _check("lora_up", self.up, (2, 4))
        r = self.down.shape[0]
        _need(self.down.shape[2:] in ((), (1, 1)) and self.up.shape[2:] in ((), (1, 1)) and self.up.shape[1] == r
              and self.mid.shape[:2] == (r, r),
              f"lora_down {tuple(self.down.shape)}, lora_mid {tuple(self.mid.shape)} and lora_up "
              f"{tuple(self.up.shape)} do not pair: need (r, in, 1, 1), (r, r, kh, kw) and (out, r, 1, 1)")
        self.alpha = _resolved_alpha(self.alpha, r)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])

    @property
    def rank_bound(self) -> int:
        """The most rank dW (as an (out, in*kh*kw) matrix) can have: up's r columns span it."""
        return self.rank

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.down, self.mid, self.up

    def bound(self) -> float:
        """>= max |dW|: each entry sums r * r products."""
        return self.rank ** 2 * _absmax(self.down, self.mid, self.up) * abs(self.scale)

    def _rebuild(self) -> torch.Tensor:
        return torch.einsum("mnyx,om,ni->oiyx", self.mid.float(), self.up.float().flatten(1),
                            self.down.float().flatten(1))


@dataclass
class LohaFactors(_Dense):
    """LoHa: the elementwise (Hadamard) product of two low-rank factors, each optionally CP."""

    w1a: torch.Tensor  # (out, r1); CP: (r1, out)
    w1b: torch.Tensor  # (r1, in * kh * kw); CP: (r1, in)
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None  # CP cores (r, r, kh, kw), both or neither
    t2: torch.Tensor | None = None
    kind = "loha"

    def __post_init__(self):
        _need((self.t1 is None) == (self.t2 is None), "has only one of hada_t1 / hada_t2: a CP LoHa has both")
        one = self._factor_shape(1, self.w1a, self.w1b, self.t1)
        two = self._factor_shape(2, self.w2a, self.w2b, self.t2)
        _need(one == two, f"its hada_w1 factor is {one} but its hada_w2 factor {two}: both must have the layer's shape")
        self.alpha = _resolved_alpha(self.alpha, self.rank)

    @staticmethod
    def _factor_shape(i: int, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...]:
        """The shape of factor i, once its parts are known to pair."""
        _check(f"hada_w{i}_a", a, (2,))
        if t is None:
            _check(f"hada_w{i}_b", b, (2, 4))
            _need(a.shape[1] == b.shape[0], f"hada_w{i}_a {tuple(a.shape)} and hada_w{i}_b {tuple(b.shape)} do not "
                                            "pair: need (out, r) and (r, in*kh*kw)")
            return (a.shape[0], *b.shape[1:])
        _check(f"hada_w{i}_b", b, (2,))
        _check(f"hada_t{i}", t, (4,))
        _need(t.shape[:2] == (a.shape[0], b.shape[0]),
              f"hada_t{i} {tuple(t.shape)}, hada_w{i}_a {tuple(a.shape)} and hada_w{i}_b {tuple(b.shape)} do not "
              "pair: need (r, r, kh, kw), (r, out) and (r, in)")
        return (a.shape[1], b.shape[1], *t.shape[2:])

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._factor_shape(1, self.w1a, self.w1b, self.t1)

    @property
    def flat(self) -> bool:
        return self.t1 is None and self.w1b.ndim == 2

    @property
    def rank_bound(self) -> int:
        """A Hadamard product of ranks r1 and r2 has rank <= r1 * r2."""
        return min(self.w1b.shape[0] * self.w2b.shape[0], self.shape[0], math.prod(self.shape[1:]))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if t is not None)

    def bound(self) -> float:
        def factor(a, b, t):
            return a.shape[0] * b.shape[0] * _absmax(a, b, t) if t is not None else b.shape[0] * _absmax(a, b)

        return factor(self.w1a, self.w1b, self.t1) * factor(self.w2a, self.w2b, self.t2) * abs(self.scale)

    def _rebuild(self) -> torch.Tensor:
        def factor(a, b, t):
            return _cp(t, a, b) if t is not None else a.float() @ b.float().flatten(1)

        return factor(self.w1a, self.w1b, self.t1) * factor(self.w2a, self.w2b, self.t2)


@dataclass
class LokrFactors(_Dense):
    """LoKr: the Kronecker product of a small w1 and a larger w2, each full or low-rank (w2 optionally CP)."""

    alpha: float
    w1: torch.Tensor | None = None  # (a, c), or w1a (a, r) @ w1b (r, c)
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None  # (b, d[, kh, kw]), or w2a (b, r) @ w2b (r, d*kh*kw), or CP with t2
    w2a: torch.Tensor | None = None  # CP: (r, b)
    w2b: torch.Tensor | None = None  # CP: (r, d)
    t2: torch.Tensor | None = None  # CP core (r, r, kh, kw)
    kind = "lokr"

    def __post_init__(self):
        self._shape1 = self._side_shape(1, self.w1, self.w1a, self.w1b, None)
        self._shape2 = self._side_shape(2, self.w2, self.w2a, self.w2b, self.t2)
        _need(len(self._shape1) == 2, f"lokr_w1 is {self._shape1}: it must be 2-D")
        # Neither side low-rank: LyCORIS, ComfyUI and A1111 all use scale 1, whatever alpha says.
        self.alpha = _resolved_alpha(self.alpha, self.dim) if self.dim else 1.0

    @staticmethod
    def _side_shape(i: int, w, wa, wb, t) -> tuple[int, ...]:
        if w is not None:
            _need(wa is None and wb is None and t is None,
                  f"has lokr_w{i} and also its low-rank parts (lokr_w{i}_a/_b or lokr_t{i}): a side is one or "
                  "the other")
            _check(f"lokr_w{i}", w, (2, 4))
            return tuple(w.shape)
        _need(wa is not None and wb is not None, f"lacks lokr_w{i} (or both lokr_w{i}_a and lokr_w{i}_b); the file is "
                                                 "incomplete: re-export it")
        _check(f"lokr_w{i}_a", wa, (2,))
        _check(f"lokr_w{i}_b", wb, (2,))
        if t is None:
            _need(wa.shape[1] == wb.shape[0], f"lokr_w{i}_a {tuple(wa.shape)} and lokr_w{i}_b {tuple(wb.shape)} do not "
                                              "pair: need (rows, r) and (r, cols)")
            return wa.shape[0], wb.shape[1]
        _check(f"lokr_t{i}", t, (4,))
        _need(t.shape[:2] == (wa.shape[0], wb.shape[0]),
              f"lokr_t{i} {tuple(t.shape)}, lokr_w{i}_a {tuple(wa.shape)} and lokr_w{i}_b {tuple(wb.shape)} do not "
              "pair: need (r, r, kh, kw), (r, rows) and (r, cols)")
        return (wa.shape[1], wb.shape[1], *t.shape[2:])

    @property
    def dim(self) -> int | None:
        """The rank alpha is divided by: the low-rank side's (w2's when both are), None when neither is."""
        return self.w2b.shape[0] if self.w2 is None else self.w1b.shape[0] if self.w1 is None else None

    @property
    def rank(self) -> int:
        return self.dim or 1

    @property
    def shape(self) -> tuple[int, ...]:
        (a, c), (b, d, *kernel) = self._shape1, self._shape2
        return (a * b, c * d, *kernel)

    @property
    def flat(self) -> bool:
        return len(self._shape2) == 2

    @property
    def rank_bound(self) -> int:
        """rank(kron(w1, w2)) = rank(w1) * rank(w2)."""
        r1 = self.w1b.shape[0] if self.w1 is None else min(self._shape1)
        r2 = self.w2b.shape[0] if self.w2 is None else min(self._shape2[0], math.prod(self._shape2[1:]))
        return min(r1 * r2, self.shape[0], math.prod(self.shape[1:]))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2) if t is not None)

    def bound(self) -> float:
        def side(w, wa, wb, t):
            if w is not None:
                return _absmax(w)
            return wb.shape[0] * _absmax(wa, wb) * (wa.shape[0] * _absmax(t) if t is not None else 1.0)

        return side(self.w1, self.w1a, self.w1b, None) * side(self.w2, self.w2a, self.w2b, self.t2) * abs(self.scale)

    def _rebuild(self) -> torch.Tensor:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        else:
            w2 = _cp(self.t2, self.w2a, self.w2b) if self.t2 is not None else self.w2a.float() @ self.w2b.float()
        # a conv w2 (b, d, kh, kw): w1's entries scale whole kernels, so w1 becomes (a, c, 1, 1).
        # (torch.kron views its arguments: an einsum result must be made contiguous first.)
        return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.ndim - 2)), w2.contiguous())


@dataclass
class FullDiff(_Dense):
    """LyCORIS `full`: the update itself, stored whole."""

    diff: torch.Tensor  # (out, in) or (out, in, kh, kw)
    kind = "full"
    alpha = 1.0  # no scaling: ComfyUI and A1111 add diff as it is
    rank = 1

    def __post_init__(self):
        _check("diff", self.diff, (2, 4))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    @property
    def rank_bound(self) -> int:
        return min(self.shape[0], math.prod(self.shape[1:]))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.diff,)

    def bound(self) -> float:
        return _absmax(self.diff)

    def _rebuild(self) -> torch.Tensor:
        return self.diff.float()


def from_kohya_parts(kind: str, parts: dict[str, torch.Tensor], alpha: float) -> _Dense:
    """One layer from its kohya-named parts (alpha apart: 0 when the file has none)."""
    get = parts.get
    if kind == "locon":
        _require(parts, ("lora_down.weight", "lora_mid.weight", "lora_up.weight"))
        return LoconCP(parts["lora_down.weight"], parts["lora_mid.weight"], parts["lora_up.weight"], alpha)
    if kind == "loha":
        _require(parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return LohaFactors(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha,
                           get("hada_t1"), get("hada_t2"))
    if kind == "lokr":
        return LokrFactors(alpha, get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"),
                           get("lokr_w2_a"), get("lokr_w2_b"), get("lokr_t2"))
    return FullDiff(parts["diff"])


@dataclass
class DoraLayer:
    """DoRA on another layer kind: W = (W0 + dW) * m / |W0 + dW|, per output row or input column. Its
    update W - W0 depends on W0, so it exists only against a base (delta(w0))."""

    inner: object  # LoraFactors | LoconCP | LohaFactors | LokrFactors
    magnitude: torch.Tensor  # m, as the file holds it
    axis: str  # "out": one norm per output row; "in": one per input column
    eps: float  # added to the norms: LyCORIS does (float32's eps), PEFT does not

    @classmethod
    def from_dora_scale(cls, inner, m: torch.Tensor) -> DoraLayer:
        """kohya/LyCORIS `dora_scale`: (out, 1, ...) with wd_on_out (LyCORIS's default), else (1, in, ...)."""
        _check("dora_scale", m, (1, 2, 3, 4))
        out = inner.shape[0]
        if m.shape[0] == out and m.numel() == out:
            return cls(inner, m, "out", _F32_EPS)
        per_input = m.ndim >= 2 and m.shape[0] == 1 and m.numel() == m.shape[1]
        _need(per_input and (inner.flat or m.shape[1] == inner.shape[1]),  # a flat layer's channels: check_fits
              f"dora_scale {tuple(m.shape)} fits neither axis of its layer's update {inner.shape}: LyCORIS writes "
              "(out, 1, ...) or (1, in, ...)")
        return cls(inner, m, "in", _F32_EPS)

    @classmethod
    def from_magnitude_vector(cls, inner, m: torch.Tensor) -> DoraLayer:
        """PEFT's `lora_magnitude_vector`: (out,), or (1, out, 1, 1) for a conv layer."""
        _check("lora_magnitude_vector", m, (1, 2, 3, 4))
        _need(m.numel() == inner.shape[0], f"lora_magnitude_vector {tuple(m.shape)} must hold one value per output "
                                           f"row of its layer's update {inner.shape}")
        return cls(inner, m, "out", 0.0)

    kind = property(lambda self: self.inner.kind)
    flat = property(lambda self: self.inner.flat)
    shape = property(lambda self: self.inner.shape)
    rank = property(lambda self: self.inner.rank)
    alpha = property(lambda self: self.inner.alpha)
    scale = property(lambda self: self.inner.scale)
    nbytes = property(lambda self: self.inner.nbytes + self.magnitude.nbytes)
    n_params = property(lambda self: self.inner.n_params + self.magnitude.numel())

    @property
    def rank_bound(self) -> int:
        """W - W0 = W0 (m/|V| - 1) + dW m/|V|: in general full rank."""
        return min(self.shape[0], math.prod(self.shape[1:]))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.inner.tensors(), self.magnitude)

    def mismatch(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why the magnitudes do not fit a base weight of this shape (None: they fit)."""
        if self.axis == "in" and self.magnitude.shape[1] != weight_shape[1]:
            return (f"its dora_scale {tuple(self.magnitude.shape)} holds one norm per input channel but the base "
                    f"weight {weight_shape} has {weight_shape[1]} input channels")
        return None

    def delta(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """W - W0 in float32 for this base weight W0."""
        _need(w0 is not None, "a DoRA layer's update depends on the base weights: add the adapter to an AdapterStack, "
                              "or pass the base to merge_adapters")
        w = w0.detach().float()
        v = w + self.inner.delta().to(w.device).reshape(w.shape)
        if self.axis == "out":
            norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (v.ndim - 1))
        else:
            norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (v.ndim - 2))
        update = v * (self.magnitude.to(w.device, torch.float32).reshape(norm.shape) / (norm + self.eps)) - w
        _need(bool(torch.isfinite(update).all()), "its DoRA update is not finite (W0 + dW has a row or column of norm "
                                                  "0 here): the adapter does not fit this base")
        return update
