"""pi0.5 in plain PyTorch: SigLIP + PaliGemma (Gemma-2B) prefix, Gemma-300M action expert, flow matching.

The module tree reproduces openpi's PyTorch parameter names exactly (openpi
`models_pytorch/pi0_pytorch.py`, `gemma_pytorch.py` and its `transformers_replace/` Gemma, PaliGemma and
SigLIP), e.g.::

    paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight
    paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight
    paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.gate_proj.weight
    paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight
    action_in_proj.weight, time_mlp_in.weight, time_mlp_out.weight, action_out_proj.weight

The unused LM heads (`paligemma.lm_head`, tied to the token embedding, and `gemma_expert.lm_head`) are
not built; the checkpoint loader knows them (see checkpoint.py).

Numerics follow openpi's PyTorch inference path (`PI0Pytorch.sample_actions`):
- Gemma RMSNorm: x * rsqrt(mean(x_fp32^2) + 1e-6) computed in float32, times (1 + weight); the expert's
  norms are adaptive: (scale, shift, gate) = dense(cond); out = normed * (1 + scale) + shift, and the
  residual adds `gate * branch`.
- Token embeddings are multiplied by sqrt(width); image embeddings (SigLIP + projector) are not.
- RoPE theta 10000 on q and k (rotate-half form), GQA with 1 KV head, eager attention with float32
  softmax and an additive mask of -2.3819763e38; SigLIP attention is unmasked (scaled dot product).
- Gated MLP: down(gelu_tanh(gate(x)) * up(x)); SigLIP MLP: fc2(gelu_tanh(fc1(x))).
- Prefix = images (256 tokens each) + prompt tokens, bidirectional among valid tokens; its K/V are
  computed once per call. Action tokens attend to every valid prefix token and to each other
  (openpi ar_mask [1, 0, ..., 0] = one bidirectional block); positions continue after the valid prefix.
- Time: sin/cos embedding (periods 4e-3..4, computed in float64), time_mlp_in -> swish -> time_mlp_out
  -> swish = the adaRMS condition. 10 Euler steps, t = 1 -> 0, dt = -0.1, x += dt * v.
- bf16: as openpi's `to_bfloat16_for_selected_params`, everything is bf16 except the SigLIP patch and
  position embeddings and the Gemma norms (incl. the adaRMS `dense`), which stay float32; the action and
  time projections are float32. RoPE inverse frequencies are buffers and get rounded to bf16 as in openpi.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pytest_duquant.kernels.ops import prepare_for_compile, sibling_outputs
from pytest_duquant.policies.pi05.configuration import GemmaSpec, Pi05Config, VisionSpec

MASK_VALUE = -2.3819763e38  # openpi _prepare_attention_masks_4d

# Parameters kept in float32 when the model is bf16 (openpi to_bfloat16_for_selected_params, substring match).
FLOAT32_PARAM_SELECTORS = (
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.bias",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
)


# ------------------------------------------------------------------------------------------------
# Small functional pieces
# ------------------------------------------------------------------------------------------------
def make_att_2d_masks(pad_masks: torch.Tensor, ar_masks: torch.Tensor) -> torch.Tensor:
    """big_vision prefix-LM mask: token i sees valid token j when cumsum(ar)[j] <= cumsum(ar)[i]."""
    cumsum = torch.cumsum(ar_masks.to(torch.int32), dim=1)
    att = cumsum[:, None, :] <= cumsum[:, :, None]
    pad = pad_masks[:, None, :] & pad_masks[:, :, None]
    return att & pad


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the steps openpi computes in float32 (norms, softmax, RoPE, the flow): float32 for bf16 and
    float32 models, float64 for a model measured in float64 (`set_precision("float64")`, tests only)."""
    return torch.promote_types(dtype, torch.float32)


def additive_mask(mask_bool: torch.Tensor) -> torch.Tensor:
    """bool[B, T, S] -> float32[B, 1, T, S] with 0 where allowed and MASK_VALUE elsewhere."""
    zero = torch.zeros((), dtype=torch.float32, device=mask_bool.device)
    neg = torch.full((), MASK_VALUE, dtype=torch.float32, device=mask_bool.device)
    return torch.where(mask_bool[:, None, :, :], zero, neg)


def sinusoidal_time_embedding(
    time: torch.Tensor, dim: int, min_period: float, max_period: float
) -> torch.Tensor:
    """openpi create_sinusoidal_pos_embedding: float64 math, returned in time's dtype (float32)."""
    if dim % 2:
        raise ValueError(f"time embedding dimension {dim} must be even")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling = 1.0 / period * 2 * math.pi
    sin_input = scaling[None, :] * time[:, None]
    return torch.cat([torch.sin(sin_input), torch.cos(sin_input)], dim=1).to(time.dtype)


