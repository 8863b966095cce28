"""Building blocks of the scale-wise generator (SPEC §5; paper appendix E; Switti design).

Everything here is shape-agnostic about *which* scales exist: the schedule enters only through
the RoPE table and the masks that :mod:`mindhier.generator.model` builds from the config.

One block (paper appendix E, "RMSNorm before and after the attention and FFN blocks")::

    x += post(SelfAttn(pre(x)·(1+scale₁) + shift₁)) · gate₁      AdaLN from the pooled fMRI vector
    x += post(CrossAttn(pre(x), norm(context)))                  no AdaLN, no gate
    x += post(SwiGLU(pre(x)·(1+scale₂) + shift₂)) · gate₂

Queries and keys are normalised (LayerNorm over the full width, no affine) before the heads are
split — that is Switti's "QK norm"; self-attention then applies 2-D RoPE per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (stable under bf16 autocast), then a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)   # one fused kernel
        return normed.type_as(x) * self.weight


def qk_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free LayerNorm over the whole width (before the head split), as Switti does."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


# ----------------------------------------------------------------------------------------------
# 2-D rotary position embedding, normalised per scale
# ----------------------------------------------------------------------------------------------

def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """The head_dim/4 base frequencies of one axis of 2-D RoPE (on the CPU)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    cpu = torch.device("cpu")  # explicit: the table is fixed data, even when the model is built on "meta"
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=cpu)[: head_dim // 4].float() / head_dim))


def rope_angles(scales: tuple[int, ...], head_dim: int, theta: float, rope_size: int) -> torch.Tensor:
    """Rotation angles (L, head_dim/2) for all tokens of the pyramid, row-major per scale.

    Each scale's grid is stretched so that it spans the same range: the frequencies of a pn×pn
    map are multiplied by ``rope_size / (pn − 1)`` (``rope_size`` for pn = 1), so the last row or
    column of every scale sits at position ``rope_size``. A token therefore gets the same angle
    at every resolution for the same relative image location — that is what "normalised per
    scale" means. The first head_dim/4 complex pairs rotate with the column (x) index, the next
    head_dim/4 with the row (y) index.
    """
    base = rope_frequencies(head_dim, theta)
    cpu = base.device
    tables = []
    for pn in scales:
        freqs = base * (rope_size / (pn - 1 if pn > 1 else 1))
        pos = torch.arange(pn * pn, dtype=torch.float32, device=cpu)
        col, row = pos % pn, torch.div(pos, pn, rounding_mode="floor")
        tables.append(torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1))
    return torch.cat(tables, dim=0)


def image_plane_angles(sides: tuple[int, ...], head_dim: int, theta: float, rope_size: int) -> torch.Tensor:
    """Rotation angles (Σ n², head_dim/2) placing every cell of each n×n grid at its **centre on
    the image**, (i + ½)·rope_size/n per axis, row-major per grid: the tables of cross-attention
    RoPE (``GeneratorConfig.cross_rope``).

    Pyramid tokens (the queries) and the vision model's patch tokens (the keys) both get them, so
    q·k depends on where on the image the two sit relative to each other, whatever the two
    resolutions; a 1×1 grid, like a CLS token, sits at the centre. (Self-attention's table,
    :func:`rope_angles`, aligns grids at their corners instead; it is Switti's and stays so.)
    """
    base = rope_frequencies(head_dim, theta)
    tables = []
    for n in sides:
        pos = torch.arange(n * n, dtype=torch.float32, device=base.device)
        col, row = (pos % n + 0.5) * (rope_size / n), (torch.div(pos, n, rounding_mode="floor") + 0.5) * (rope_size / n)
        tables.append(torch.cat([torch.outer(col, base), torch.outer(row, base)], dim=-1))
    return torch.cat(tables, dim=0)


def context_plane_angles(grid: int, num_levels: int, head_dim: int, theta: float, rope_size: int) -> torch.Tensor:
    """:func:`image_plane_angles` of a context of ``num_levels`` levels, each a vision layer's
    token layout [CLS, grid×grid patches] (CLIP's): CLS at the image centre."""
    return image_plane_angles((1, grid), head_dim, theta, rope_size).repeat(num_levels, 1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x₂ᵢ, x₂ᵢ₊₁) of x (B, H, L, hd), read as complex numbers, by
    ``rotation`` = exp(i·angle), complex64 (L, hd/2). Done in float32 whatever the autocast
    dtype (one complex multiply), then cast back."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------