def euler_times(num_steps: int) -> list[float]:
    """Times openpi visits: t = 1, accumulated in float32 with dt = -1/num_steps, while t >= -dt/2."""
    dt = np.float32(-1.0 / num_steps)
    t = np.float32(1.0)
    out = []
    while t >= -dt / np.float32(2):
        out.append(float(t))
        t = np.float32(t + dt)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: ``_rotate_half(x) * sin == _swap_halves(x) * _signed_sin(sin)`` bit for
    bit (negation is exact and a product's sign is symmetric), one launch fewer per rotated tensor."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_add: torch.Tensor, scaling: float):
    """Eager GQA attention, float32 softmax. q [B,Hq,T,D], k/v [B,Hkv,S,D], mask [B,1,T,S] (or folded by
    :func:`fold_mask_heads`) -> [B,T,Hq*D]."""
    b, hq, t, d = q.shape
    if mask_add.shape[-2] != t:  # folded over the heads: the same mask per head
        mask_add = mask_add.unflatten(-2, (hq, t)).squeeze(1)
    hkv = k.shape[1]
    if hkv != hq and hkv != 1:
        rep = hq // hkv
        k = k[:, :, None].expand(b, hkv, rep, k.shape[2], d).reshape(b, hq, k.shape[2], d)
        v = v[:, :, None].expand(b, hkv, rep, v.shape[2], d).reshape(b, hq, v.shape[2], d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = scores + mask_add
    probs = F.softmax(scores, dim=-1, dtype=math_dtype(scores.dtype)).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, Hq, T, D]
    return out.transpose(1, 2).reshape(b, t, hq * d)


def fold_mask_heads(mask_add: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, 1, T, S] -> [B, 1, num_heads*T, S]: the mask of :func:`fused_attention`'s folded query heads (one
    KV head: the heads' queries become one long query against the shared K/V). Build it once per call."""
    mb, _, t, s = mask_add.shape
    # rows padded to a multiple of 16 elements (a view of the first s columns): the fused CUDA kernels need an
    # aligned mask stride and would otherwise pad a copy in every layer
    s_pad = -(-s // 16) * 16
    out = mask_add.new_zeros(mb, 1, num_heads * t, s_pad)[..., :s]
    out.view(mb, num_heads, t, s).copy_(mask_add[:, 0, None].expand(mb, num_heads, t, s))
    return out


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_add: torch.Tensor, scaling: float):
    """:func:`attention` through ``F.scaled_dot_product_attention`` (a fused kernel: no B x heads x T x S score
    tensor in memory, no float32 round trip of the scores). Same math; the fused kernels keep scores and
    softmax in float32 throughout (openpi's eager path rounds the scores to the compute dtype before its float32
    softmax and the probabilities back after it), so results differ from :func:`attention` at the rounding of
    the compute dtype (docs/speed.md, "Tolerances").

    One KV head (Gemma's MQA): the query heads are folded into the query length, [B, 1, Hq*T, D], so K/V are
    never repeated; ``mask_add`` may be [B, 1, T, S] or already folded by :func:`fold_mask_heads`. Other GQA
    shapes repeat the KV heads. Used by the fast inference path and by training."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    mask = mask_add.to(q.dtype)
    if hkv == 1 and hq > 1:
        if mask.shape[-2] != hq * t:
            mask = fold_mask_heads(mask, hq)
        out = F.scaled_dot_product_attention(q.reshape(b, 1, hq * t, d), k, v, attn_mask=mask, scale=scaling)
        return out.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).reshape(b, t, hq * d)


def short_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_add: torch.Tensor, scaling: float):
    """:func:`attention` for few query rows against a long shared K/V (the expert's action tokens against the
    cached prefix): one batched GEMM with the scale and the mask applied in its epilogue (``baddbmm``), the
    softmax in float32, one GEMM with V. The fused kernels tile the query rows, so the expert's 8 heads x 10
    tokens = 80 folded rows give them two thread blocks on a 132-SM GPU (~50 µs a call on an H200,
    docs/speed.md); GEMMs split the key axis too. Rounding: the scores are rounded to the compute dtype once
    (after scale and mask) before the float32 softmax and the probabilities after it, as in openpi's eager
    attention (which rounds the product, then the scaled scores). One KV head (Gemma's MQA) only; other shapes
    go to :func:`attention`."""
    b, hq, t, d = q.shape
    if k.shape[1] != 1:
        return attention(q, k, v, mask_add, scaling)
    mask = mask_add.to(q.dtype)
    if mask.shape[-2] != hq * t:
        mask = fold_mask_heads(mask, hq)
    scores = torch.baddbmm(mask[:, 0], q.reshape(b, hq * t, d), k[:, 0].transpose(1, 2), alpha=scaling)
    probs = F.softmax(scores, dim=-1, dtype=math_dtype(scores.dtype)).to(q.dtype)
    out = torch.bmm(probs, v[:, 0])  # [B, Hq*T, D]
    return out.view(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)


def _kv_buffer(cached: torch.Tensor, tail: int) -> torch.Tensor:
    """A [B, kv_heads, P + tail, D] buffer with the cached [B, kv_heads, P, D] in front (the tail is written
    before it is read: run_layers' ``kv_buffers``)."""
    b, kvh, p, d = cached.shape
    buf = cached.new_empty(b, kvh, p + tail, d)
    buf[:, :, :p].copy_(cached)
    return buf


# ------------------------------------------------------------------------------------------------
# Gemma
# ------------------------------------------------------------------------------------------------
class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm with (1 + weight) scaling, or adaptive (adaRMS): dense(cond) -> (scale, shift, gate)."""

    def __init__(self, dim: int, eps: float, cond_dim: int | None = None):
        super().__init__()
        self.dim, self.eps, self.cond_dim = dim, eps, cond_dim
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        dtype = x.dtype
        var = torch.mean(torch.square(x.to(math_dtype(dtype))), dim=-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)  # float32 (float64 when measured in float64)
        if self.dense is None:
            return (normed * (1.0 + self.weight.to(normed.dtype))).to(dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs the time condition (cond)")
        terms = cond.terms(self) if isinstance(cond, AdaCond) else None
        if terms is None:
            modulation = cond.modulation(self) if isinstance(cond, AdaCond) else self.dense(cond)
            scale, shift, gate = torch.chunk(modulation, 3, dim=-1)
            terms = (1 + scale.to(normed.dtype), shift.to(normed.dtype), gate.to(dtype))
        one_plus_scale, shift, gate = (t.unsqueeze(1) for t in terms) if x.dim() == 3 else terms
        return (normed * one_plus_scale + shift).to(dtype), gate

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + (
            f", adaptive cond_dim={self.cond_dim}" if self.dense is not None else ""
        )


class AdaCond:
    """The adaRMS condition of one denoising step with the norms' modulation terms computed ahead (the fast path
    computes all steps' ``dense(cond)`` in one matmul per norm, so each float32 ``dense`` weight is read once per
    call instead of once per step, and turns them into ``(1 + scale, shift, gate)`` in the dtypes the norm uses,
    for all steps at once: the same operations on the same values, fewer launches). A norm without a
    precomputed entry computes its own."""

    def __init__(self, cond: torch.Tensor, precomputed: dict | None = None):
        self.cond = cond
        self.precomputed = precomputed or {}

    def terms(self, norm: GemmaRMSNorm):
        """(1 + scale, shift, gate) of `norm` for this step, or None when not precomputed."""
        return self.precomputed.get(norm)

    def modulation(self, norm: GemmaRMSNorm) -> torch.Tensor:
        return norm.dense(self.cond)


class FusedProjection:
    """Sibling Linears that read the same input (q/k/v, gate/up) as one GEMM for the fast path: ``weight`` (and
    ``bias``) is their parameters concatenated along the output rows, and each member's parameter is a view into
    it (same values, no extra memory; the members keep working and stay what ``state_dict`` holds)."""

    def __init__(self, members: list[nn.Linear]):
        self.members = tuple(members)
        self.params = tuple(m.weight for m in members)  # the Parameter objects: a replaced one is detected
        self.sizes = [m.out_features for m in members]
        self.weight = torch.cat([m.weight.detach() for m in members])
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        start = 0
        for m, n in zip(members, self.sizes, strict=True):
            m.weight.data = self.weight[start : start + n]
            if self.bias is not None:
                m.bias.data = self.bias[start : start + n]
            start += n

    @staticmethod
    def fusable(members: list[nn.Module]) -> bool:
        """Plain Linears (a quantized layer keeps its own path) with one input width, dtype and device."""
        if not all(type(m) is nn.Linear for m in members):
            return False
        ws = [m.weight for m in members]
        biases = {m.bias is None for m in members}
        return (len({(w.shape[1], w.dtype, w.device) for w in ws}) == 1 and len(biases) == 1
                and all(m.bias is None or (m.bias.dtype, m.bias.device) == (ws[0].dtype, ws[0].device)
                        for m in members))

    def current(self, parent: nn.Module, names: tuple[str, ...]) -> bool:
        """The members are still the parent's modules with their parameters (not replaced, e.g. quantized)."""
        return all(getattr(parent, n) is m and m.weight is p
                   for n, m, p in zip(names, self.members, self.params, strict=True))

    def __deepcopy__(self, memo):
        """A deep copy of the parent is not fused: deepcopy gives every Parameter its own storage (no views)."""
        return None

    def release(self) -> None:
        """Give each member its own contiguous copy of its rows back (the fused tensor is then freed)."""
        for m in self.members:
            m.weight.data = m.weight.data.clone()
            if m.bias is not None:
                m.bias.data = m.bias.data.clone()


class _FusableProjections(nn.Module):
    """A parent of sibling projections (``FUSED_NAMES``) that may be fused (:meth:`Pi05Model.fuse_fast_projections`).
    The fusion lives in ``__dict__`` (no parameter or buffer of its own: the state dict and parameter names are
    unchanged); a conversion (``to``, ``cuda``, ``set_precision``) un-fuses, converts and fuses again, so the
    members never silently stop being views of the fused weight."""

    FUSED_NAMES: tuple[str, ...] = ()

    def fuse_projections(self) -> bool:
        """Fuse the siblings when they qualify (:meth:`FusedProjection.fusable`); True when fused."""
        self.unfuse_projections()
        members = [getattr(self, n) for n in self.FUSED_NAMES]
        if not FusedProjection.fusable(members):
            return False
        self.__dict__["_fusion"] = FusedProjection(members)
        return True

    def unfuse_projections(self) -> None:
        fused = self.__dict__.pop("_fusion", None)
        if fused is not None:
            fused.release()

    def fused_projection(self) -> FusedProjection | None:
        """The current fusion, or None (never fused, un-fused, or a member replaced since)."""
        fused = self.__dict__.get("_fusion")
        return fused if fused is not None and fused.current(self, self.FUSED_NAMES) else None

    def project(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, ...]:
        """The siblings' outputs for input ``x``: one GEMM split into views when ``fused`` and fused, else
        one call each (or one W4A8 group op when the siblings are quantized and compiled: kernels.ops)."""
        fp = self.fused_projection() if fused else None
        if fp is None:
            return sibling_outputs(tuple(getattr(self, n) for n in self.FUSED_NAMES), x)
        return tuple(F.linear(x, fp.weight, fp.bias).split(fp.sizes, dim=-1))

    def _apply(self, fn, recurse=True):
        if self.__dict__.get("_fusion") is None:
            return super()._apply(fn, recurse)
        self.unfuse_projections()
        out = super()._apply(fn, recurse)
        self.fuse_projections()
        return out


class GemmaAttention(_FusableProjections):
    FUSED_NAMES = ("q_proj", "k_proj", "v_proj")

    def __init__(self, spec: GemmaSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scaling = spec.head_dim**-0.5
        self.q_proj = nn.Linear(spec.width, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.width, spec.num_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.width, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.width, bias=False)


class GemmaMLP(_FusableProjections):
    FUSED_NAMES = ("gate_proj", "up_proj")

    def __init__(self, spec: GemmaSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.width, spec.mlp_dim, bias=False)
        self.up_proj = nn.Linear(spec.width, spec.mlp_dim, bias=False)
        self.down_proj = nn.Linear(spec.mlp_dim, spec.width, bias=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``fused`` (the fast path): gate and up as one GEMM where fused (:meth:`project`)."""
        kernel = self.__dict__.get("fused_forward")  # set by quantization when the layers have a fused kernel path
        if kernel is not None:
            y = kernel(self, x)
            if y is not None:
                return y
        gate, up = self.project(x, fused)  # one W4A8 group op when quantized and compiled (kernels.ops)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, spec: GemmaSpec, eps: float, cond_dim: int | None):
        super().__init__()
        self.self_attn = GemmaAttention(spec)
        self.mlp = GemmaMLP(spec)
        self.input_layernorm = GemmaRMSNorm(spec.width, eps, cond_dim)
        self.post_attention_layernorm = GemmaRMSNorm(spec.width, eps, cond_dim)


class GemmaModel(nn.Module):
    """Gemma decoder stack (`embed_tokens` only for the language model; `norm` adaptive for the expert)."""

    def __init__(
        self, spec: GemmaSpec, *, vocab_size: int | None, eps: float, rope_theta: float, adaptive: bool
    ):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(vocab_size, spec.width) if vocab_size else None
        cond_dim = spec.width if adaptive else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(spec, eps, cond_dim) for _ in range(spec.depth))
        self.norm = GemmaRMSNorm(spec.width, eps, cond_dim)
        self.rope_theta = rope_theta
        self.register_buffer("inv_freq", self.fresh_inv_freq(), persistent=False)

    def fresh_inv_freq(self, device=None) -> torch.Tensor:
        """HF default RoPE init: 1 / theta^(2i/d), float32."""
        d = self.spec.head_dim
        return 1.0 / (
            self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
        )

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B, T, head_dim] for integer positions [B, T] (float32 math, cast to dtype)."""
        m = math_dtype(self.inv_freq.dtype)
        freqs = positions[..., None].to(m) * self.inv_freq.to(m)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class GemmaForCausalLM(nn.Module):
    """Holder giving the expert its openpi name `gemma_expert.model.*` (its unused lm_head is not built)."""

    def __init__(self, model: GemmaModel):
        super().__init__()
        self.model = model


# ------------------------------------------------------------------------------------------------
# SigLIP
# ------------------------------------------------------------------------------------------------
class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, spec.width, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.position_embedding = nn.Embedding(spec.num_patches, spec.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))
        x = x.flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.width // spec.num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(spec.width, spec.width)
        self.v_proj = nn.Linear(spec.width, spec.width)
        self.q_proj = nn.Linear(spec.width, spec.width)
        self.out_proj = nn.Linear(spec.width, spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class SiglipMLP(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.width, spec.mlp_dim)
        self.fc2 = nn.Linear(spec.mlp_dim, spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, spec: VisionSpec, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(spec.width, eps=eps)
        self.self_attn = SiglipAttention(spec)
        self.layer_norm2 = nn.LayerNorm(spec.width, eps=eps)
        self.mlp = SiglipMLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, spec: VisionSpec, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(spec, eps) for _ in range(spec.depth))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, spec: VisionSpec, eps: float):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(spec)
        self.encoder = SiglipEncoder(spec, eps)
        self.post_layernorm = nn.LayerNorm(spec.width, eps=eps)

    def forward(self, pixel_values: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        x = self.embeddings(pixel_values).to(compute_dtype)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, spec: VisionSpec, eps: float):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(spec, eps)


class PaliGemmaMultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)


class PaliGemmaModel(nn.Module):
    def __init__(self, config: Pi05Config):
        super().__init__()
        self.vision_tower = SiglipVisionModel(config.vision, config.layer_norm_eps)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config.vision.width, config.vlm.width)
        self.language_model = GemmaModel(
            config.vlm,
            vocab_size=config.vocab_size,
            eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            adaptive=False,
        )


class PaliGemmaForConditionalGeneration(nn.Module):
    def __init__(self, config: Pi05Config):
        super().__init__()
        self.model = PaliGemmaModel(config)


# ------------------------------------------------------------------------------------------------
# PaliGemma + expert with joint attention
# ------------------------------------------------------------------------------------------------
class PaliGemmaWithExpertModel(nn.Module):
    def __init__(self, config: Pi05Config):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(config)
        self.gemma_expert = GemmaForCausalLM(
            GemmaModel(
                config.expert,
                vocab_size=None,
                eps=config.rms_norm_eps,
                rope_theta=config.rope_theta,
                adaptive=True,
            )
        )

    @property
    def language_model(self) -> GemmaModel:
        return self.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.gemma_expert.model

    def embed_image(self, pixel_values: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        pm = self.paligemma.model
        feats = pm.vision_tower.vision_model(pixel_values, compute_dtype)
        return pm.multi_modal_projector.linear(feats)

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(tokens)

    def run_layers(
        self,
        xs: list[torch.Tensor | None],
        conds: list[torch.Tensor | None],
        mask_add: torch.Tensor,
        positions: torch.Tensor,
        *,
        past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        store_kv: bool = False,
        attn_fn=attention,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_only: bool = False,
        fused: bool = False,
        kv_buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        """All layers over the streams [prefix, suffix] (either may be None), jointly attended.
        `attn_fn(q, k, v, mask_add, scaling)` is the attention function (openpi's eager one by default;
        training and the fast path pass :func:`fused_attention`). `rope`: (cos, sin) [B, 1, T, D] computed ahead
        (then `positions` is unused). A cond may be an :class:`AdaCond`. `kv_only` (with store_kv): stop the last
        layer after its K/V and return no outputs (a prefix cache needs nothing else). `fused` (the fast path):
        q/k/v and gate/up as one GEMM each where :meth:`Pi05Model.fuse_fast_projections` fused them.
        `kv_buffers` (instead of `past_kv`): per layer (k, v) [B, kv_heads, P + T, D] holding the cached P
        positions; the layer's T new positions are written into the tail in place and attention reads the
        whole buffer: the values and layout of ``cat([past_k, k])`` without copying the cache every call.

        Returns (final-normed outputs per stream, list of per-layer (k, v) of these streams if store_kv).
        """
        models = [self.language_model, self.expert]
        active = [i for i, x in enumerate(xs) if x is not None]
        lengths = [xs[i].shape[1] for i in active]
        ref = xs[active[0]]
        if rope is None:
            cos, sin = models[active[0]].rope(positions, ref.dtype)
            cos, sin = cos[:, None], sin[:, None]
        else:
            cos, sin = rope
        sin_signed = _signed_sin(sin)  # once per call: q * cos + _rotate_half(q) * sin, one launch fewer a layer
        kv_out = [] if store_kv else None
        depth = len(models[active[0]].layers)
        for li in range(depth):
            qs, ks, vs, gates = [], [], [], []
            for i in active:
                layer = models[i].layers[li]
                h, gate = layer.input_layernorm(xs[i], conds[i])
                gates.append(gate)
                attn = layer.self_attn
                b, t, _ = h.shape
                q, k, v = attn.project(h, fused)
                qs.append(q.view(b, t, -1, attn.head_dim).transpose(1, 2))
                ks.append(k.view(b, t, -1, attn.head_dim).transpose(1, 2))
                vs.append(v.view(b, t, -1, attn.head_dim).transpose(1, 2))
            q = torch.cat(qs, dim=2) if len(qs) > 1 else qs[0]
            k = torch.cat(ks, dim=2) if len(ks) > 1 else ks[0]
            v = torch.cat(vs, dim=2) if len(vs) > 1 else vs[0]
            q = q * cos + _swap_halves(q) * sin_signed
            k = k * cos + _swap_halves(k) * sin_signed
            if store_kv:
                kv_out.append((k, v))
                if kv_only and li == depth - 1:
                    return [None, None], kv_out
            if past_kv is not None:
                pk, pv = past_kv[li]
                k = torch.cat([pk, k], dim=2)
                v = torch.cat([pv, v], dim=2)
            elif kv_buffers is not None:
                bk, bv = kv_buffers[li]
                p = bk.shape[2] - k.shape[2]
                bk[:, :, p:].copy_(k)
                bv[:, :, p:].copy_(v)
                k, v = bk, bv
            scaling = models[active[0]].layers[li].self_attn.scaling
            att = attn_fn(q, k, v, mask_add, scaling)
            start = 0
            for j, i in enumerate(active):
                layer = models[i].layers[li]
                end = start + lengths[j]
                out = layer.self_attn.o_proj(att[:, start:end])
                x = xs[i] + out if gates[j] is None else xs[i] + out * gates[j]
                h, gate = layer.post_attention_layernorm(x, conds[i])
                out = layer.mlp(h, fused)
                xs[i] = x + out if gate is None else x + out * gate
                start = end
        outs: list[torch.Tensor | None] = [None, None]
        for i in active:
            outs[i], _ = models[i].norm(xs[i], conds[i])
        return outs, kv_out


class Pi05Model(nn.Module):
    """pi0.5: `sample_actions(images, image_masks, tokens, token_masks, noise) -> actions [B, H, A]`."""

    def __init__(self, config: Pi05Config):
        super().__init__()
        self.config = config
        self.paligemma_with_expert = PaliGemmaWithExpertModel(config)
        w = config.expert.width
        self.action_in_proj = nn.Linear(config.action_dim, w)
        self.action_out_proj = nn.Linear(w, config.action_dim)
        self.time_mlp_in = nn.Linear(w, w)
        self.time_mlp_out = nn.Linear(w, w)
        self.compute_dtype = torch.float32
        self.euler_times = euler_times(config.num_steps)  # python floats: constants for compile / graphs
        self.euler_dt = float(np.float32(-1.0 / config.num_steps))

    # ---- precision ------------------------------------------------------------------------------
    def set_precision(self, precision: str | torch.dtype) -> Pi05Model:
        """'float32' or 'bfloat16' (openpi's selective bf16: see module docstring); 'float64' for measurements
        only (every step in float64, so the order of float operations no longer moves a quantized run)."""
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}.get(
            precision, precision
        )
        if dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"precision {precision!r}: must be float32, bfloat16 (or float64 to measure)")
        pwe = self.paligemma_with_expert
        for gm in (pwe.language_model, pwe.expert):  # start from exact float32 frequencies
            gm.inv_freq = gm.fresh_inv_freq(device=gm.inv_freq.device)
        pwe.to(dtype=dtype)  # casts the RoPE buffers too (bf16-rounded frequencies, as in openpi)
        if dtype == torch.bfloat16:  # values pass through bf16 first (openpi casts all, then restores these)
            for name, param in pwe.named_parameters():
                if any(sel in name for sel in FLOAT32_PARAM_SELECTORS):
                    param.data = param.data.to(torch.float32)
        for mod in (self.action_in_proj, self.action_out_proj, self.time_mlp_in, self.time_mlp_out):
            mod.to(dtype=math_dtype(dtype))
        self.compute_dtype = dtype
        return self

    @property
    def math_dtype(self) -> torch.dtype:
        return math_dtype(self.compute_dtype)

    # ---- embeddings -----------------------------------------------------------------------------
    def embed_prefix(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_masks: torch.Tensor
    ):
        """images float [B, N, 3, H, W] in [-1, 1]; image_masks bool [B, N]; tokens long [B, L]; masks."""
        pwe = self.paligemma_with_expert
        b, n = images.shape[:2]
        embs, pads = [], []
        for i in range(n):
            emb = pwe.embed_image(images[:, i], self.compute_dtype)
            embs.append(emb)
            pads.append(image_masks[:, i : i + 1].expand(b, emb.shape[1]))
        lang = pwe.embed_language_tokens(tokens)
        lang = lang * math.sqrt(lang.shape[-1])
        embs.append(lang)
        pads.append(token_masks)
        return torch.cat(embs, dim=1).to(self.compute_dtype), torch.cat(pads, dim=1)

    def embed_suffix(self, x_t: torch.Tensor, time: torch.Tensor):
        """-> action tokens [B, H, W] (compute dtype), adaRMS condition [B, W] (float32)."""
        temb = sinusoidal_time_embedding(
            time, self.action_in_proj.out_features, self.config.min_period, self.config.max_period
        )
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
        return self.action_in_proj(x_t).to(self.compute_dtype), cond

    # ---- inference ------------------------------------------------------------------------------
    def compute_prefix_cache(self, prefix_embs: torch.Tensor, prefix_pad: torch.Tensor):
        """One language-model pass over the prefix -> per-layer (k, v) after RoPE, and the prefix output."""
        mask = make_att_2d_masks(prefix_pad, torch.zeros_like(prefix_pad, dtype=torch.int32))
        positions = torch.cumsum(prefix_pad.to(torch.int64), dim=1) - 1
        outs, kv = self.paligemma_with_expert.run_layers(
            [prefix_embs, None], [None, None], additive_mask(mask), positions, store_kv=True
        )
        return kv, outs[0]

    def denoise_step(self, kv_cache, prefix_pad: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor):
        """Velocity v_t [B, H, action_dim] (float32) for noisy actions x_t at time t [B]."""
        suffix, cond = self.embed_suffix(x_t, time)
        b, h = suffix.shape[:2]
        p = prefix_pad.shape[1]
        suffix_pad = torch.ones(b, h, dtype=torch.bool, device=suffix.device)
        ar = torch.zeros(b, h, dtype=torch.int32, device=suffix.device)
        ar[:, 0] = 1
        suffix_att = make_att_2d_masks(suffix_pad, ar)
        full = torch.cat([prefix_pad[:, None, :].expand(b, h, p), suffix_att], dim=2)
        positions = (
            prefix_pad.to(torch.int64).sum(dim=-1, keepdim=True)
            + torch.cumsum(suffix_pad.to(torch.int64), dim=1)
            - 1
        )
        outs, _ = self.paligemma_with_expert.run_layers(
            [None, suffix], [None, cond], additive_mask(full), positions, past_kv=kv_cache
        )
        out = outs[1][:, -self.config.action_horizon :].to(self.math_dtype)
        return self.action_out_proj(out)

    @torch.no_grad()
    def sample_actions(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Flow-matching sampling, static shapes (compile / CUDA-graph friendly). noise: float32 [B, H, A]."""
        prefix_embs, prefix_pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        kv_cache, _ = self.compute_prefix_cache(prefix_embs, prefix_pad)
        x_t = noise.to(self.math_dtype)
        b = x_t.shape[0]
        for t in self.euler_times:  # unrolled: no host sync, static shapes
            time = torch.full((b,), t, dtype=self.math_dtype, device=noise.device)
            v_t = self.denoise_step(kv_cache, prefix_pad, x_t, time)
            x_t = x_t + self.euler_dt * v_t  # dt is float32(-1/num_steps), as openpi's tensor
        return x_t

    # ---- fast inference (docs/speed.md) -------------------------------------------------------------
    @torch.no_grad()
    def sample_actions_fast(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        noise: torch.Tensor,
        *,
        attn_fn=fused_attention,
        step_attn_fn=None,
        kv_buffer: bool = False,
    ) -> torch.Tensor:
        """:meth:`sample_actions` with less work and the same inputs and outputs (docs/speed.md).

        Feed it :func:`compact_prefix`'s inputs (masked image slots and trailing prompt padding dropped: they
        change nothing in openpi's outputs). Differences from the reference path, none of which changes what is
        computed beyond float rounding:
        - attention through ``attn_fn`` (default :func:`fused_attention`; pass :func:`attention` to keep
          openpi's eager softmax), with the heads' mask folded once per call;
        - masks, positions and RoPE of the action tokens built once per call, not once per step;
        - the time MLP and every adaRMS modulation ``dense(cond)`` of all steps in one matmul each (a norm's
          float32 dense weight is read once per call, not once per step), where ``dense`` is a plain Linear;
        - the language model's last layer stops after its K/V (its attention output and MLP feed nothing);
        - q/k/v and gate/up as one GEMM each where :meth:`fuse_fast_projections` fused them.
        ``step_attn_fn``: the denoising steps' attention (default ``attn_fn``), e.g.
        :func:`short_query_attention`. ``kv_buffer``: the steps write their K/V into per-layer buffers that hold
        the prefix K/V (copied in once per call) instead of concatenating the cache with them in every layer and
        step (the same values in the same layout; the cache is copied once per call, not once per step).
        Static shapes, no host syncs: capture it in a CUDA graph or torch.compile it.
        """
        pwe = self.paligemma_with_expert
        expert = pwe.expert
        dtype, m = self.compute_dtype, self.math_dtype
        b, h = noise.shape[0], self.config.action_horizon
        prefix = getattr(self, "_compiled_prefix", None) or self.fast_prefix
        kv_cache, prefix_pad = prefix(images, image_masks, tokens, token_masks, attn_fn, h if kv_buffer else 0)
        # the action tokens' mask, positions and RoPE: the same for every step
        p = prefix_pad.shape[1]
        dev = noise.device
        suffix_pad = torch.ones(b, h, dtype=torch.bool, device=dev)
        ar = torch.zeros(b, h, dtype=torch.int32, device=dev)
        ar[:, 0] = 1
        full = torch.cat([prefix_pad[:, None, :].expand(b, h, p), make_att_2d_masks(suffix_pad, ar)], dim=2)
        suffix_mask = fold_mask_heads(additive_mask(full).to(dtype), expert.spec.num_heads)
        positions = (
            prefix_pad.to(torch.int64).sum(dim=-1, keepdim=True) + torch.cumsum(suffix_pad.to(torch.int64), dim=1) - 1
        )
        cos, sin = expert.rope(positions, dtype)
        rope = (cos[:, None], sin[:, None])
        # the adaRMS condition of every step, and each norm's modulation of every step, in one matmul each
        steps = len(self.euler_times)
        time = torch.cat([torch.full((b,), t, dtype=m, device=dev) for t in self.euler_times])
        temb = sinusoidal_time_embedding(
            time, self.action_in_proj.out_features, self.config.min_period, self.config.max_period
        )
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb)))).view(steps, b, -1)
        pre: list[dict] = [{} for _ in range(steps)]
        norms = [n for layer in expert.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in [*norms, expert.norm]:
            if type(norm.dense) is nn.Linear:  # a quantized dense keeps its per-call behaviour
                scale, shift, gate = torch.chunk(norm.dense(cond), 3, dim=-1)
                one_plus_scale, shift, gate = 1 + scale.to(m), shift.to(m), gate.to(dtype)
                for i in range(steps):
                    pre[i][norm] = (one_plus_scale[i], shift[i], gate[i])
        x_t = noise.to(m)
        step = getattr(self, "_compiled_step", None) or self.fast_step
        for i in range(steps):
            x_t = step(x_t, cond[i], pre[i], suffix_mask, kv_cache, rope, step_attn_fn or attn_fn, kv_buffer)
        return x_t

    def fast_prefix(self, images, image_masks, tokens, token_masks, attn_fn=fused_attention, kv_tail=0):
        """The prefix of :meth:`sample_actions_fast`: embeddings and the language model's per-layer (k, v) after
        RoPE (its last layer stops after them) -> (kv_cache, prefix_pad). ``kv_tail`` > 0: each (k, v) comes in a
        [B, kv_heads, P + kv_tail, D] buffer with the prefix in front, for the steps to write their K/V behind it
        (``sample_actions_fast(kv_buffer=True)``; built here so that a compiled prefix fuses the copy)."""
        pwe = self.paligemma_with_expert
        prefix_embs, prefix_pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        mask = make_att_2d_masks(prefix_pad, torch.zeros_like(prefix_pad, dtype=torch.int32))
        _, kv_cache = pwe.run_layers(
            [prefix_embs, None],
            [None, None],
            fold_mask_heads(additive_mask(mask).to(self.compute_dtype), pwe.language_model.spec.num_heads),
            torch.cumsum(prefix_pad.to(torch.int64), dim=1) - 1,
            store_kv=True,
            attn_fn=attn_fn,
            kv_only=True,
            fused=True,
        )
        if kv_tail:
            kv_cache = [tuple(_kv_buffer(t, kv_tail) for t in kv) for kv in kv_cache]
        return kv_cache, prefix_pad

    def fast_step(self, x_t, cond_i, pre_i, suffix_mask, kv_cache, rope, attn_fn=fused_attention, kv_buffer=False):
        """One Euler step of :meth:`sample_actions_fast`: the expert over the cached prefix, x_t + dt * v_t.
        ``kv_buffer``: ``kv_cache`` holds :meth:`_kv_buffer`'s buffers (the step writes its K/V into their tail)."""
        h = self.config.action_horizon
        suffix = self.action_in_proj(x_t).to(self.compute_dtype)
        outs, _ = self.paligemma_with_expert.run_layers(
            [None, suffix], [None, AdaCond(cond_i, pre_i)], suffix_mask, None,
            past_kv=None if kv_buffer else kv_cache, kv_buffers=kv_cache if kv_buffer else None,
            attn_fn=attn_fn, rope=rope, fused=True,
        )
        v_t = self.action_out_proj(outs[1][:, -h:].to(self.math_dtype))
        return x_t + self.euler_dt * v_t

    def fuse_fast_projections(self, enabled: bool = True) -> int:
        """Let the fast path run q/k/v and gate/up of every language-model and expert layer as one GEMM each
        (:class:`FusedProjection`: the members' weights become views into the concatenated weight, so no extra
        memory; the state dict, checkpoints and the reference path are unchanged). Groups with a quantized (or
        otherwise not plain ``nn.Linear``) member, or mixed dtypes, stay separate. ``enabled=False`` un-fuses
        (each member gets its own copy back). Returns the number of fused groups. Fuse after loading weights
        and after quantizing (quantization un-fuses the groups it replaces members of)."""
        pwe = self.paligemma_with_expert
        count = 0
        for gm in (pwe.language_model, pwe.expert):
            for layer in gm.layers:
                for parent in (layer.self_attn, layer.mlp):
                    if enabled:
                        count += parent.fuse_projections()
                    else:
                        parent.unfuse_projections()
        return count

    def compile_fast_step(self, enabled: bool = True, *, prefix: bool = False, **compile_kwargs) -> int:
        """torch.compile :meth:`fast_step` (compiled once, reused by all 10 steps; static shapes by default):
        the step's elementwise work (adaRMS norms, RoPE, GeLU, residuals) fused into few kernels. ``prefix``:
        compile :meth:`fast_prefix` (vision tower + language model K/V) too; else the prefix stays eager. A CUDA
        graph captured afterwards (GraphedSampler) replays the compiled kernels. ``enabled=False`` drops both.
        Returns the number of quantized layers whose kernel packs were prepared for the compiled code (0 if none)."""
        if not enabled:
            self.__dict__.pop("_compiled_step", None)
            self.__dict__.pop("_compiled_prefix", None)
            return 0
        compile_kwargs.setdefault("dynamic", False)
        # quantized layers (backend "triton"): their kernel packs built now, so that the compiled step calls the
        # W4A8 custom ops (kernels.ops) without a graph break instead of the eager dispatch's bookkeeping
        prepared = prepare_for_compile(self, self.compute_dtype)
        # a step that breaks its graph (code dynamo cannot trace, e.g. a quantized layer without a prepared pack)
        # compiles each norm's forward once per norm instance (it guards on `self`): 37 in pi0.5, above dynamo's
        # default limit of 8 recompiles per function, after which the rest would silently run eager
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        self.__dict__["_compiled_step"] = torch.compile(self.fast_step, **compile_kwargs)
        if prefix:
            self.__dict__["_compiled_prefix"] = torch.compile(self.fast_prefix, **compile_kwargs)
        else:
            self.__dict__.pop("_compiled_prefix", None)
        return prepared

    @torch.no_grad()
    def joint_velocity(self, images, image_masks, tokens, token_masks, x_t, time):
        """Velocity from ONE joint pass over prefix + suffix (no cache), as openpi's training forward does.

        Returns (v_t, prefix_output). Used to check that the cached path and the joint mask agree.
        """
        return self.joint_forward(images, image_masks, tokens, token_masks, x_t, time)

    def joint_forward(self, images, image_masks, tokens, token_masks, x_t, time, attn=attention):
        """:meth:`joint_velocity` with gradients (training: pytest_duquant.training.flow); `attn` as in
        :meth:`run_layers`."""
        prefix_embs, prefix_pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        suffix, cond = self.embed_suffix(x_t, time)
        b, h = suffix.shape[:2]
        suffix_pad = torch.ones(b, h, dtype=torch.bool, device=suffix.device)
        pad = torch.cat([prefix_pad, suffix_pad], dim=1)
        ar = torch.zeros_like(pad, dtype=torch.int32)
        ar[:, prefix_pad.shape[1]] = 1
        mask = make_att_2d_masks(pad, ar)
        positions = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        outs, _ = self.paligemma_with_expert.run_layers(
            [prefix_embs, suffix], [None, cond], additive_mask(mask), positions, attn_fn=attn
        )
        v = self.action_out_proj(outs[1][:, -self.config.action_horizon :].to(self.math_dtype))
        return v, outs[0]


def compact_prefix(
    images: torch.Tensor,
    image_masks: torch.Tensor,
    tokens: torch.Tensor,
    token_masks: torch.Tensor,
    *,
    token_bucket: int = 32,
) -> dict[str, torch.Tensor]:
    """The prefix inputs without what changes nothing in openpi's outputs: image slots masked in every row
    (LIBERO's empty right-wrist slot) and prompt columns after the last valid token of any row, kept to a
    multiple of `token_bucket` (at least one bucket, at most the original length) so that few shapes occur
    (one CUDA graph each). Positions come from the mask's cumulative sum and masked keys get zero weight, so
    the actions are the reference's up to float rounding (the softmax sums over fewer zeros in another order).

    Reads the masks on the host: call it where the inputs are built, before they go to the device.
    """
    if token_bucket < 1:
        raise ValueError(f"token_bucket={token_bucket}: must be >= 1")
    keep = image_masks.any(dim=0)
    if not bool(keep.all()):
        idx = keep.nonzero().flatten()
        images, image_masks = images.index_select(1, idx), image_masks.index_select(1, idx)
    valid = token_masks.any(dim=0).nonzero()
    last = int(valid.max()) + 1 if valid.numel() else 0
    n = min(tokens.shape[1], max(token_bucket, -(-last // token_bucket) * token_bucket))
    return {"images": images, "image_masks": image_masks, "tokens": tokens[:, :n], "token_masks": token_masks[:, :n]}


def build_model(
    config: Pi05Config, *, device: str | torch.device = "cpu", precision: str | None = None
) -> Pi05Model:
    """Construct the model (no values on 'meta'; use init_random_weights or a checkpoint otherwise)."""
    with torch.device(device):
        model = Pi05Model(config)
    model.set_precision(precision or "float32")
    return model.eval()


def random_model(
    config: Pi05Config, seed: int = 0, precision: str = "float32", device: str | torch.device = "cpu",
    *, draw_on_device: bool = False,
) -> Pi05Model:
    """A random-init model, allocated directly in its final dtypes (the full model in bf16: ~7 GB).
    ``draw_on_device``: draw the values on ``device`` (seconds on a GPU instead of ~2 minutes on a CPU for the
    full model; the same scales, not the same values on another machine: for timing, not for fingerprints)."""
    model = build_model(config, device="meta", precision=precision)
    model.to_empty(device=device)
    model.set_precision(precision)  # real RoPE buffers
    init_random_weights(model, seed, on_device=draw_on_device)
    return model.set_precision(precision)  # bf16: round the float32-kept params as openpi's loader does


@torch.no_grad()
def init_random_weights(model: Pi05Model, seed: int = 0, *, on_device: bool = False) -> Pi05Model:
    """Deterministic random init (same values for the same seed on any machine: drawn on the CPU in float64 and
    rounded to float32; torch's float32 normal sampler uses the CPU's vector unit, so a scalar or ARM machine
    drew other last bits, hence another checkpoint fingerprint than an AVX2/AVX512 one).

    Scales keep activations O(1): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02), norm weights ~ N(0, 0.1)
    (Gemma scales by 1 + w; LayerNorm by 1 + N(0, 0.1)), embeddings ~ N(0, 1/width) (x sqrt(width) in use),
    and the adaRMS `dense` ~ N(0, 1/fan_in) so that the time condition and gates matter.
    ``on_device``: draw in float32 on the parameters' device instead (fast; values depend on the device).
    """
    device = next(model.parameters()).device if on_device else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if on_device:
            x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        else:
            x = torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.float32)
        if name.endswith("embed_tokens.weight"):
            x = x / math.sqrt(shape[1])
        elif name.endswith("position_embedding.weight"):
            x = x * 0.02
        elif name.endswith(".bias"):
            x = x * 0.02
        elif "layer_norm" in name or "post_layernorm" in name:
            x = 1.0 + 0.1 * x if name.endswith("weight") else x * 0.02
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            x = x * 0.1
        else:  # Linear / Conv weights
            fan_in = int(np.prod(shape[1:]))
            x = x / math.sqrt(fan_in)
        param.data.copy_(x.to(device=param.device, dtype=param.dtype))
    return model