def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, C) → (B, H, L, C/H)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, hd) → (B, L, H·hd)."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK norm and 2-D RoPE.

    ``mask`` (bool, True = may attend) is the block-diagonal same-scale mask in teacher forcing;
    the scale-by-scale path feeds one scale at a time and passes no mask (and needs no KV cache:
    no token attends to another scale)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, rotation, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = apply_rope(split_heads(qk_norm(q), self.num_heads), rotation)
        k = apply_rope(split_heads(qk_norm(k), self.num_heads), rotation)
        v = split_heads(v, self.num_heads)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values from the (normalised) fMRI context.

    Keys and values depend only on the context, so :meth:`keys_values` is computed once per
    image and reused at every scale of sampling (SPEC §5); ``mask`` (bool, broadcastable to
    (B, H, Lq, Lctx)) routes each scale to its own segment of the context."""

    def __init__(self, width: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.out = nn.Linear(width, width)

    def keys_values(self, context: torch.Tensor, rotation: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the context; ``rotation`` (complex (Lctx, hd/2)) places each key on the image
        grid (cross-attention RoPE, see :func:`image_plane_angles`)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        k = split_heads(qk_norm(k), self.num_heads)
        return (k if rotation is None else apply_rope(k, rotation)), split_heads(v, self.num_heads)

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], mask=None, rotation=None):
        q = split_heads(qk_norm(self.q(x)), self.num_heads)
        if rotation is not None:  # the query's own place on the image grid (cross-attention RoPE)
            q = apply_rope(q, rotation)
        k, v = kv
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class SwiGLU(nn.Module):
    """FFN with SiLU gating (Shazeer 2020); hidden width int(8/3 · width) keeps the FLOPs of a
    4× GELU MLP (5120 for width 1920)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeneratorBlock(nn.Module):
    """One transformer layer (see the module docstring for the equations)."""

    # The six AdaLN chunks, in the order the modulation Linear emits them (Switti layout).
    ADALN_CHUNKS = ("gate_attn", "gate_ffn", "scale_attn", "scale_ffn", "shift_attn", "shift_ffn")

    def __init__(self, width: int, num_heads: int, context_dim: int, ffn_hidden: int, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(width, num_heads)
        self.cross_attn = CrossAttention(width, context_dim, num_heads)
        self.ffn = SwiGLU(width, ffn_hidden)
        self.self_attn_pre_norm = RMSNorm(width, eps)
        self.self_attn_post_norm = RMSNorm(width, eps)
        self.cross_attn_pre_norm = RMSNorm(width, eps)
        self.cross_attn_post_norm = RMSNorm(width, eps)
        self.ffn_pre_norm = RMSNorm(width, eps)
        self.ffn_post_norm = RMSNorm(width, eps)
        self.context_norm = RMSNorm(context_dim, eps)
        self.adaln = nn.Linear(width, 6 * width)  # applied to SiLU(cond)

    def cross_keys_values(self, context: torch.Tensor, context_rotation: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention K/V for a context (B, Lctx, Dctx): the per-image cache;
        ``context_rotation``: the context tokens' cross-attention RoPE table (None: no RoPE)."""
        return self.cross_attn.keys_values(self.context_norm(context), context_rotation)

    def forward(self, x, cond, rotation, self_mask, cross_mask, context=None, cross_kv=None,
                cross_rotation=None):
        """``rotation``: the RoPE table of these tokens (complex, (L, hd/2)). ``cross_kv`` (this
        layer's cached K/V) or ``context`` (K/V computed here, inside forward, so that FSDP has
        this block's weights gathered when they are used). ``cross_rotation``: (the queries',
        the context's) cross-attention RoPE tables, or None."""
        query_rotation, context_rotation = cross_rotation if cross_rotation is not None else (None, None)
        if cross_kv is None:
            cross_kv = self.cross_keys_values(context, context_rotation)
        gate1, gate2, scale1, scale2, shift1, shift2 = self.adaln(F.silu(cond)).unsqueeze(1).chunk(6, -1)
        h = self.self_attn(torch.addcmul(shift1, self.self_attn_pre_norm(x), 1 + scale1), rotation, self_mask)
        x = torch.addcmul(x, self.self_attn_post_norm(h), gate1)
        h = self.cross_attn(self.cross_attn_pre_norm(x), cross_kv, cross_mask, query_rotation)
        x = x + self.cross_attn_post_norm(h)
        h = self.ffn(torch.addcmul(shift2, self.ffn_pre_norm(x), 1 + scale2))
        return torch.addcmul(x, self.ffn_post_norm(h), gate2)


class AdaLNHead(nn.Module):
    """AdaLN before the classifier: parameter-free LayerNorm, scale/shift from the condition,
    then Linear(C → V)."""

    def __init__(self, width: int, vocab_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.adaln = nn.Linear(width, 2 * width)  # applied to SiLU(cond)
        self.proj = nn.Linear(width, vocab_size)

    def forward(self, x, cond):
        scale, shift = self.adaln(F.silu(cond)).unsqueeze(1).chunk(2, -1)
        return self.proj(torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=self.eps), 1 + scale))


def init_generator_weights(model: nn.Module, blocks, head: AdaLNHead, width: int,
                           std: float = 0.02, adaln: float = 0.5, adaln_gate: float = 1e-5,
                           head_gain: float = 0.02) -> None:
    """VAR/Switti-style initialisation: truncated normal linears and embeddings, zero biases,
    gates of the residual branches almost closed (so a fresh model starts near identity), a
    small classifier, attention output projections scaled by 1/√(2·depth)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    with torch.no_grad():
        head.proj.weight.mul_(head_gain)
        head.adaln.weight.mul_(adaln)
        scale = 1 / math.sqrt(2 * len(blocks))
        for block in blocks:
            block.self_attn.out.weight.mul_(scale)
            block.cross_attn.out.weight.mul_(scale)
            block.adaln.weight[: 2 * width].mul_(adaln_gate)   # the two gates
            block.adaln.weight[2 * width:].mul_(adaln)          # scales and shifts
